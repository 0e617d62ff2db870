//! Trace context and OTLP export (filled in by the observability work).
