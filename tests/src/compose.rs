//! The top-level `docker-compose.yml` as a test fixture: a three-node stack under its own project
//! name and host ports, with named fault helpers (kill -9 a node, start it again, restart it, wipe
//! its volume, cut it off from the others' raft traffic), torn down with its volumes when dropped.
//!
//! It needs a Docker engine, a compose tool (`docker compose` or Debian's `docker-compose`) and the
//! image built by `deploy/build-image.sh`; [`Stack::unavailable`] says what is missing so a test
//! can skip, and fail under CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The services of the stack, in node-id order (`sb1` is node 1).
pub const NODES: [&str; 3] = ["sb1", "sb2", "sb3"];

/// Every node service of the compose file, in node-id order: the three voters and the two of the
/// `replicas` profile ([`StackOptions::replicas`]), newcomers with no members until added.
pub const SERVICES: [&str; 5] = ["sb1", "sb2", "sb3", "sb4", "sb5"];

/// How long a node may take to become healthy after a start.
pub const HEALTHY_DEADLINE: Duration = Duration::from_secs(120);

/// The image the compose file runs (`SWITCHBOARD_IMAGE` overrides it, as in the file).
pub fn image() -> String {
    std::env::var("SWITCHBOARD_IMAGE").unwrap_or_else(|_| "switchboard:local".to_owned())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn compose_program() -> Option<Vec<&'static str>> {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("docker", &["compose", "version"]) {
        Some(vec!["docker", "compose"])
    } else if works("docker-compose", &["version"]) {
        Some(vec!["docker-compose"])
    } else {
        None
    }
}

/// How a test wants the stack changed from the plain `docker-compose.yml`; applied through a
/// generated override file, so the file users run stays the one under test.
#[derive(Clone, Debug, Default)]
pub struct StackOptions {
    /// Put raft traffic (replication, votes, forwarded writes) on a network of its own, `raft`,
    /// where node `sbN` is known only as `sbN-raft`. [`Stack::partition`] then cuts a node off
    /// from its peers while its published client port, which lives on the default network, keeps
    /// answering — so a test can watch what a cut-off node tells its clients.
    pub separate_raft_network: bool,
    /// Extra `SWITCHBOARD_*` settings for every node, e.g. a low snapshot threshold.
    pub env: Vec<(String, String)>,
    /// Run `docker-compose.secure.yml` over the plain file (TLS, mutual TLS between nodes,
    /// tokens), with the secrets `deploy/secure/make-secrets.sh` wrote into this folder.
    pub secrets: Option<PathBuf>,
    /// Turn on the compose file's `replicas` profile, so a test can start `sb4` and `sb5` by name
    /// ([`Stack::start_service`]); `up` still starts only the three voters (not the profile's
    /// one-shot join services, which would add the newcomers as replicas by themselves).
    pub replicas: bool,
    /// Start the `replicas` profile the way its users do (`docker compose --profile replicas up
    /// -d`): `sb4` and `sb5` and the one-shot `sb4-join` and `sb5-join`, which add them as replicas
    /// through `sb1`. [`Stack::up_with`] then also waits until `sb4` and `sb5` are healthy, which a
    /// newcomer is only once it was added and knows the leader. Turns the profile on, as
    /// [`StackOptions::replicas`] does.
    pub joined_replicas: bool,
}

impl StackOptions {
    fn override_yaml(&self) -> Option<String> {
        if !self.separate_raft_network && self.env.is_empty() {
            return None;
        }
        let mut yaml = String::from("services:\n");
        for node in NODES {
            yaml.push_str(&format!("  {node}:\n    environment:\n"));
            for (key, value) in &self.env {
                yaml.push_str(&format!("      {key}: {value:?}\n"));
            }
            if self.separate_raft_network {
                let members: Vec<String> = NODES
                    .iter()
                    .map(|n| format!("{}={n}-raft:7402", &n[2..]))
                    .collect();
                yaml.push_str(&format!(
                    "      SWITCHBOARD_CLUSTER_ADVERTISE: \"{node}-raft:7402\"\n      \
                     SWITCHBOARD_CLUSTER_MEMBERS: \"{}\"\n    networks:\n      default: {{}}\n      \
                     raft:\n        aliases: [\"{node}-raft\"]\n",
                    members.join(",")
                ));
            }
        }
        if self.separate_raft_network {
            // Internal: no gateway, so the default network keeps carrying the published ports.
            yaml.push_str("networks:\n  raft:\n    internal: true\n");
        }
        Some(yaml)
    }
}

