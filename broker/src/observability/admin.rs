//! HTTP admin listener (filled in by the observability work).
