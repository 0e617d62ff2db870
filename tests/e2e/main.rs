//! End-to-end tests: each starts real `switchboard` processes on port 0 in a temporary folder and
//! talks to them through the real client (or the `sb` command line). One test binary, so the
//! build is shared; scenarios are grouped by concern.
// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod browser;
mod cli;
mod clients;
mod cluster;
mod common;
mod concurrency;
mod connections;
mod console;
mod dashboard;
mod disk_full;
mod entities;
mod ephemeral;
mod flow;
mod fuzz;
mod gateway;
mod gateway_errors;
mod kpis;
mod loops;
mod malformed;
mod observability;
mod persistence;
mod power_loss;
mod pubsub;
mod replay;
mod resilience;
mod response_size;
mod resume;
mod schemas;
mod security;
mod shutdown;
mod subscribe_batches;
mod sync_trace;
mod traces;
mod ttl;
mod validation;
