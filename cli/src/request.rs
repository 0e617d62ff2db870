//! `sb request` and `sb reply`: request/reply over ephemeral messages, through the client's
//! [`Client::request`] and [`switchboard_client::reply_to`] (docs/FLOW.md#request-and-reply).

use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use switchboard_client::{reply_to, Client, Message, Publish, Start, SubscribeOptions};
use tokio::time::Instant;

use crate::{args, print};

/// `sb request --help`'s notes and examples.
pub const REQUEST_HELP: &str = "\
Subscribes to a fresh inbox channel (_inbox.<uuid>), publishes DATA to CHANNEL as an ephemeral
message with a `reply-to` header naming the inbox and a correlation id, and prints the first reply
as `sb subscribe` prints a delivery (so --output raw prints its payload only). Nothing is stored.
Exits with status 1 (`error: no reply to a request on CHANNEL within …`) when no reply came within
--timeout: no responder was subscribed, the request or its reply was dropped (ephemeral messages are delivered at most once),
or the responder was slower. Every responder subscribed to CHANNEL receives the request; the first
reply wins. Needs grants to publish to CHANNEL and to subscribe to `_inbox.>`.

Examples:
  sb request crm.lookup.contact '{\"phone\":\"555-0100\"}' --timeout 2s
  echo '{\"id\":42}' | sb request billing.balance.get - --output raw";

/// `sb reply --help`'s notes and examples.
pub const REPLY_HELP: &str = "\
Subscribes to PATTERN from now on and answers each request (a message with a `reply-to` header
naming an `_inbox.…` channel, as `sb request` sends) with an ephemeral message to that inbox
carrying the request's correlation id: DATA, or with --exec the standard output of
`sh -c COMMAND` run with the request's payload on its standard input. A command that fails (exit
status not 0) is reported on stderr and no reply is sent. The reply is JSON when it parses as
JSON, else text/plain when it is UTF-8, else application/octet-stream. Messages without a
`reply-to` are skipped. Each request is printed as `sb subscribe` prints a delivery.

Once the broker confirms the subscription, `sb: replying on PATTERN (subscription S)` is written
to stderr. Exits with status 0 after --count requests or once --timeout has passed.

Examples:
  sb reply 'svc.time.now' '{\"ok\":true}'
  sb reply 'svc.upper' --exec 'tr a-z A-Z' --count 1";

/// `sb request`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The channel to send the request to.
    channel: String,

    /// The request's payload (JSON unless --content-type says otherwise); `-` or nothing reads
    /// it from stdin.
    data: Option<String>,

    /// How long to wait for the reply, for example `500ms`.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = humantime::parse_duration,
        default_value = "5s"
    )]
    timeout: Duration,

    /// The payload's media type; `application/json` by default.
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,

    /// A header, `NAME=VALUE`; repeat for several.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = args::parse_header)]
    headers: Vec<(String, String)>,

    /// Send the newline that ends the payload read from stdin too.
    #[arg(long)]
    keep_newline: bool,
}

/// `sb reply`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ReplyArgs {
    /// The channel or pattern to answer requests on.
    pattern: String,

    /// The reply to every request (without --exec).
    #[arg(required_unless_present = "exec", conflicts_with = "exec")]
    data: Option<String>,

    /// Reply with the standard output of `sh -c COMMAND`, the request's payload on its stdin.
    #[arg(long, value_name = "COMMAND")]
    exec: Option<String>,

    /// Exit (status 0) after answering this many requests.
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Exit (status 0) once this long has passed since `sb` started, for example `10m`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

/// `sb request`.
///
/// # Errors
/// No reply in time, or the subscribe or publish failed.
pub async fn request(client: &Client, args: RequestArgs) -> anyhow::Result<()> {
    let payload = match args.data {
        Some(data) if data != "-" => data.into_bytes(),
        _ => {
            let bytes = tokio::task::spawn_blocking(|| {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .lock()
                    .read_to_end(&mut bytes)
                    .map(|_| bytes)
            })
            .await
            .context("reading the request from stdin")?
            .context("reading the request from stdin")?;
            args::stdin_payload(bytes, args.keep_newline)
        }
    };
    let mut message = Publish::new(args.channel, payload).headers(args.headers);
    if let Some(content_type) = args.content_type {
        message = message.content_type(content_type);
    }
    let reply = client.request(message, args.timeout).await?;
    print::message(&reply)
}

/// `sb reply`.
///
/// # Errors
/// The subscription failed or ended, or a reply could not be published.
pub async fn reply(client: &Client, args: ReplyArgs, started: Instant) -> anyhow::Result<()> {
    let deadline = args.timeout.map(|timeout| started + timeout);
    let until = |deadline: Option<Instant>| async move {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    let options = SubscribeOptions::default().exclude_ephemeral(false);
    let mut requests = tokio::select! {
        subscribed = client.subscribe_with(args.pattern.as_str(), Start::Latest, options) => subscribed?,
        () = until(deadline) => return Ok(()),
    };
    match requests.id() {
        Some(id) => eprintln!("sb: replying on {} (subscription {id})", args.pattern),
        None => eprintln!("sb: replying on {}", args.pattern),
    }
    let mut answered = 0;
    while args.count.is_none_or(|count| answered < count) {
        let next = tokio::select! {
            next = futures::StreamExt::next(&mut requests) => next,
            () = until(deadline) => return Ok(()),
        };
        let request = match next {
            Some(request) => request?,
            None => bail!("the subscription ended unexpectedly"),
        };
        if !request.headers.contains_key(switchboard_client::REPLY_TO) {
            tracing::debug!(channel = %request.channel, "not a request (no reply-to); skipped");
            continue;
        }
        print::message(&request)?;
        let body = match &args.exec {
            Some(command) => match run(command, &request).await {
                Ok(output) => output,
                Err(error) => {
                    eprintln!(
                        "sb: no reply to the request on {}: {error:#}",
                        request.channel
                    );
                    continue;
                }
            },
            None => args.data.clone().unwrap_or_default().into_bytes(),
        };
        let content_type = content_type(&body);
        let Some(reply) = reply_to(&request, body) else {
            eprintln!(
                "sb: no reply to the request on {}: its reply-to is not an _inbox channel",
                request.channel
            );
            continue;
        };
        client.publish(reply.content_type(content_type)).await?;
        answered += 1;
    }
    Ok(())
}

/// Runs `sh -c command` with the request's payload on stdin; its stdout, or why it failed.
/// On a blocking thread: `sb` replies to one request at a time.
async fn run(command: &str, request: &Message) -> anyhow::Result<Vec<u8>> {
    let command = command.to_owned();
    let payload = request.payload.clone();
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {command:?}"))?;
        // Written from a thread of its own, so that a command writing much before it has read
        // everything cannot block on a full pipe while we block on its input. A command that
        // does not read its input closes the pipe early: not an error.
        let writer = child.stdin.take().map(|mut stdin| {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            })
        });
        let output = child.wait_with_output()?;
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        if !output.status.success() {
            bail!("{command:?} exited with {}", output.status);
        }
        Ok(output.stdout)
    })
    .await?
}

/// JSON when `body` parses as JSON, else text when it is UTF-8, else bytes.
fn content_type(body: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        "application/json"
    } else if std::str::from_utf8(body).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::content_type;

    #[test]
    fn the_reply_says_what_it_carries() {
        assert_eq!(content_type(b"{\"a\":1}\n"), "application/json");
        assert_eq!(content_type(b"HELLO\n"), "text/plain; charset=utf-8");
        assert_eq!(content_type(&[0xff, 0x00]), "application/octet-stream");
    }
}
