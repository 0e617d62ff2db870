//! The public listener under connection abuse: sockets that never open a conversation, many
//! sockets from one address, and running out of file descriptors.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use switchboard_e2e::{eventually, BrokerProcess};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::observability::scrape;
use crate::security::make_pki;

/// Whether the broker has closed `socket` (end of file or reset); what it sent before (its HTTP/2
/// SETTINGS) is read and dropped.
fn closed_by_broker(socket: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match socket.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// A gRPC connection to `url` made from the local address `from`.
async fn connect_from(url: &str, from: IpAddr) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .local_address(Some(from))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"))
}

async fn counter(broker: &BrokerProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(broker).await.sum(name, labels)
}

#[tokio::test]
async fn silent_connections_are_closed_at_the_deadline_and_bounded_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[],
        &[
            ("SWITCHBOARD_LIMITS_HANDSHAKE_TIMEOUT", "3s"),
            ("SWITCHBOARD_LIMITS_MAX_CONNECTIONS_PER_ADDRESS", "5"),
        ],
    )
    .expect("broker starts");
    let url = broker.url();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);

    // A healthy client, established before the abuse and then idle past the deadline.
    let healthy = connect_from(&url, loopback).await;
    let mut healthy = BrokerClient::new(healthy);
    healthy.info(pb::InfoRequest {}).await.expect("healthy");

    // Four sockets that never finish their opening: silent, silent, part of the HTTP/2 preface,
    // part of an HTTP/1.1 request head (the gateway's). With the healthy one, the address has 5.
    let mut stalled = Vec::new();
    for opening in [
        &b""[..],
        b"",
        b"PRI * HTTP/2.0\r\n",
        b"GET /v1/channels HTTP/1.1\r\nHost: x\r\n",
    ] {
        let mut socket = TcpStream::connect(broker.addr).await.unwrap();
        socket.write_all(opening).await.unwrap();
        stalled.push(socket);
    }
    // The sixth from the same address is closed on arrival...
    let extra = TcpStream::connect(broker.addr).await.unwrap();
    eventually("the sixth connection from one address closed", || async {
        closed_by_broker(&extra).then_some(())
    })
    .await
    .unwrap();
    let refused = counter(
        &broker,
        "switchboard_connections_refused_total",
        &[("limit", "per_address")],
    )
    .await;
    assert_eq!(refused, 1.0, "refused by the per-address limit");
    // ...while another address is served.
    let mut elsewhere =
        BrokerClient::new(connect_from(&url, Ipv4Addr::new(127, 0, 0, 2).into()).await);
    elsewhere
        .info(pb::InfoRequest {})
        .await
        .expect("another address has its own places");

    // At the deadline every stalled socket is closed, and counted.
    eventually("the stalled sockets closed at the deadline", || async {
        stalled.iter().all(closed_by_broker).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        counter(&broker, "switchboard_handshake_timeouts_total", &[]).await,
        4.0,
        "only the four stalled sockets timed out"
    );

    // The healthy connection, idle longer than the deadline, is still the same connection.
    healthy
        .info(pb::InfoRequest {})
        .await
        .expect("an established connection has no deadline");
    assert_eq!(
        counter(&broker, "switchboard_handshake_timeouts_total", &[]).await,
        4.0
    );
    // And the address's places are back: a new client from it is served.
    let mut fresh = BrokerClient::new(connect_from(&url, loopback).await);
    fresh
        .info(pb::InfoRequest {})
        .await
        .expect("a new client once the stalled sockets are gone");
}

#[tokio::test]
async fn over_tls_only_the_opening_is_timed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (cert, key) = (file("server.pem"), file("server.key"));
    let broker = BrokerProcess::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[],
        &[
            ("SWITCHBOARD_TLS_CERT_FILE", cert.as_str()),
            ("SWITCHBOARD_TLS_KEY_FILE", key.as_str()),
            ("SWITCHBOARD_LIMITS_HANDSHAKE_TIMEOUT", "1s"),
        ],
    )
    .expect("broker starts with TLS");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", broker.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS client connects");
    let mut client = BrokerClient::new(channel);
    client.info(pb::InfoRequest {}).await.expect("served");

    // A silent socket, and one that stops inside its ClientHello record.
    let silent = TcpStream::connect(broker.addr).await.unwrap();
    let mut hello = TcpStream::connect(broker.addr).await.unwrap();
    hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    eventually("the stalled TLS sockets closed at the deadline", || async {
        (closed_by_broker(&silent) && closed_by_broker(&hello)).then_some(())
    })
    .await
    .unwrap();

    // The TLS client, idle past the deadline, still has its connection.
    client
        .info(pb::InfoRequest {})
        .await
        .expect("an established TLS connection has no deadline");
    assert_eq!(
        counter(&broker, "switchboard_handshake_timeouts_total", &[]).await,
        2.0,
        "only the two stalled sockets timed out"
    );
}

/// Ticks of CPU time (user and system) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime) are the 12th and 13th after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn at_the_descriptor_limit_accepting_pauses_instead_of_spinning() {
    const NOFILE: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let prlimit = format!("--nofile={NOFILE}:{NOFILE}");
    let broker = BrokerProcess::start_wrapped(
        &[OsStr::new("prlimit"), OsStr::new(&prlimit)],
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[],
        // The sockets below must hold their descriptors through the test.
        &[("SWITCHBOARD_LIMITS_HANDSHAKE_TIMEOUT", "10m")],
    )
    .expect("broker starts under prlimit");
    // prlimit sets the limit and then becomes the broker.
    let pid = broker.pid().expect("running");

    // More sockets than the broker has descriptors left: the rest wait in the listen backlog.
    let mut sockets = Vec::new();
    for _ in 0..NOFILE {
        sockets.push(TcpStream::connect(broker.addr).await.unwrap());
    }
    eventually("the broker out of descriptors", || async {
        (open_descriptors(pid) >= NOFILE).then_some(())
    })
    .await
    .unwrap();

    // Over a window with connections waiting that it cannot accept, the broker mostly sleeps.
    // (A spinning accept loop uses the whole window; the bound is loose on purpose.)
    let window = Duration::from_secs(3);
    let (ticks_before, started) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(window).await;
    let used = cpu_ticks(pid) - ticks_before;
    let elapsed = started.elapsed();
    let used_seconds = used as f64 / ticks_per_second() as f64;
    assert!(
        used_seconds < elapsed.as_secs_f64() * 0.3,
        "the broker used {used_seconds:.2} s of CPU in {elapsed:?} while unable to accept"
    );

    // Once the sockets close, the descriptors come back and a normal client is served.
    drop(sockets);
    let url = broker.url();
    eventually("a client served after the sockets closed", || {
        let url = url.clone();
        async move {
            let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
            BrokerClient::new(channel)
                .info(pb::InfoRequest {})
                .await
                .ok()
        }
    })
    .await
    .unwrap();
    let errors = counter(
        &broker,
        "switchboard_accept_errors_total",
        &[("listener", "public")],
    )
    .await;
    assert!(errors >= 1.0, "accept errors counted: {errors}");
    assert!(
        broker.log().contains("is below limits.max_connections"),
        "warned at start that nofile is below max_connections:\n{}",
        broker.log()
    );
    assert!(
        broker.log().contains("cannot accept connections"),
        "the failures were logged:\n{}",
        broker.log()
    );
}
