//! Who hears of each HTTP attempt: the client reports, an observer (the
//! metrics, a test) counts. The client depends on this trait alone, never on
//! what implements it.

use std::time::Duration;

use super::Endpoint;

/// Told of every HTTP attempt to Payroc when it ends, however it ends.
pub trait AttemptObserver: Send + Sync {
    /// One attempt at `endpoint`: its HTTP status, or `None` when no
    /// response came (connection failure, timeout, abandoned at the caller's
    /// deadline), and how long it took.
    fn attempt(&self, endpoint: Endpoint, status: Option<u16>, took: Duration);
}
