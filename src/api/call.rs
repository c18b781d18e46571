//! One call's frame, the same for every handler on every port: its audit
//! event begun, the handler run in the call's span and trace scope, and the
//! outcome concluded (a refusal logged at DEBUG, the event emitted with the
//! answer's code). Plus the caller's deadline, which every handler reads the
//! same way.
//!
//! The wire a refusal takes (a `tonic::Status`, an Envoy denial, a problem
//! document) is the handler's: it implements [`Refusal`], and the frame
//! needs no more of it than its gRPC code and a log line.

use std::{net::SocketAddr, time::Duration};

use tokio::time::Instant;
use tonic::{Code, Request, Status, metadata::MetadataMap};
use tracing::Instrument;

use crate::{
    access::peer_of,
    clock::Clock,
    domain::error::BrokerError,
    obs::audit::{Audit, Auditor},
    rpc::Rpc,
    trace::{self, TraceParent},
};

/// A refused call's answer, as far as the frame needs to know it.
pub(crate) trait Refusal {
    /// The gRPC code the audit event records (the same outcome has the same
    /// code on every port).
    fn code(&self) -> Code;
    /// Logs why, at DEBUG, in the call's span.
    fn log(&self);
}

impl Refusal for Status {
    fn code(&self) -> Code {
        Status::code(self)
    }

    /// The message as a field, so text a caller chose (quoted in it) is
    /// escaped, never able to start a line of its own.
    fn log(&self) {
        tracing::debug!(code = ?self.code(), error = self.message(), "call refused");
    }
}

/// Where a call came from: what the frame needs before the handler runs.
#[derive(Clone, Copy)]
pub(crate) struct Origin {
    pub peer: Option<SocketAddr>,
    pub trace: Option<TraceParent>,
}

impl Origin {
    /// A gRPC request's origin: the connection's peer, its `traceparent`.
    pub fn of<T>(request: &Request<T>) -> Self {
        Self::from_parts(request.metadata(), request.extensions())
    }

    pub fn from_parts(metadata: &MetadataMap, extensions: &tonic::Extensions) -> Self {
        Self {
            peer: peer_of(extensions).map(|p| p.remote),
            trace: TraceParent::from_metadata(metadata),
        }
    }
}

/// Runs `handler` as call `rpc`: audited once, in the call's span and trace
/// scope. If the returned future is dropped before the handler ends (the
/// caller went away), the audit records CANCELLED.
pub(crate) async fn run<T, E: Refusal>(
    auditor: &Auditor,
    rpc: Option<Rpc>,
    origin: Origin,
    handler: impl AsyncFnOnce(&mut Audit) -> Result<T, E>,
) -> Result<T, E> {
    let mut audit = auditor.start(rpc, origin.peer, origin.trace);
    let span = audit.span();
    // The call's own server span when it is traced, else the caller's trace.
    let passed_on = audit.trace();
    let outcome = trace::scope(passed_on, handler(&mut audit))
        .instrument(span.clone())
        .await;
    // The audit event is emitted outside the call's span: it carries the
    // span's `rpc` and `trace_id` as fields of its own, and in a span the
    // JSON formatter would parse and re-serialize the span's fields for
    // every line (BENCHMARKS.md has the measured effect).
    match &outcome {
        Ok(_) => audit.finish(Code::Ok),
        Err(refusal) => {
            span.in_scope(|| refusal.log());
            audit.finish(refusal.code());
        }
    }
    outcome
}

/// A call refused before any handler ran (by admission, on the headers):
/// audited here, since nothing else will.
pub(crate) fn refuse_early(
    auditor: &Auditor,
    rpc: Option<Rpc>,
    origin: Origin,
    e: BrokerError,
) -> Status {
    let mut audit = auditor.start(rpc, origin.peer, origin.trace);
    let span = audit.span();
    let status = refused(&mut audit, e);
    span.in_scope(|| status.log());
    audit.finish(status.code());
    status
}

/// `e` as a gRPC status, after the audit learnt what it says (upstream
/// status, caller, rate limit).
pub(crate) fn refused(audit: &mut Audit, e: BrokerError) -> Status {
    audit.error(&e);
    Status::from(e)
}

/// A refusal's wait before retrying, from the `RetryInfo` the one mapping
/// (`crate::api::status`) put in its status: for the `retry-after` of the
/// HTTP answers (ext_authz, the identity endpoint).
pub(crate) fn retry_info(status: &Status) -> Option<Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// `retry-after` is whole seconds; round up so that a client that waits as
/// told is not refused again for coming back a fraction early.
pub(crate) fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The caller's deadline, from the `grpc-timeout` header.
pub(crate) fn deadline(metadata: &MetadataMap, clock: &Clock) -> Option<Instant> {
    // A name made once, not parsed from a string on every call.
    const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let raw = metadata.as_ref().get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let timeout = parse_grpc_timeout(raw)?;
    Some(clock.now() + timeout.saturating_sub(deadline_margin(timeout)))
}

/// The broker gives up a little before the caller's deadline, so that its
/// DEADLINE_EXCEEDED (with a message saying what it was waiting for) reaches
/// the caller before the caller's own timer fires, and before tonic's server
/// timer, which would answer a bare CANCELLED. 5 % of the timeout, within
/// [2 ms, 100 ms].
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(2), Duration::from_millis(100))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5s"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_seconds(Duration::from_millis(30_001)), 31);
    }

    #[test]
    fn the_margin_is_five_percent_within_bounds() {
        assert_eq!(
            deadline_margin(Duration::from_millis(10)),
            Duration::from_millis(2)
        );
        assert_eq!(
            deadline_margin(Duration::from_secs(1)),
            Duration::from_millis(50)
        );
        assert_eq!(
            deadline_margin(Duration::from_secs(60)),
            Duration::from_millis(100)
        );
    }
}
