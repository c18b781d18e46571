//! What the broker tells its operators: one audit event per call, the
//! Prometheus metrics (a sink the Payroc client reports to through its
//! observer trait), and log lines through a bounded, never-blocking queue.

pub mod audit;
pub mod logging;
pub mod metrics;
