//! The query string, decoded (`application/x-www-form-urlencoded`, as `URLSearchParams` writes it).

use percent_encoding::percent_decode_str;

use crate::error::{BrokerError, Reason};

/// A request's query parameters.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    /// Decodes `query` (what follows `?`, if anything).
    pub(super) fn parse(query: Option<&str>) -> Query {
        let decode = |s: &str| {
            let spaced = s.replace('+', " ");
            percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
        };
        Query(
            query
                .unwrap_or("")
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(pair), String::new()),
                })
                .collect(),
        )
    }

    /// The first value of `name`.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name` as a number, or `None` when absent or empty.
    ///
    /// # Errors
    /// INVALID_ARGUMENT with `reason` when it is not a number.
    pub(super) fn number<T: std::str::FromStr>(
        &self,
        name: &str,
        reason: Reason,
    ) -> Result<Option<T>, BrokerError> {
        match self.get(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                BrokerError::invalid(
                    reason,
                    format!("{name} must be a non-negative integer, got {v:?}"),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_and_plus() {
        let q = Query::parse(Some("pattern=crm.%3E&a=b+c&flag&n=12"));
        assert_eq!(q.get("pattern"), Some("crm.>"));
        assert_eq!(q.get("a"), Some("b c"));
        assert_eq!(q.get("flag"), Some(""));
        assert_eq!(
            q.number::<u32>("n", Reason::PolicyInvalid).unwrap(),
            Some(12)
        );
        assert!(q.number::<u32>("a", Reason::PolicyInvalid).is_err());
        assert_eq!(q.get("missing"), None);
    }
}
