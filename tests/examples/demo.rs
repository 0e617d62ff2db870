//! Runs the two-panel demo (web/demo): a broker with `web/demo/switchboard.toml`, the CRM panel
//! served on http://localhost:8081 and the telephony panel on http://localhost:8082 - two origins,
//! both on the broker's allow-list. Ctrl-C stops everything.
//!
//! ```sh
//! cargo build -p switchboard-broker && cargo run -p switchboard-e2e --example demo
//! ```
// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use anyhow::{Context, Result};
use switchboard_e2e::web::{demo_dir, serve_dir};

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
    println!("CRM panel:       http://localhost:{}/crm.html", crm.port());
    println!(
        "telephony panel: http://localhost:{}/telephony.html",
        telephony.port()
    );
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