/// A running stack.
pub struct Stack {
    project: String,
    compose: Vec<&'static str>,
    /// Host ports of each node's public listener, by node index (0 = sb1, 3 = sb4), for every
    /// service in [`SERVICES`].
    pub public_ports: [u16; 5],
    admin_ports: [u16; 5],
    /// The generated override file, if any; removed with the stack.
    override_file: Option<tempfile::NamedTempFile>,
    /// The secrets folder of a secured stack.
    secrets: Option<PathBuf>,
    /// Whether the `replicas` profile is on.
    replicas: bool,
}

impl Stack {
    /// Why a stack cannot run here, or `None` when it can.
    pub fn unavailable() -> Option<String> {
        let engine = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output();
        if !engine.is_ok_and(|o| o.status.success()) {
            return Some("no Docker engine".into());
        }
        if compose_program().is_none() {
            return Some("no compose tool (docker compose or docker-compose)".into());
        }
        let image = image();
        let present = Command::new("docker")
            .args(["image", "inspect", &image])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            return Some(format!(
                "no image {image}: build it with deploy/build-image.sh"
            ));
        }
        None
    }

    /// Starts the stack as project `name` (on free host ports) and waits until every node is
    /// healthy.
    ///
    /// # Errors
    /// Compose fails, or a node is not healthy within [`HEALTHY_DEADLINE`].
    pub fn up(name: &str) -> Result<Stack> {
        Stack::up_with(name, &StackOptions::default())
    }

    /// [`Stack::up`] with the changes in `options`.
    ///
    /// # Errors
    /// As [`Stack::up`], or the override file cannot be written.
    pub fn up_with(name: &str, options: &StackOptions) -> Result<Stack> {
        let compose = compose_program().context("no compose tool")?;
        let mut attempt = 1;
        loop {
            let override_file = match options.override_yaml() {
                Some(yaml) => {
                    let mut file = tempfile::Builder::new()
                        .prefix("switchboard-fault-")
                        .suffix(".yml")
                        .tempfile()?;
                    std::io::Write::write_all(&mut file, yaml.as_bytes())?;
                    Some(file)
                }
                None => None,
            };
            let ports = free_ports()?;
            let stack = Stack {
                project: format!("{name}-{}", std::process::id()),
                compose: compose.clone(),
                public_ports: [ports[0], ports[1], ports[2], ports[3], ports[4]],
                admin_ports: [ports[5], ports[6], ports[7], ports[8], ports[9]],
                override_file,
                secrets: options.secrets.clone(),
                replicas: options.replicas || options.joined_replicas,
            };
            let mut up = vec!["up", "-d"];
            if options.replicas && !options.joined_replicas {
                // Named, so the profile's services stay down until a test starts them.
                up.extend(NODES);
            }
            match stack.compose(&up) {
                Ok(_) => {}
                // A port found free here can be taken before Docker binds it (by another process,
                // or as some connection's ephemeral port): start over on other ports. The failed
                // stack is taken down when it is dropped.
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && e.to_string().contains("port is already allocated") =>
                {
                    eprintln!("{name}: a host port was taken before compose bound it; retrying on other ports");
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let started: &[&str] = if options.joined_replicas {
                &SERVICES
            } else {
                &NODES
            };
            for node in started {
                stack.wait_healthy(node)?;
            }
            return Ok(stack);
        }
    }

    /// The gRPC URL of node `index` (0 = sb1) on the host: `https://localhost:…` (the name its
    /// certificate carries) for a secured stack.
    pub fn url(&self, index: usize) -> String {
        match self.secrets {
            Some(_) => format!("https://localhost:{}", self.public_ports[index]),
            None => format!("http://127.0.0.1:{}", self.public_ports[index]),
        }
    }

    /// Makes the secrets of a secured stack into `dir` with `deploy/secure/make-secrets.sh`.
    ///
    /// # Errors
    /// The script fails.
    pub fn make_secrets(dir: &Path) -> Result<()> {
        let output = Command::new("bash")
            .arg(repo_root().join("deploy/secure/make-secrets.sh"))
            .arg(dir)
            .env("SWITCHBOARD_IMAGE", image())
            .output()
            .context("cannot run make-secrets.sh")?;
        if !output.status.success() {
            bail!(
                "make-secrets.sh failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Runs the compose tool on this project with `args`.
    ///
    /// # Errors
    /// It cannot run or exits non-zero (its stderr is in the error).
    pub fn compose(&self, args: &[&str]) -> Result<Output> {
        let (program, first) = self
            .compose
            .split_first()
            .ok_or_else(|| anyhow!("no compose tool"))?;
        let mut command = Command::new(program);
        command
            .args(first)
            .arg("--project-name")
            .arg(&self.project)
            .arg("--file")
            .arg(repo_root().join("docker-compose.yml"));
        if let Some(secrets) = &self.secrets {
            command
                .arg("--file")
                .arg(repo_root().join("docker-compose.secure.yml"))
                .env("SWITCHBOARD_SECRETS", secrets);
        }
        if let Some(file) = &self.override_file {
            command.arg("--file").arg(file.path());
        }
        // The stack under test is the three voters unless the test asks for the profile: a
        // COMPOSE_PROFILES=replicas of the caller's shell would add sb4 and sb5 on their default
        // host ports.
        if self.replicas {
            command.args(["--profile", "replicas"]);
        }
        command
            .args(args)
            .current_dir(repo_root())
            .env_remove("COMPOSE_PROFILES");
        for (i, node) in SERVICES.iter().enumerate() {
            let n = &node[2..];
            command.env(
                format!("SB{n}_PUBLIC_PORT"),
                self.public_ports[i].to_string(),
            );
            command.env(format!("SB{n}_ADMIN_PORT"), self.admin_ports[i].to_string());
        }
        let output = command.output().context("cannot run compose")?;
        if !output.status.success() {
            bail!(
                "compose {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }

    fn container(&self, node: &str) -> Result<String> {
        let output = self.compose(&["ps", "-q", node])?;
        let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if id.is_empty() {
            bail!("no container for {node}");
        }
        Ok(id)
    }

    /// `kill -9` of a node's broker: no chance to flush or say goodbye.
    ///
    /// # Errors
    /// Docker fails.
    pub fn kill9(&self, node: &str) -> Result<()> {
        self.compose(&["kill", "-s", "SIGKILL", node]).map(|_| ())
    }

    /// Creates and starts a service that [`Stack::up_with`] left down (`sb4` or `sb5` with
    /// [`StackOptions::replicas`]), without its dependencies and without waiting: a newcomer is
    /// healthy only once it has been added to the cluster ([`Stack::wait_healthy`] then).
    ///
    /// # Errors
    /// Docker fails.
    pub fn start_service(&self, node: &str) -> Result<()> {
        self.compose(&["up", "-d", "--no-deps", node]).map(|_| ())
    }

    /// Starts a stopped or killed node again and waits until it is healthy.
    ///
    /// # Errors
    /// Docker fails, or the node is not healthy in time.
    pub fn start(&self, node: &str) -> Result<()> {
        self.compose(&["start", node])?;
        self.wait_healthy(node)
    }

    /// Restarts a node the polite way (SIGTERM, then start) and waits until it is healthy again.
    ///
    /// # Errors
    /// Docker fails, or the node is not healthy in time.
    pub fn restart(&self, node: &str) -> Result<()> {
        self.compose(&["restart", "--timeout", "20", node])?;
        self.wait_healthy(node)
    }

    /// Replaces a node's data with nothing: stops and removes its container, deletes its volume,
    /// and creates it again (same node id and members), then waits until it is healthy.
    ///
    /// # Errors
    /// Docker fails, or the node is not healthy in time.
    pub fn wipe(&self, node: &str) -> Result<()> {
        self.compose(&["rm", "--stop", "--force", node])?;
        self.docker(&["volume", "rm", &format!("{}_{node}-data", self.project)])?;
        self.compose(&["up", "-d", "--no-deps", node])?;
        self.wait_healthy(node)
    }

    /// Stops a node politely (SIGTERM) and leaves it stopped.
    ///
    /// # Errors
    /// Docker fails.
    pub fn stop(&self, node: &str) -> Result<()> {
        self.compose(&["stop", "--timeout", "20", node]).map(|_| ())
    }

    /// Where the node's data volume lives on the host (the engine is local here), to damage its
    /// files while the node is stopped.
    ///
    /// # Errors
    /// Docker fails.
    pub fn data_path(&self, node: &str) -> Result<PathBuf> {
        let volume = format!("{}_{node}-data", self.project);
        let output = Command::new("docker")
            .args(["volume", "inspect", "--format", "{{.Mountpoint}}", &volume])
            .output()?;
        if !output.status.success() {
            bail!(
                "cannot inspect {volume}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ))
    }

    /// Starts a node that is expected to refuse to start, and waits (with a deadline) until its
    /// broker has exited with an error at least once; returns its log (the reason it gave). The
    /// restart policy keeps retrying it until it is wiped.
    ///
    /// # Errors
    /// Docker fails, or the node is still running after [`HEALTHY_DEADLINE`].
    pub fn start_expecting_refusal(&self, node: &str) -> Result<String> {
        self.compose(&["start", node])?;
        let id = self.container(node)?;
        let deadline = Instant::now() + HEALTHY_DEADLINE;
        loop {
            let output = Command::new("docker")
                .args([
                    "inspect",
                    "--format",
                    "{{.State.ExitCode}} {{.RestartCount}} {{.State.Health.Status}}",
                    &id,
                ])
                .output()?;
            let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            let mut fields = state.split_whitespace();
            let exit_code = fields.next().unwrap_or("0");
            let restarts = fields.next().unwrap_or("0");
            if fields.next() == Some("healthy") {
                bail!("{node} started and is healthy: its damage went unnoticed");
            }
            if exit_code != "0" || restarts != "0" {
                let logs = Command::new("docker").args(["logs", &id]).output()?;
                return Ok(format!(
                    "{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                ));
            }
            if Instant::now() > deadline {
                bail!("{node} neither refused to start nor became healthy: {state}");
            }
            std::thread::park_timeout(Duration::from_millis(250));
        }
    }

    /// Cuts a node off from the other nodes' raft traffic (needs
    /// [`StackOptions::separate_raft_network`]); its client port keeps answering.
    ///
    /// # Errors
    /// Docker fails.
    pub fn partition(&self, node: &str) -> Result<()> {
        let id = self.container(node)?;
        self.docker(&["network", "disconnect", &self.raft_network(), &id])
    }

    /// Undoes [`Stack::partition`]: the node is on the raft network again under its raft name.
    ///
    /// # Errors
    /// Docker fails.
    pub fn heal(&self, node: &str) -> Result<()> {
        let id = self.container(node)?;
        let alias = format!("{node}-raft");
        self.docker(&[
            "network",
            "connect",
            "--alias",
            &alias,
            &self.raft_network(),
            &id,
        ])
    }

    fn raft_network(&self) -> String {
        format!("{}_raft", self.project)
    }

    fn docker(&self, args: &[&str]) -> Result<()> {
        let output = Command::new("docker").args(args).output()?;
        if !output.status.success() {
            bail!(
                "docker {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Waits (with a deadline) for the node's health check to pass.
    ///
    /// # Errors
    /// Not healthy within [`HEALTHY_DEADLINE`]; the error holds its last log lines.
    pub fn wait_healthy(&self, node: &str) -> Result<()> {
        let id = self.container(node)?;
        let deadline = Instant::now() + HEALTHY_DEADLINE;
        loop {
            let output = Command::new("docker")
                .args(["inspect", "--format", "{{.State.Health.Status}}", &id])
                .output()?;
            if String::from_utf8_lossy(&output.stdout).trim() == "healthy" {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = Command::new("docker")
                    .args(["logs", "--tail", "30", &id])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                bail!("{node} not healthy within {HEALTHY_DEADLINE:?}; its log:\n{logs}");
            }
            std::thread::park_timeout(Duration::from_millis(250));
        }
    }
}

/// Times [`Stack::up_with`] tries fresh host ports when one was taken before compose bound it.
const PORT_ATTEMPTS: u32 = 3;

/// Host ports already handed to a stack by this process. The kernel may give a port that was just
/// released to the next `bind(0)`, so two stacks starting side by side could otherwise be handed
/// the same one.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Ten loopback ports (a public and an admin one for each of [`SERVICES`]) free right now and
/// never handed out before by this process.
fn free_ports() -> Result<[u16; 10]> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut ports = [0u16; 10];
    // Held until all ten are chosen, so `bind(0)` cannot return the same port twice meanwhile.
    let mut held = Vec::new();
    let mut chosen = 0;
    while chosen < ports.len() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if handed.insert(port) {
            ports[chosen] = port;
            chosen += 1;
        }
        held.push(listener);
    }
    Ok(ports)
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "--volumes", "--timeout", "5"]);
    }
}
