//! Runs the browser demo (web/demo): a broker with `web/demo/switchboard.toml`, the CRM panel
//! served on http://localhost:8081, the telephony panel on http://localhost:8082 and the KPI page
//! on http://localhost:8083 - three origins, all on the broker's allow-list - after defining the
//! KPI views of `web/demo/kpis/` with `sb kpi define`. Ctrl-C stops everything.
//!
//! ```sh
//! cargo build -p switchboard-broker -p switchboard-cli && cargo run -p switchboard-e2e --example demo
//! ```
// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use switchboard_e2e::web::{demo_dir, serve_dir};

/// Defines every view of `web/demo/kpis/` (as `sb kpi define web/demo/kpis/*.toml` would), trying
/// again while the broker is starting. Defining a view again replaces it, so every start of the
/// demo does this.
fn define_views(server: &str) -> Result<()> {
    let mut files: Vec<_> = std::fs::read_dir(demo_dir().join("kpis"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    for file in files {
        loop {
            let output = Command::new(switchboard_e2e::sb_binary())
                .args(["--server", server, "kpi", "define"])
                .arg(&file)
                .output()
                .context("run sb (build it first: cargo build -p switchboard-cli)")?;
            if output.status.success() {
                println!("KPI view defined: {}", file.display());
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "sb kpi define {}: {}",
                    file.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let root = demo_dir().join("../..");
    let mut broker = Command::new(switchboard_e2e::broker_binary())
        .arg("--config")
        .arg(demo_dir().join("switchboard.toml"))
        .current_dir(&root)
        .spawn()
        .context("start the broker (build it first: cargo build -p switchboard-broker)")?;
    let crm = serve_dir(demo_dir(), "127.0.0.1:8081")?;
    let telephony = serve_dir(demo_dir(), "127.0.0.1:8082")?;
    let kpis = serve_dir(demo_dir(), "127.0.0.1:8083")?;
    define_views("127.0.0.1:7400")?;
    println!("CRM panel:       http://localhost:{}/crm.html", crm.port());
    println!(
        "telephony panel: http://localhost:{}/telephony.html",
        telephony.port()
    );
    println!("KPI page:        http://localhost:{}/kpi.html", kpis.port());
    println!("operator console: http://localhost:7401/console");
    let status = broker.wait()?;
    // Ctrl-C reaches the broker too (same process group), and it exits 0 after a graceful stop:
    // that is the demo's normal end, not an error. Anything else (a port already taken, say)
    // is.
    if status.success() {
        return Ok(());
    }
    anyhow::bail!("the broker stopped: {status}")
}
