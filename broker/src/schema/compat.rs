//! A new schema version checked against real traffic: the retained messages it would judge.
//!
//! When a version is registered, the newest retained messages on channels its pattern matches,
//! with the same major version (the ones a compatible minor or patch release must still accept),
//! are checked against it, up to `schemas.compatibility_sample` of them. The report says how many
//! were checked, how many fail, and the first failures; `require_compatible` refuses the
//! registration when any fails. The scan reads the store newest first and stops at the sample
//! size or after [`MAX_BATCHES`] batches, so a registration on a sparse pattern does not read
//! the whole store.

use super::registry::failures;
use super::{Failure, MAX_FAILURES};
use crate::channel::Pattern;
use crate::error::BrokerError;
use crate::state::store::MessageStore;

/// Most stored batches one report visits.
pub(crate) const MAX_BATCHES: usize = 4096;

/// A message of the sample that fails the new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailingMessage {
    /// Its offset.
    pub offset: u64,
    /// Its channel.
    pub channel: String,
    /// The schema version it carries.
    pub schema_version: String,
    /// Why it fails (at most [`MAX_FAILURES`]).
    pub failures: Vec<Failure>,
}

/// What the check of a new version against retained messages found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// Messages checked.
    pub checked: u64,
    /// Of those, the ones that fail.
    pub failing: u64,
    /// The first (newest) failing ones, at most [`MAX_FAILURES`].
    pub examples: Vec<FailingMessage>,
    /// Whether the scan stopped at its batch bound before the sample was full or the store read.
    pub truncated: bool,
}

/// Checks the newest retained messages matching `pattern` with major `major` against
/// `validator`, at most `sample` of them, as of `now_us` (expired messages are not counted).
///
/// # Errors
/// The store's error, or a damaged batch.
pub(crate) fn check(
    store: &MessageStore,
    pattern: &Pattern,
    major: u64,
    validator: &jsonschema::Validator,
    sample: usize,
    now_us: u64,
) -> Result<Report, BrokerError> {
    let mut report = Report::default();
    if sample == 0 {
        return Ok(report);
    }
    for (visited, batch) in store.batches_newest_first().enumerate() {
        if visited >= MAX_BATCHES {
            report.truncated = true;
            break;
        }
        for stored in batch?.messages.iter().rev() {
            let message = &stored.message;
            let same_major =
                semver::Version::parse(&message.schema_version).is_ok_and(|v| v.major == major);
            if !same_major || !pattern.matches(&message.channel) || stored.is_expired(now_us) {
                continue;
            }
            report.checked += 1;
            let found = failures(validator, &message.content_type, &message.payload);
            if !found.is_empty() {
                report.failing += 1;
                if report.examples.len() < MAX_FAILURES {
                    report.examples.push(FailingMessage {
                        offset: stored.offset,
                        channel: message.channel.clone(),
                        schema_version: message.schema_version.clone(),
                        failures: found,
                    });
                }
            }
            if report.checked as usize >= sample {
                return Ok(report);
            }
        }
    }
    Ok(report)
}
