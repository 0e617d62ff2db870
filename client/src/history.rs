//! Reading stored messages: [`HistoryQuery`], [`HistoryPage`], [`Client::history`] and
//! [`Client::history_all`].

use std::time::SystemTime;

use switchboard_proto::v1::{HistoryRequest, Message};
use tracing::Instrument;

use crate::client::Client;
use crate::error::Error;
use crate::subscription::Start;

/// The most messages [`Client::history_all`] asks for in one page when the query sets no limit
/// (the broker's default maximum page size).
const DEFAULT_PAGE_LIMIT: u32 = 1000;

/// What to read with [`Client::history`]: a pattern and an offset or time range.
///
/// ```
/// use switchboard_client::{HistoryQuery, Start};
///
/// let query = HistoryQuery::new("crm.>").from(Start::Offset(100)).to_offset(199).limit(50);
/// assert_eq!(query.pattern, "crm.>");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryQuery {
    /// The channel pattern to read, for example `crm.*.updated`.
    pub pattern: String,
    /// The first position to read (inclusive). Default: [`Start::Earliest`]; [`Start::Latest`]
    /// is refused, since history reads what is already stored.
    pub from: Start,
    /// Stop after this offset (inclusive); `None` for no upper offset bound.
    pub to_offset: Option<u64>,
    /// Stop before messages published after this time (inclusive); `None` for no time bound.
    pub to_time: Option<SystemTime>,
    /// The most messages in one page; `None` for the broker's default (100). The broker lowers
    /// values above its maximum (1000 by default).
    pub limit: Option<u32>,
}

impl HistoryQuery {
    /// Reads `pattern` from the earliest stored message, with no upper bound.
    pub fn new(pattern: impl Into<String>) -> HistoryQuery {
        HistoryQuery {
            pattern: pattern.into(),
            from: Start::Earliest,
            to_offset: None,
            to_time: None,
            limit: None,
        }
    }

    /// Sets where to start (anything but [`Start::Latest`]).
    pub fn from(mut self, from: Start) -> HistoryQuery {
        self.from = from;
        self
    }

    /// Sets the last offset to read (inclusive).
    pub fn to_offset(mut self, offset: u64) -> HistoryQuery {
        self.to_offset = Some(offset);
        self
    }

    /// Sets the last publish time to read (inclusive).
    pub fn to_time(mut self, time: SystemTime) -> HistoryQuery {
        self.to_time = Some(time);
        self
    }

    /// Sets the page size.
    pub fn limit(mut self, limit: u32) -> HistoryQuery {
        self.limit = Some(limit);
        self
    }

    /// The request this query is sent as.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty pattern or a query starting at [`Start::Latest`].
    pub fn to_request(&self) -> Result<HistoryRequest, Error> {
        if self.pattern.is_empty() {
            return Err(Error::InvalidArgument(
                "the history pattern is empty".to_owned(),
            ));
        }
        if self.from == Start::Latest {
            return Err(Error::InvalidArgument(
                "history cannot start at latest: it reads stored messages (use earliest, an offset or a time)"
                    .to_owned(),
            ));
        }
        Ok(HistoryRequest {
            pattern: self.pattern.clone(),
            from: Some(self.from.into()),
            to_offset: self.to_offset.unwrap_or(0),
            to_time: self.to_time.map(Into::into),
            limit: self.limit.unwrap_or(0),
        })
    }
}

/// One page of history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistoryPage {
    /// The matching messages, in offset order.
    pub messages: Vec<Message>,
    /// Where the next page starts, when more messages may match; `None` when the range is
    /// exhausted.
    pub next_offset: Option<u64>,
}

impl HistoryPage {
    /// The query for the page after this one (the same query starting at
    /// [`HistoryPage::next_offset`]), or `None` when the range is exhausted.
    ///
    /// A `next_offset` that does not move past the query's own start is taken as the end, so
    /// paging always terminates.
    pub fn next_query(&self, query: &HistoryQuery) -> Option<HistoryQuery> {
        let next = self.next_offset?;
        if let Start::Offset(from) = query.from {
            if next <= from {
                return None;
            }
        }
        Some(query.clone().from(Start::Offset(next)))
    }
}

