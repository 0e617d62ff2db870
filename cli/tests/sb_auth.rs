//! `sb`'s security options against the client's mock broker that checks bearer tokens: a token
//! given as a flag or a file, `sb token` and client credentials, an expired token's hint, and
//! mutual TLS.
// The mock is written for the client's tests, and these use only part of it.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

include!("../../client/tests/support/auth_mock.rs");

/// Runs `sb` with these arguments (and no `SWITCHBOARD_*` from the environment); returns
/// (status, stdout, stderr).
async fn sb(args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sb"));
    command.args(args).env_remove("SB_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("SWITCHBOARD_") {
            command.env_remove(name);
        }
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_sends_the_token_given_as_flag_or_file() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let server = address.to_string();
    let (status, _, stderr) = sb(&["--server", &server, "--token", "eyJ.flag", "info"]).await;
    assert_eq!(status, 0, "{stderr}");

    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("token.jwt");
    std::fs::write(&file, "eyJ.file\n").unwrap();
    let file = file.to_str().unwrap();
    let (status, _, stderr) = sb(&["--server", &server, "--token-file", file, "info"]).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        mock.authorizations("Info"),
        [
            Some("Bearer eyJ.flag".to_owned()),
            Some("Bearer eyJ.file".to_owned())
        ]
    );

    let (status, _, stderr) = sb(&[
        "--server",
        &server,
        "--token",
        "a",
        "--token-file",
        file,
        "info",
    ])
    .await;
    assert_eq!(status, 1);
    assert!(
        stderr.contains("choose one way to authenticate"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_token_prints_the_token_and_its_scope_and_sb_uses_client_credentials() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let server = address.to_string();
    let credentials = [
        "--server",
        &server,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
    ];
    let (status, stdout, stderr) =
        sb(&[&credentials[..], &["token", "--ttl", "5m"]].concat()).await;
    assert_eq!(status, 0, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["access_token"], "token-1");
    assert_eq!(line["token_type"], "Bearer");
    assert_eq!(line["expires_in_seconds"], 900);
    assert!(
        line["expires_at"].as_str().unwrap().ends_with('Z'),
        "{line}"
    );
    assert_eq!(line["scope"]["publish"], serde_json::json!(["crm.>"]));
    assert_eq!(line["scope"]["entity_read"], serde_json::json!(["contact"]));

    let (status, stdout, _) = sb(&[&credentials[..], &["token", "--raw"]].concat()).await;
    assert_eq!((status, stdout.as_str()), (0, "token-2\n"));

    let (status, _, stderr) = sb(&[&credentials[..], &["info"]].concat()).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(mock.authorizations("Info"), [bearer(3)]);
    assert_eq!(mock.authorizations("IssueToken"), [None, None, None]);

    let (status, _, stderr) = sb(&[
        "--server",
        &server,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        "wrong",
        "info",
    ])
    .await;
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with(
            "error: UNAUTHENTICATED INVALID_CLIENT: unknown client or wrong secret\n\
             hint: check --client-id and --client-secret"
        ),
        "{stderr}"
    );

    let (status, _, stderr) = sb(&["--server", &server, "token"]).await;
    assert_eq!(status, 1);
    assert!(stderr.contains("sb token needs --client-id"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_reports_an_expired_token_with_a_hint() {
    let mock = Mock::default();
    mock.expire("eyJ.old");
    let address = serve(mock.clone(), None).await;
    let (status, _, stderr) = sb(&[
        "--server",
        &address.to_string(),
        "--token",
        "eyJ.old",
        "info",
    ])
    .await;
    assert_eq!(status, 1);
    let mut lines = stderr.lines();
    assert_eq!(
        lines.next(),
        Some("error: UNAUTHENTICATED TOKEN_EXPIRED: the token expired at 2026-01-01T00:00:00Z")
    );
    assert!(lines
        .next()
        .unwrap()
        .starts_with("hint: the token has expired"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_connects_over_mutual_tls() {
    let pki = Pki::new();
    let mock = Mock::default();
    let address = serve(mock.clone(), Some(pki.server_tls())).await;
    let folder = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = folder.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca = write("ca.pem", &pki.ca);
    let cert = write("client.pem", &pki.client_certificate);
    let key = write("client.key", &pki.client_key);
    // A bare host:port with --ca is https.
    let server = format!("127.0.0.1:{}", address.port());
    let (status, stdout, stderr) = sb(&[
        "--server",
        &server,
        "--ca",
        &ca,
        "--tls-server-name",
        "localhost",
        "--cert",
        &cert,
        "--key",
        &key,
        "info",
    ])
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("\"mock\""), "{stdout}");
    assert_eq!(mock.calls()[0].client_certificates, 1);

    let (status, _, stderr) = sb(&["--server", &server, "--ca", &ca, "info"]).await;
    assert_eq!(status, 1);
    assert!(
        stderr.contains("certificate not valid for name \"127.0.0.1\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("\nhint: the broker's certificate was not accepted"),
        "{stderr}"
    );
}
