//! `switchboard`: the broker's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchboard_broker::config::{self, Config, FlagOverrides, LogFormat};
use switchboard_broker::run;
use switchboard_broker::server::Broker;
use switchboard_broker::shutdown;

/// Switchboard: a persistent, replicated event bus for contact-center integrations.
///
/// With no arguments it starts a single-node broker on 127.0.0.1:7400 with its data in ./data.
/// Every setting can come from the embedded defaults, a TOML file (--config), an environment
/// variable (SWITCHBOARD_<SECTION>_<NAME>, for example SWITCHBOARD_RETENTION_MAX_AGE=1d) or a flag,
/// each overriding the one before. See `--print-defaults` for every setting with its meaning.
#[derive(Parser, Debug)]
#[command(name = "switchboard", version, after_help = AFTER_HELP)]
struct Args {
    /// Address of the gRPC listener, e.g. 0.0.0.0:7400 (port 0 picks a free port) [env: SWITCHBOARD_LISTEN]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Address of the HTTP admin listener (/metrics, /healthz), e.g. 127.0.0.1:7401 (default; port 0 picks a free port), or `off` [env: SWITCHBOARD_ADMIN_LISTEN]
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,

    /// Folder for the log and the message store; created if missing [env: SWITCHBOARD_DATA_DIR]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// TOML file with settings (same shape as --print-defaults) [env: SWITCHBOARD_CONFIG]
    // clap reads the variable, but its own note would print `[env: SWITCHBOARD_CONFIG=]` (the
    // value, empty when unset) in a paragraph of its own: the note is written above instead, in
    // the form of every other option.
    #[arg(long, value_name = "FILE", env = "SWITCHBOARD_CONFIG", hide_env = true)]
    config: Option<PathBuf>,

    /// This node's raft id [env: SWITCHBOARD_NODE_ID]
    #[arg(long, value_name = "ID")]
    node_id: Option<u64>,

    /// When to acknowledge: `always` after fdatasync (default), or `periodic` [env: SWITCHBOARD_DURABILITY_FSYNC]
    #[arg(long, value_name = "POLICY")]
    fsync: Option<String>,

    /// Largest accepted payload in bytes (default 65536) [env: SWITCHBOARD_LIMITS_MAX_PAYLOAD_BYTES]
    #[arg(long, value_name = "BYTES")]
    max_payload_bytes: Option<usize>,

    /// Log format: text or json [env: SWITCHBOARD_LOG_FORMAT]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,

    /// Log filter, e.g. info or switchboard_broker=debug [env: SWITCHBOARD_LOG_LEVEL; RUST_LOG wins]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// Print the configuration in force (after every layer) as TOML, and exit
    #[arg(long)]
    print_config: bool,

    /// Print the embedded default configuration, with a comment on every setting, and exit
    #[arg(long)]
    print_defaults: bool,

    /// Ask the running broker's admin listener (from the same settings) for /healthz and exit 0
    /// if it answers 200, 1 otherwise: the health check of the scratch container image, which has
    /// no shell or curl
    #[arg(long)]
    healthcheck: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a client secret for the token endpoint and print it with its argon2id hash: the hash
    /// goes in `[[auth.token_endpoint.clients]]` as `secret_hash`, the secret to the client only
    /// (the broker never stores it). With --stdin, hash a secret read from standard input instead.
    HashSecret {
        /// Hash the secret given on standard input (one line) rather than making a new one
        #[arg(long)]
        stdin: bool,
    },
}