impl Client {
    /// Reads one page of stored, unexpired messages matching the query, in offset order.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a query the client refuses (see
    /// [`HistoryQuery::to_request`]); [`Error::Status`] when the broker refuses it (for example
    /// `INVALID_ARGUMENT PATTERN_INVALID`) or the call fails.
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, HistoryQuery, Start};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let mut query = Some(HistoryQuery::new("crm.>").from(Start::Earliest).limit(500));
    /// while let Some(current) = query {
    ///     let page = client.history(current.clone()).await?;
    ///     for message in &page.messages {
    ///         println!("{} {}", message.offset, message.channel);
    ///     }
    ///     query = page.next_query(&current);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn history(&self, query: HistoryQuery) -> Result<HistoryPage, Error> {
        let request = query.to_request()?;
        let span = crate::trace::receive_span(&query.pattern);
        let response = match self.grpc().history(request).instrument(span.clone()).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = Error::from(status);
                crate::trace::failed(&span, &error);
                return Err(error);
            }
        };
        crate::trace::received(&span, &response.messages);
        Ok(HistoryPage {
            messages: response.messages,
            next_offset: Some(response.next_offset).filter(|next| *next > 0),
        })
    }

    /// Reads pages until the range is exhausted or `max` messages were read (pass `usize::MAX`
    /// for everything), and returns them in offset order. Pages hold at most `query.limit`
    /// messages (1000 when unset), and never more than are still wanted.
    ///
    /// # Errors
    /// As [`Client::history`], for any page.
    ///
    /// # Example
    /// ```no_run
    /// use std::time::{Duration, SystemTime};
    /// use switchboard_client::{Client, HistoryQuery, Start};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    /// let messages = client
    ///     .history_all(HistoryQuery::new("telemetry.>").from(Start::Time(hour_ago)), 10_000)
    ///     .await?;
    /// println!("{} messages in the last hour", messages.len());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn history_all(
        &self,
        query: HistoryQuery,
        max: usize,
    ) -> Result<Vec<Message>, Error> {
        let page_limit = query
            .limit
            .filter(|limit| *limit > 0)
            .unwrap_or(DEFAULT_PAGE_LIMIT);
        let mut messages = Vec::new();
        let mut next = Some(query);
        while let Some(mut query) = next.take() {
            let remaining = max.saturating_sub(messages.len());
            if remaining == 0 {
                break;
            }
            query.limit = Some(page_limit.min(u32::try_from(remaining).unwrap_or(u32::MAX)));
            let page = self.history(query.clone()).await?;
            next = page.next_query(&query);
            messages.extend(page.messages.into_iter().take(remaining));
        }
        Ok(messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use switchboard_proto::v1::start_position::Position;

    #[test]
    fn query_becomes_a_request() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let request = HistoryQuery::new("a.>")
            .from(Start::Offset(5))
            .to_offset(9)
            .to_time(time)
            .limit(3)
            .to_request()
            .unwrap();
        assert_eq!(request.pattern, "a.>");
        assert_eq!(request.from.unwrap().position, Some(Position::Offset(5)));
        assert_eq!(request.to_offset, 9);
        assert_eq!(request.to_time.unwrap().seconds, 10);
        assert_eq!(request.limit, 3);

        let defaults = HistoryQuery::new("a.b").to_request().unwrap();
        assert!(matches!(
            defaults.from.unwrap().position,
            Some(Position::Earliest(_))
        ));
        assert_eq!((defaults.to_offset, defaults.limit), (0, 0));
        assert_eq!(defaults.to_time, None);
    }

    #[test]
    fn latest_and_empty_patterns_are_refused() {
        let latest = HistoryQuery::new("a.b").from(Start::Latest).to_request();
        assert!(matches!(latest, Err(Error::InvalidArgument(_))));
        let empty = HistoryQuery::new("").to_request();
        assert!(matches!(empty, Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn pages_chain_and_terminate() {
        let query = HistoryQuery::new("a.b").from(Start::Offset(10));
        let page = HistoryPage {
            messages: Vec::new(),
            next_offset: Some(20),
        };
        assert_eq!(
            page.next_query(&query).map(|next| next.from),
            Some(Start::Offset(20))
        );
        let stuck = HistoryPage {
            messages: Vec::new(),
            next_offset: Some(10),
        };
        assert_eq!(stuck.next_query(&query), None);
        assert_eq!(HistoryPage::default().next_query(&query), None);
    }
}
