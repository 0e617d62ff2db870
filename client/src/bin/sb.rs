//! `sb`: the Switchboard command line. Publishes, subscribes, reads history and describes the
//! broker, printing one JSON object per line on stdout.
//!
//! Layout: this file holds the argument definitions and the commands; `sb/args.rs` parses
//! argument values (`--from`, `--to`, `--header`); `sb/output.rs` formats the JSON lines.

#[path = "sb/args.rs"]
mod args;
#[path = "sb/output.rs"]
mod output;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use switchboard_client::{Client, HistoryQuery, Publish, Start};
use tokio::time::Instant;

use crate::args::End;

const EXAMPLES: &str = "\
Examples:
  sb publish crm.contact.updated '{\"id\":42}'
  echo '{\"id\":42}' | sb publish crm.contact.updated --ttl 30s --header traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
  sb subscribe 'crm.*.updated' --from earliest --count 10
  sb subscribe 'telemetry.>' --from 2024-05-01T12:00:00Z --timeout 30s
  sb history 'crm.>' --from 100 --to 200 --limit 50
  SWITCHBOARD_URL=http://10.0.0.5:7400 sb info

Output is one JSON object per line on stdout. Errors go to stderr as `error: CODE REASON: message`
(for example `error: INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty`); the exit
status is 1 for errors and 2 for usage errors.

Set SB_LOG (for example SB_LOG=debug) to see the client's logs on stderr; by default only warnings
(such as a subscription resuming after a lost connection) are shown.";

/// Publish to, subscribe to, and read from a Switchboard broker.
///
/// Channels are dot-separated names such as `crm.contact.updated`; patterns may use `*` for one
/// segment and, as the last segment, `>` for one or more (`crm.*.updated`, `telemetry.>`).
#[derive(Debug, Parser)]
#[command(name = "sb", version, after_help = EXAMPLES)]
struct Cli {
    /// The broker's gRPC URL; a bare `host:port` means `http://host:port`.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_URL",
        default_value = "http://127.0.0.1:7400",
        value_name = "URL"
    )]
    server: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one message and print its ack.
    #[command(after_help = "\
