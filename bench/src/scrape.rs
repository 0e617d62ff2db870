//! Reading a Switchboard broker's `/metrics` (its admin listener, Prometheus text): the page, one
//! unlabelled value, and how many messages the broker's log entries carried.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Metric;

/// `GET /metrics` over HTTP/1.1, without an HTTP client dependency.
pub async fn page(admin: SocketAddr) -> anyhow::Result<String> {
    let fetch = async {
        let mut socket = tokio::net::TcpStream::connect(admin).await?;
        socket
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        socket.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| anyhow!("no answer within 10 s"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "answered {}",
            head.lines().next().unwrap_or_default().trim()
        );
    }
    Ok(body.to_owned())
}

/// The value of an unlabelled metric in a Prometheus text page.
pub fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// The broker's histogram of the items (messages) in each committed log entry.
const ENTRY_ITEMS: &str = "switchboard_commit_batch_items";

/// [`ENTRY_ITEMS`] at one moment, or the difference of two moments: how many entries were
/// committed, the messages they carried, and how many carried exactly one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct EntryItems {
    pub entries: f64,
    pub messages: f64,
    pub single: f64,
}

impl EntryItems {
    /// The histogram in a `/metrics` page; `None` when the broker has committed no entry yet (the
    /// exporter shows a histogram once it has a value).
    pub fn parse(text: &str) -> Option<EntryItems> {
        let entries = value(text, &format!("{ENTRY_ITEMS}_count"))?;
        let messages = value(text, &format!("{ENTRY_ITEMS}_sum"))?;
        // The bucket `le="1"` counts the entries of one item (none has fewer).
        let single = text
            .lines()
            .filter(|line| line.starts_with(&format!("{ENTRY_ITEMS}_bucket{{")))
            .find(|line| line.contains("le=\"1\"") || line.contains("le=\"1.0\""))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|count| count.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Some(EntryItems {
            entries,
            messages,
            single,
        })
    }

    /// Reads the histogram from the admin listener at `admin` (zero when there is none yet).
    pub async fn read(admin: SocketAddr) -> anyhow::Result<EntryItems> {
        Ok(EntryItems::parse(&page(admin).await?).unwrap_or_default())
    }

    /// This and `other` together (two nodes of a cluster).
    pub fn plus(&self, other: &EntryItems) -> EntryItems {
        EntryItems {
            entries: self.entries + other.entries,
            messages: self.messages + other.messages,
            single: self.single + other.single,
        }
    }

    /// What was committed between `earlier` and this.
    pub fn since(&self, earlier: &EntryItems) -> EntryItems {
        EntryItems {
            entries: self.entries - earlier.entries,
            messages: self.messages - earlier.messages,
            single: self.single - earlier.single,
        }
    }

    /// The figures of a workload: log entries committed, messages per entry (mean), and the share
    /// of entries that carried one message. None when nothing was committed.
    pub fn metrics(&self) -> Vec<Metric> {
        if self.entries <= 0.0 {
            return Vec::new();
        }
        vec![
            Metric::lower("log entries", "entries", self.entries),
            Metric::higher(
                "msgs per log entry, mean",
                "msgs",
                self.messages / self.entries,
            ),
            Metric::lower(
                "log entries of 1 msg",
                "%",
                self.single / self.entries * 100.0,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlabelled_metrics_are_read_by_exact_name() {
        let text = "# TYPE switchboard_send_buffered_bytes gauge\n\
                    switchboard_send_buffered_bytes_max 7\n\
                    switchboard_send_buffered_bytes 1234\n";
        assert_eq!(value(text, "switchboard_send_buffered_bytes"), Some(1234.0));
        assert_eq!(value(text, "switchboard_other"), None);
    }

    #[test]
    fn entry_items_come_from_the_histogram() {
        let page = |entries: u32, messages: u32, single: u32| {
            format!(
                "# TYPE switchboard_commit_batch_items histogram\n\
                 switchboard_commit_batch_items_bucket{{le=\"1\"}} {single}\n\
                 switchboard_commit_batch_items_bucket{{le=\"2\"}} {entries}\n\
                 switchboard_commit_batch_items_bucket{{le=\"+Inf\"}} {entries}\n\
                 switchboard_commit_batch_items_sum {messages}\n\
                 switchboard_commit_batch_items_count {entries}\n"
            )
        };
        assert_eq!(EntryItems::parse("switchboard_other 1\n"), None);
        let before = EntryItems::parse(&page(10, 15, 5)).unwrap();
        let after = EntryItems::parse(&page(110, 215, 5)).unwrap();
        let run = after.since(&before);
        assert_eq!(run.plus(&before), after);
        assert_eq!(
            run,
            EntryItems {
                entries: 100.0,
                messages: 200.0,
                single: 0.0
            }
        );
        let metrics = run.metrics();
        assert_eq!(metrics[1].value, 2.0);
        assert_eq!(metrics[2].value, 0.0);
        assert!(EntryItems::default().metrics().is_empty());
    }
}
