//! Who hears of each HTTP attempt: the client reports, an observer (the
//! metrics, the trace exporter, a test) counts. The client depends on this
//! trait alone, never on what implements it.

use std::{sync::Arc, time::Duration};

use super::Endpoint;
use crate::trace::TraceParent;

/// One HTTP attempt to Payroc, as its observer hears of it.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub endpoint: Endpoint,
    /// The HTTP status, or `None` when no response came (connection failure,
    /// timeout, abandoned at the caller's deadline).
    pub status: Option<u16>,
    pub took: Duration,
    /// When the attempt carried a `traceparent`: the trace it continued and
    /// the value it sent. Read by the trace exporter (feature `otlp`).
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub trace: Option<AttemptTrace>,
}

/// The trace context of one attempt.
#[derive(Clone, Copy, Debug)]
pub struct AttemptTrace {
    /// The trace of the call the attempt serves: its parent id is the
    /// attempt's parent span.
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub parent: TraceParent,
    /// The `traceparent` sent upstream: its parent id is the attempt's own
    /// span, the one Payroc's spans hang from.
    pub sent: TraceParent,
}

/// Told of every HTTP attempt to Payroc when it ends, however it ends.
pub trait AttemptObserver: Send + Sync {
    fn attempt(&self, attempt: &Attempt);
}

/// Two observers, both told: how the metrics and the trace exporter share
/// the client's one observer slot.
impl<A: AttemptObserver + ?Sized, B: AttemptObserver + ?Sized> AttemptObserver
    for (Arc<A>, Arc<B>)
{
    fn attempt(&self, attempt: &Attempt) {
        self.0.attempt(attempt);
        self.1.attempt(attempt);
    }
}
