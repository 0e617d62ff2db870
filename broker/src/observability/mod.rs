//! Observability: what an operator sees of a running broker.
//!
//! - [`metrics`]: Prometheus metrics — the names, and the recorder behind `/metrics`.
//! - [`process`]: the `process_*` metrics (CPU, memory, file descriptors), read from `/proc`.
//! - [`admin`]: the HTTP admin listener (`/metrics`, `/healthz`, `/console`).
//! - [`console`]: the operator console's page and its JSON state.
//! - [`history`]: the console's charts: a bounded in-memory history of rates and lags.
//! - [`audit`]: one rate-limited log line per refused request.
//! - [`trace`]: W3C trace context in and out of messages, spans, and OTLP export.
//! - [`probe`]: `switchboard --healthcheck`, the container health probe.

pub(crate) mod admin;
pub(crate) mod audit;
pub(crate) mod console;
pub(crate) mod histogram;
pub(crate) mod history;
pub(crate) mod metrics;
pub(crate) mod probe;
pub(crate) mod process;
pub(crate) mod trace;
