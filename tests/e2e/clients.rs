//! Clients in other languages against a real broker: the Go example (`clients/go-example`),
//! generated from `proto/` and built with Debian's Go packages by `clients/go-example/build.sh`.
//! The test runs the binary `SWITCHBOARD_GO_EXAMPLE` names; `.ci/run` builds it and sets that.
//! Skipped with a message when unset, so `cargo test` needs no Go toolchain on a developer's
//! machine.

use std::process::Command;

use switchboard_client::HistoryQuery;

use crate::common::{fixture, payload_text};

#[tokio::test]
async fn the_go_example_publishes_reads_back_and_decodes_a_refusal() {
    let Some(binary) = std::env::var_os("SWITCHBOARD_GO_EXAMPLE") else {
        eprintln!(
            "SKIPPED the Go example: SWITCHBOARD_GO_EXAMPLE is unset \
             (clients/go-example/build.sh prints the path to set it to)"
        );
        return;
    };
    let fx = fixture(&[]).await;
    let output = Command::new(&binary)
        .args([
            "-addr",
            &fx.broker.addr.to_string(),
            "-channel",
            "examples.go.e2e",
        ])
        .output()
        .expect("the Go example runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Go example failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // It read back its own message through a Go subscription...
    assert!(
        stdout.contains(r#"received offset 1 on examples.go.e2e: {"hello":"from Go"}"#),
        "{stdout}"
    );
    // ...read the refusal's reason from ErrorInfo and mapped it to the generated enum...
    assert!(
        stdout.contains("reason CHANNEL_INVALID (ERROR_REASON_CHANNEL_INVALID)"),
        "{stdout}"
    );
    // ...and the broker stored exactly what Go published.
    let page = fx
        .client
        .history(HistoryQuery::new("examples.go.e2e"))
        .await
        .expect("history");
    let stored: Vec<String> = page.messages.iter().map(payload_text).collect();
    assert_eq!(stored, [r#"{"hello":"from Go"}"#]);
}
