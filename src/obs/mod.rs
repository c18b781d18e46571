//! What the broker tells its operators: one audit event per call, the
//! Prometheus metrics (a sink the Payroc client reports to through its
//! observer trait), log lines through a bounded, never-blocking queue, and
//! (feature `otlp`) trace spans through another.

pub mod audit;
pub mod fields;
pub mod logging;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otel;