Prints the ack as one line: {\"offset\":N,\"publish_time\":\"2024-05-01T12:00:00.250Z\",\"correlation_id\":\"...\"}

The payload is sent byte for byte (a trailing newline read from stdin is kept). Unless
--content-type says otherwise it is JSON and must parse as JSON.

Examples:
  sb publish crm.contact.updated '{\"id\":42}' --idempotency-key contact-42-v7
  sb publish telemetry.widget.click - --ttl 500ms < event.json
  printf 'raw' | sb publish files.blob.stored --content-type application/octet-stream")]
    Publish(PublishArgs),

    /// Follow the messages matching a pattern, one JSON line per delivery.
    #[command(after_help = "\
Prints one line per delivered message: offset, channel, publish_time (RFC 3339, UTC, millis),
correlation_id, causation_id and idempotency_key (left out when empty), content_type,
schema_version, ttl_ms, expires_at (left out when there is no TTL), headers (an object), payload
and payload_encoding (\"utf8\": the payload as a string; \"base64\": standard base64 of the bytes).
Each line is flushed as it is written.

Once the broker confirms the subscription, `sb: subscribed to PATTERN (next offset N)` is written
to stderr: anything published after that line is delivered. A lost connection is resumed where it
left off, with no gap and no duplicate.

--from takes `earliest`, `latest`, an offset (a message's `offset` field, 1 and up), or an RFC 3339
time such as 2024-05-01T12:00:00Z or 2024-05-01T14:00:00.250+02:00.

Exits with status 0 after --count deliveries or when --timeout has passed (whichever comes first),
and runs until interrupted otherwise.

Examples:
  sb subscribe 'crm.*.updated'
  sb subscribe 'telemetry.>' --from earliest --count 100 --timeout 10s
  sb subscribe orders.created --from 2024-05-01T12:00:00Z")]
    Subscribe(SubscribeArgs),

    /// Read stored messages matching a pattern, one JSON line per message.
    #[command(after_help = "\
Prints stored, unexpired messages in offset order, in the same line format as `sb subscribe`,
paging through the broker's results until --limit messages were printed or the range ends.

--from takes `earliest`, an offset or an RFC 3339 time (2024-05-01T12:00:00Z); --to takes an
offset or a time; both bounds are inclusive.

Examples:
  sb history 'crm.>'
  sb history 'crm.>' --from 100 --to 200
  sb history 'telemetry.>' --from 2024-05-01T12:00:00Z --to 2024-05-01T13:00:00Z --limit 0")]
    History(HistoryArgs),

    /// Describe the broker node: version, node and leader ids, offsets, sizes, raft term.
    #[command(after_help = "\
Prints one line: {\"version\":\"0.1.0\",\"node_id\":1,\"last_offset\":N,\"first_offset\":N,
\"stored_bytes\":N,\"disk_bytes\":N,\"leader_id\":1,\"term\":N,\"applied_index\":N}")]
    Info,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The channel, for example `crm.contact.updated`.
    channel: String,

    /// The payload, as a string; `-` or nothing reads it from stdin to its end.
    #[arg(value_name = "DATA|-")]
    data: Option<String>,

    /// Time to live, for example `30s`, `500ms`, `2h 30m`; none by default.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,

    /// Correlation id (a UUID); the broker generates one when absent.
    #[arg(long, value_name = "UUID")]
    correlation_id: Option<String>,

    /// The id of the message that caused this one.
    #[arg(long, value_name = "ID")]
    causation_id: Option<String>,

    /// A key identifying this logical message across retries.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,

    /// A header, `NAME=VALUE`; repeat for several (a repeated name keeps the last value).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = args::parse_header)]
    headers: Vec<(String, String)>,

    /// The payload's media type; `application/json` by default.
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,

    /// The payload's schema version (semver); `1.0.0` by default.
    #[arg(long, value_name = "SEMVER")]
    schema_version: Option<String>,
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    /// The channel pattern, for example `crm.*.updated` or `telemetry.>`.
    pattern: String,

    /// Where to start: earliest, latest, an offset, or an RFC 3339 time.
    #[arg(long, value_name = "POSITION", default_value = "latest", value_parser = args::parse_start)]
    from: Start,

    /// Exit (status 0) after this many deliveries.
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Exit (status 0) once this long has passed since `sb` started, for example `10s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// The channel pattern, for example `crm.>`.
    pattern: String,

    /// The first position to read (inclusive): earliest, an offset, or an RFC 3339 time.
    #[arg(long, value_name = "POSITION", default_value = "earliest", value_parser = args::parse_history_start)]
    from: Start,

    /// The last position to read (inclusive): an offset or an RFC 3339 time.
    #[arg(long, value_name = "POSITION", value_parser = args::parse_end)]
    to: Option<End>,

    /// The most messages to print; 0 for no limit.
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`sb subscribe ... | head -1`): not an error of ours.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let client = Client::connect(cli.server).await?;
    match cli.command {
        Command::Publish(args) => publish(&client, args).await,
        Command::Subscribe(args) => subscribe(&client, args, started).await,
        Command::History(args) => history(&client, args).await,
        Command::Info => {
            let info = client.info().await?;
            emit(&output::info_line(&info)?)
        }
    }
}

/// Writes one line to stdout and flushes it, so a reader on a pipe sees it at once.
fn emit(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

async fn publish(client: &Client, args: PublishArgs) -> anyhow::Result<()> {
    let payload = match args.data {
        Some(data) if data != "-" => data.into_bytes(),
        _ => {
            let read = tokio::task::spawn_blocking(|| {
                let mut payload = Vec::new();
                std::io::stdin()
                    .lock()
                    .read_to_end(&mut payload)
                    .map(|_| payload)
            });
            let payload = read
                .await
                .context("reading the payload from stdin")?
                .context("reading the payload from stdin")?;
            payload
        }
    };
    let mut message = Publish::new(args.channel, payload).headers(args.headers);
    if let Some(ttl) = args.ttl {
        message = message.ttl(ttl);
    }
    if let Some(correlation_id) = args.correlation_id {
        message = message.correlation_id(correlation_id);
    }
    if let Some(causation_id) = args.causation_id {
        message = message.causation_id(causation_id);
    }
    if let Some(idempotency_key) = args.idempotency_key {
        message = message.idempotency_key(idempotency_key);
    }
    if let Some(content_type) = args.content_type {
        message = message.content_type(content_type);
    }
    if let Some(schema_version) = args.schema_version {
        message = message.schema_version(schema_version);
    }
    let ack = client.publish(message).await?;
    emit(&output::ack_line(&ack)?)
}

async fn subscribe(client: &Client, args: SubscribeArgs, started: Instant) -> anyhow::Result<()> {
    let deadline = args.timeout.map(|timeout| started + timeout);
    let Some(subscribed) =
        until(deadline, client.subscribe(args.pattern.as_str(), args.from)).await
    else {
        return Ok(());
    };
    let mut subscription = subscribed?;
    match subscription.next_offset() {
        Some(next) => eprintln!(
            "sb: subscribed to {} (next offset {next})",
            subscription.pattern()
        ),
        None => eprintln!("sb: subscribed to {}", subscription.pattern()),
    }
    let mut delivered: u64 = 0;
    while args.count.is_none_or(|count| delivered < count) {
        let Some(next) = until(deadline, subscription.next()).await else {
            return Ok(());
        };
        match next {
            Some(Ok(message)) => {
                emit(&output::message_line(&message)?)?;
                delivered += 1;
            }
            Some(Err(error)) => return Err(error.into()),
            None => anyhow::bail!("the subscription ended unexpectedly"),
        }
    }
    Ok(())
}

/// Runs `future` to completion, or until `deadline` (then `None`).
async fn until<F: std::future::Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

async fn history(client: &Client, args: HistoryArgs) -> anyhow::Result<()> {
    let mut query = HistoryQuery::new(args.pattern).from(args.from);
    match args.to {
        Some(End::Offset(offset)) => query = query.to_offset(offset),
        Some(End::Time(time)) => query = query.to_time(time),
        None => {}
    }
    let mut remaining = if args.limit == 0 {
        u64::MAX
    } else {
        args.limit
    };
    let mut next = Some(query);
    while let Some(query) = next.take() {
        if remaining == 0 {
            break;
        }
        let query = query.limit(u32::try_from(remaining.min(1000)).unwrap_or(1000));
        let page = client.history(query.clone()).await?;
        for message in &page.messages {
            if remaining == 0 {
                break;
            }
            emit(&output::message_line(message)?)?;
            remaining -= 1;
        }
        next = page.next_query(&query);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn publish_arguments() {
        let cli = Cli::try_parse_from([
            "sb",
            "--server",
            "broker:7400",
            "publish",
            "a.b",
            "{}",
            "--ttl",
            "500ms",
            "--header",
            "k=v",
            "--header",
            "x=y=z",
            "--idempotency-key",
            "key",
        ])
        .unwrap();
        assert_eq!(cli.server, "broker:7400");
        let Command::Publish(args) = cli.command else {
            panic!("not publish")
        };
        assert_eq!(args.channel, "a.b");
        assert_eq!(args.data.as_deref(), Some("{}"));
        assert_eq!(args.ttl, Some(Duration::from_millis(500)));
        assert_eq!(
            args.headers,
            [
                ("k".to_owned(), "v".to_owned()),
                ("x".to_owned(), "y=z".to_owned())
            ]
        );
        assert_eq!(args.idempotency_key.as_deref(), Some("key"));
    }

    #[test]
    fn subscribe_and_history_defaults() {
        let cli = Cli::try_parse_from(["sb", "subscribe", "a.>"]).unwrap();
        let Command::Subscribe(args) = cli.command else {
            panic!("not subscribe")
        };
        assert_eq!(args.from, Start::Latest);
        assert_eq!((args.count, args.timeout), (None, None));

        let cli = Cli::try_parse_from(["sb", "history", "a.>", "--to", "9"]).unwrap();
        let Command::History(args) = cli.command else {
            panic!("not history")
        };
        assert_eq!(args.from, Start::Earliest);
        assert_eq!(args.to, Some(End::Offset(9)));
        assert_eq!(args.limit, 100);
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["sb", "history", "a.>", "--from", "latest"][..],
            &["sb", "subscribe", "a.>", "--from", "soon"],
            &["sb", "publish", "a.b", "x", "--header", "novalue"],
            &["sb", "publish", "a.b", "x", "--ttl", "forever"],
            &["sb", "subscribe"],
        ] {
            let error = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }
}
