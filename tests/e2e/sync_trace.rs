//! The acknowledgement follows a real sync, proven from the broker's own system calls.
//!
//! The broker runs under `strace`, which records, in the order they happened, every read and write
//! on its sockets, every write to its files and every fsync/fdatasync, each with the file or socket
//! it touched. For each acknowledged publish (sent one at a time, each payload carrying a unique
//! marker) the trace must show: the request read from the client's socket, then a write to one of
//! the raft log's segment files (`log/<first index>.seg`), then a sync of that file that returned
//! 0, and only then anything written back to the client that could carry the ack (see
//! `switchboard_e2e::strace`).
//!
//! The check is shown to bite: the same publishes against a broker with `--fsync periodic` (acks
//! before the sync) must fail it. Needs `strace` (`.ci/run` installs it); without it the tests say
//! so and pass, except under CI, where they fail.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use switchboard_client::{Client, Publish};
use switchboard_e2e::strace::{self, Proof, Violation};
use switchboard_e2e::BrokerProcess;

const PUBLISHES: usize = 20;

fn strace_available() -> bool {
    let found = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "strace is required under CI (.ci/run installs it)"
        );
        eprintln!("skipped: strace is not installed");
    }
    found
}

/// Runs a broker under strace with `extra` flags and `env`, publishes [`PUBLISHES`] messages one
/// at a time, stops the broker and checks the trace.
async fn publish_under_strace(
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<Result<Proof, Violation>> {
    let trace_path = dir.join("broker.strace");
    let wrapper: Vec<&OsStr> = [
        "strace",
        "-f",
        "-tt",
        "-yy",
        "-xx",
        "-s",
        "4096",
        "-e",
        "trace=read,readv,recvfrom,recvmsg,write,writev,sendto,sendmsg,pwrite64,pwritev,pwritev2,fdatasync,fsync",
        "-o",
    ]
    .iter()
    .map(OsStr::new)
    .chain([trace_path.as_os_str()])
    .collect();
    let mut args = vec!["--admin-listen", "off"];
    args.extend_from_slice(extra);
    let mut broker =
        BrokerProcess::start_wrapped(&wrapper, &dir.join("data"), "127.0.0.1:0", &args, env)
            .expect("broker starts under strace");
    let broker_pid = broker.wrapped_pid().expect("the broker runs under strace");
    // Whatever happens below, the broker must not outlive the test: killing strace alone would
    // detach it and leave it running.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = BrokerProcess::signal_pid(self.0, libc::SIGKILL);
        }
    }
    let _guard = KillOnDrop(broker_pid);

    let client = Client::connect(broker.url())
        .await
        .expect("client connects");
    // The first publish sets up the connection and the log; it is not checked.
    client
        .publish(Publish::new("proof.warmup", "{}"))
        .await
        .expect("warm-up publish");
    let mut markers = Vec::new();
    for i in 0..PUBLISHES {
        let marker = format!("ack-proof-{i:04}-{}", std::process::id());
        client
            .publish(Publish::new(
                "proof.acked",
                format!("{{\"marker\":\"{marker}\"}}"),
            ))
            .await
            .expect("acknowledged publish");
        markers.push(marker);
    }
    drop(client);

    // Stop the broker itself; strace exits with it and flushes the trace.
    BrokerProcess::signal_pid(broker_pid, libc::SIGTERM).expect("signal the broker");
    broker.wait_exit().expect("strace exits with the broker");
    let trace = std::fs::read_to_string(&trace_path).expect("trace written");
    let calls = strace::parse(&trace);
    strace::check_sync_before_answer(&calls, broker.addr.port(), ".seg", &markers)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_ack_is_written_after_the_log_file_is_synced() {
    if !strace_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let verdicts = publish_under_strace(dir.path(), &[], &[]).await;
    let violations: Vec<String> = verdicts
        .iter()
        .filter_map(|v| v.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        violations.is_empty(),
        "acks not proven to follow an fdatasync of the log:\n{}",
        violations.join("\n")
    );
    assert_eq!(verdicts.len(), PUBLISHES);
    for proof in verdicts.into_iter().flatten() {
        assert!(proof.request_read < proof.append && proof.append < proof.synced);
        assert!(proof.synced < proof.answer_written);
    }
}

/// The control: with `--fsync periodic` the broker acks once the entry is written and syncs on a
/// timer (here an hour away), so the same check must find acks with no sync before them.
#[tokio::test(flavor = "multi_thread")]
async fn the_check_catches_acks_sent_before_the_sync() {
    if !strace_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let verdicts = publish_under_strace(
        dir.path(),
        &["--fsync", "periodic"],
        &[("SWITCHBOARD_DURABILITY_SYNC_INTERVAL", "1h")],
    )
    .await;
    // Flagged for the right reason: the request and the ack were both found, the sync was not.
    let violations = verdicts
        .iter()
        .filter(|v| {
            v.as_ref()
                .is_err_and(|v| v.reason.contains("no write of the log file"))
        })
        .count();
    // Nothing else syncs the log's segments (no background sync of a storage engine), so every
    // ack is flagged.
    assert!(
        violations == PUBLISHES,
        "only {violations} of {PUBLISHES} acks flagged with periodic sync: {verdicts:?}"
    );
}
