//! The `switchboard` binary's command line: help that teaches, configuration layers, and precise
//! errors for bad settings. (Running brokers are tested end to end in `tests/`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn switchboard(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("switchboard runs")
}

#[test]
fn help_explains_defaults_layers_and_examples() {
    let out = switchboard(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "127.0.0.1:7400",
        "./data",
        "SWITCHBOARD_",
        "--config",
        "Examples:",
        "SIGTERM",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
}

/// Every option names its variable as `[env: NAME]`: no clap-rendered `NAME=value` (a stray `=`
/// when unset, a path when set), in the short help and the long one.
#[test]
fn help_names_environment_variables_without_values() {
    for flag in ["-h", "--help"] {
        let out = switchboard(
            &[flag],
            &[("SWITCHBOARD_CONFIG", "/etc/switchboard/secret.toml")],
        );
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains("[env: SWITCHBOARD_CONFIG]"),
            "{flag}:\n{help}"
        );
        assert!(!help.contains("SWITCHBOARD_CONFIG="), "{flag}:\n{help}");
        assert!(!help.contains("secret.toml"), "{flag}:\n{help}");
    }
}

#[test]
fn print_config_shows_every_layer_applied() {
    let out = switchboard(
        &["--print-config", "--listen", "127.0.0.1:9999"],
        &[
            ("SWITCHBOARD_RETENTION_MAX_AGE", "2h"),
            ("SWITCHBOARD_LISTEN", "127.0.0.1:1"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("max_age = \"2h\""), "{text}");
}

#[test]
fn print_defaults_is_the_commented_embedded_file() {
    let out = switchboard(&["--print-defaults"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("# When a publish is acknowledged"));
}

#[test]
fn bad_settings_fail_with_exit_2_and_name_the_setting() {
    let out = switchboard(
        &["--print-config"],
        &[("SWITCHBOARD_DURABILITY_FSYNC", "never")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("never"), "{err}");

    let out = switchboard(&["--print-config", "--listen", "not-an-address"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-address"));

    let out = switchboard(&["--config", "/nonexistent/switchboard.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchboard.toml"));
}

#[test]
fn a_non_loopback_address_without_auth_needs_an_explicit_setting() {
    let out = switchboard(&["--print-config", "--listen", "0.0.0.0:7400"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_unauthenticated_remote"), "{err}");

    let out = switchboard(
        &["--print-config", "--listen", "0.0.0.0:7400"],
        &[("SWITCHBOARD_ALLOW_UNAUTHENTICATED_REMOTE", "true")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