/// `switchboard hash-secret`.
fn hash_secret(from_stdin: bool) -> ExitCode {
    use switchboard_broker::run::{generate_client_secret, hash_client_secret};
    let secret = if from_stdin {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("error: cannot read the secret from standard input: {e}");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        match generate_client_secret() {
            Ok(secret) => secret,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    match hash_client_secret(&secret) {
        Ok(hash) => {
            if !from_stdin {
                println!("secret = \"{secret}\"   # for the client only; not stored by the broker");
            }
            println!("secret_hash = \"{hash}\"");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

const AFTER_HELP: &str = "\
Examples:
  switchboard                                   # single node on 127.0.0.1:7400, data in ./data
  switchboard --listen 127.0.0.1:0 --data-dir /tmp/sb   # any free port; the address is printed
  SWITCHBOARD_RETENTION_MAX_AGE=1d switchboard  # keep messages one day at most
  switchboard --config switchboard.toml --print-config  # check what a file changes
  switchboard --admin-listen off                # no HTTP admin listener (/metrics, /healthz)
  SWITCHBOARD_LIMITS_MAX_CONNECTIONS_PER_ADDRESS=10000 switchboard   # behind a TCP load balancer
  switchboard hash-secret                       # a token-endpoint client secret and its hash
  SWITCHBOARD_AUTH_HS256_SECRET_FILE=/etc/sb/hs256 SWITCHBOARD_TLS_CERT_FILE=cert.pem \\
    SWITCHBOARD_TLS_KEY_FILE=key.pem switchboard --listen 0.0.0.0:7400   # tokens + TLS (docs/SECURITY.md)

On start the broker prints `listening on ADDR` to stdout once it accepts requests, then
`admin listening on ADDR` when the admin listener is on (curl http://ADDR/metrics).
Logs go to stderr. SIGTERM or Ctrl-C stops it gracefully: streams end, in-flight publishes are
acknowledged, the stores are synced, and it exits 0.

Connections: at most limits.max_connections (10000) open, and limits.max_connections_per_address
(256) from one source address; a new one must send its opening (the HTTP/2 preface) within
limits.handshake_timeout (10s). At start the soft open-file limit (nofile) is raised to the hard
one, with a warning if that is below max_connections + 256.

Memory for clients that stop reading is bounded broker-wide: bytes waiting for their sockets by
limits.max_send_buffer_bytes (256 MiB; past it a connection holding more than 256 KiB gets no
more data until its socket takes some, and past three quarters of it connections that took
nothing for limits.stalled_connection_timeout (2s) are closed), and messages read back from the
store for subscriptions that fell behind by subscriptions.catch_up_bytes (128 MiB). docs/FLOW.md.

Talk to it with `sb` (the switchboard-cli crate: cargo build --release --bin sb): sb publish, sb subscribe, sb history, sb info.";

impl Args {
    fn overrides(&self) -> FlagOverrides {
        let mut flags: FlagOverrides = Vec::new();
        if let Some(v) = &self.listen {
            flags.push(("listen", v.clone()));
        }
        if let Some(v) = &self.admin_listen {
            flags.push(("admin_listen", v.clone()));
        }
        if let Some(v) = &self.data_dir {
            flags.push(("data_dir", v.display().to_string()));
        }
        if let Some(v) = self.node_id {
            flags.push(("node_id", v.to_string()));
        }
        if let Some(v) = &self.fsync {
            flags.push(("durability.fsync", v.clone()));
        }
        if let Some(v) = self.max_payload_bytes {
            flags.push(("limits.max_payload_bytes", v.to_string()));
        }
        if let Some(v) = &self.log_format {
            flags.push(("log.format", v.clone()));
        }
        if let Some(v) = &self.log_level {
            flags.push(("log.level", v.clone()));
        }
        flags
    }
}

/// Installs logging, and trace export when configured. Runs inside the runtime: the OTLP
/// exporter's gRPC client needs it.
fn init_observability(config: &Config) -> anyhow::Result<Option<run::Export>> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&config.log.level));
    let otlp = config.tracing.otlp(|name| std::env::var(name).ok());
    let export =
        run::install_subscriber(filter, config.log.format == LogFormat::Json, otlp.as_ref())?;
    if let Some(otlp) = &otlp {
        tracing::info!(endpoint = %otlp.endpoint, service = %otlp.service_name, "exporting traces over OTLP");
    }
    Ok(export)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::HashSecret { stdin }) = args.command {
        return hash_secret(stdin);
    }
    if args.print_defaults {
        print!("{}", config::DEFAULT_CONFIG_TOML);
        return ExitCode::SUCCESS;
    }
    let (config, unknown_env) =
        match Config::load(args.config.as_deref(), std::env::vars(), &args.overrides()) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
    if args.healthcheck {
        let timeout = std::time::Duration::from_secs(3);
        return match run::probe(config.admin_listen.addr(), timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.print_config {
        return match config.to_toml() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let export = match runtime.block_on(async { init_observability(&config) }) {
        Ok(export) => export,
        Err(e) => {
            eprintln!("error: cannot set up tracing: {e:#}");
            return ExitCode::from(2);
        }
    };
    for name in unknown_env {
        tracing::warn!(variable = %name, "ignoring an environment variable that matches no setting (see --print-defaults)");
    }
    let result = runtime.block_on(run(config));
    if let Some(export) = export {
        runtime.block_on(async {
            tokio::task::spawn_blocking(move || export.shutdown())
                .await
                .ok()
        });
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let remote = !config.listen.ip().is_loopback();
    if remote && !config.auth.enabled() {
        tracing::warn!(
            listen = %config.listen,
            "listening beyond loopback with no authentication: anyone who can reach this address can publish and read"
        );
    }
    if remote && config.auth.enabled() && !config.tls.enabled() {
        tracing::warn!(
            listen = %config.listen,
            "listening beyond loopback without TLS: bearer tokens and messages cross the network in clear text (set tls.cert_file and tls.key_file)"
        );
    }
    tracing::info!(
        authentication = config.auth.enabled(),
        tls = config.tls.enabled(),
        mutual_tls = !config.tls.client_ca_file.as_os_str().is_empty(),
        origins = config.origins.allow.len(),
        "security"
    );
    if let Some(admin) = config.admin_listen.addr() {
        if !admin.ip().is_loopback() {
            tracing::warn!(
                admin_listen = %admin,
                "admin listener beyond loopback with no authentication: anyone who can reach it can read metrics (subscription patterns included)"
            );
        }
    }
    tracing::info!(
        listen = %config.listen,
        admin_listen = %config.admin_listen,
        data_dir = %config.data_dir.display(),
        fsync = ?config.durability.fsync,
        "starting"
    );
    // Before the address is announced: a SIGTERM from then on must stop the broker gracefully.
    let signal = shutdown::os_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
    // Every connection is a descriptor: the soft limit is often far below what the hard one allows.
    run::raise_open_file_limit(config.limits.max_connections);
    let broker = Broker::start(config).await?;
    // The lines on stdout: scripts and tests read the bound addresses here.
    println!("listening on {}", broker.local_addr);
    if let Some(admin) = broker.admin_addr {
        println!("admin listening on {admin}");
    }
    if let Some(raft) = broker.raft_addr {
        println!("raft listening on {raft}");
    }
    let admin = broker
        .admin_addr
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(addr = %broker.local_addr, %admin, "accepting requests");
    tokio::select! {
        () = signal => tracing::info!("shutting down"),
        why = broker.fatal_error() => tracing::error!(error = %why, "shutting down after a fatal error"),
    }
    broker.shutdown();
    broker.wait().await
}
