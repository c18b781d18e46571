//! The audit trail: exactly one `payroc_broker::audit` event (INFO, message
//! `rpc`) per TokenBroker or ext_authz call, saying who asked for what from
//! where, what they got and how it went; and the RPC metrics counted with it.
//!
//! A handler fills in an [`Audit`] as it learns things (caller, terminal,
//! credential, upstream status, the token handed out) and finishes it with
//! the gRPC code. An `Audit` dropped unfinished (the caller went away, the
//! handler was cancelled) finishes itself as `CANCELLED`, so no exit path
//! goes unrecorded and none is recorded twice.
//!
//! Values a caller chose (terminal ids) are recorded as strings, which the
//! text format prints quoted with control characters escaped and the JSON
//! format escapes as JSON: a caller cannot forge a log line. Values of our
//! own (names from the configuration, codes, addresses) print unquoted. The token is
//! recorded only as `token_fp`, its [`Fingerprint`].

use std::{net::SocketAddr, sync::Arc};

use tokio::time::Instant;
use tonic::Code;
use uuid::Uuid;

use crate::{
    clock::Clock,
    domain::{error::BrokerError, fingerprint::Fingerprint},
    obs::{fields::Fields, logging, metrics::Metrics},
    rpc::{Rpc, code_name},
    trace::TraceParent,
};

/// The target of audit events, for log routing and filters.
pub const TARGET: &str = "payroc_broker::audit";

/// Terminal ids as logged are cut to this many characters: a request that
/// fails validation may carry any length.
const MAX_LOGGED: usize = 64;

/// Starts audits: the clock they time with, the metrics they count into,
/// and (feature `otlp`) where their trace spans go.
#[derive(Clone, Debug)]
pub struct Auditor {
    clock: Clock,
    metrics: Arc<Metrics>,
    #[cfg(feature = "otlp")]
    spans: Option<Arc<crate::obs::otel::Spans>>,
}

impl Auditor {
    pub fn new(clock: Clock, metrics: Arc<Metrics>) -> Self {
        Self {
            clock,
            metrics,
            #[cfg(feature = "otlp")]
            spans: None,
        }
    }

    /// Each sampled call also becomes a server span in `spans`.
    #[cfg(feature = "otlp")]
    pub fn with_spans(mut self, spans: Arc<crate::obs::otel::Spans>) -> Self {
        self.spans = Some(spans);
        self
    }

    /// Starts the audit of one call. `rpc` is `None` for a path that names
    /// no known method (recorded as `unknown`, not counted in metrics).
    pub fn start(
        &self,
        rpc: Option<Rpc>,
        peer: Option<SocketAddr>,
        trace: Option<TraceParent>,
    ) -> Audit {
        #[cfg(feature = "otlp")]
        let span = self
            .spans
            .as_ref()
            .and_then(|s| s.start_server(rpc.map_or("unknown", Rpc::name), trace));
        Audit {
            auditor: self.clone(),
            rpc,
            peer,
            trace,
            #[cfg(feature = "otlp")]
            span,
            started: self.clock.now(),
            caller: None,
            terminal: None,
            credential: None,
            upstream_status: None,
            token_fp: None,
            idempotency_key: None,
            finished: false,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// One call's audit record, being filled in. See the module documentation.
#[must_use = "an audit is emitted by finish (or as CANCELLED when dropped)"]
pub struct Audit {
    auditor: Auditor,
    rpc: Option<Rpc>,
    peer: Option<SocketAddr>,
    trace: Option<TraceParent>,
    /// Sampled for tracing: the call's server span.
    #[cfg(feature = "otlp")]
    span: Option<crate::obs::otel::ServerSpan>,
    started: Instant,
    caller: Option<Arc<str>>,
    terminal: Option<String>,
    credential: Option<Arc<str>>,
    upstream_status: Option<u16>,
    token_fp: Option<Fingerprint>,
    idempotency_key: Option<Uuid>,
    finished: bool,
}

impl Audit {
    pub fn caller(&mut self, name: Arc<str>) {
        self.caller = Some(name);
    }

    /// The terminal as the request gave it (before validation).
    pub fn terminal(&mut self, terminal: &str) {
        let cut = match terminal.char_indices().nth(MAX_LOGGED) {
            Some((at, _)) => format!("{}…", &terminal[..at]),
            None => terminal.to_owned(),
        };
        self.terminal = Some(cut);
    }

    pub fn credential(&mut self, name: &Arc<str>) {
        self.credential = Some(Arc::clone(name));
    }

    /// The HTTP status of the last upstream response the call waited for.
    pub fn upstream_status(&mut self, status: Option<u16>) {
        if status.is_some() {
            self.upstream_status = status;
        }
    }

    /// The token handed out, by its fingerprint.
    pub fn token(&mut self, fingerprint: Fingerprint) {
        self.token_fp = Some(fingerprint);
    }

    pub fn idempotency_key(&mut self, key: Uuid) {
        self.idempotency_key = Some(key);
    }

    /// The trace the call passes on (to Payroc): the one it came with, or,
    /// when the call is sampled for tracing, its own server span's.
    pub fn trace(&self) -> Option<TraceParent> {
        #[cfg(feature = "otlp")]
        if let Some(span) = &self.span {
            return Some(span.context());
        }
        self.trace
    }

    /// What an error tells the audit: the upstream status behind it, the
    /// caller it names (refusals before the caller was recorded), and a
    /// rate-limited call for the metrics.
    pub fn error(&mut self, e: &BrokerError) {
        self.upstream_status(e.upstream_status());
        match e {
            BrokerError::CallerRateLimited { caller, .. } => {
                self.auditor.metrics.caller_rate_limited(caller);
                self.caller.get_or_insert_with(|| caller.as_str().into());
            }
            BrokerError::CallerSessionsLimited { caller, .. }
            | BrokerError::PermissionDenied { caller, .. } => {
                self.caller.get_or_insert_with(|| caller.as_str().into());
            }
            _ => {}
        }
    }

    /// A span for the call, with its RPC name and trace id: log lines of the
    /// call (retries, token fetches it starts) carry them.
    ///
    /// Only when it has something to carry: the call came with a trace, or
    /// DEBUG is on somewhere (refusals are logged at DEBUG, in the span).
    /// Otherwise no span at all, since a span is a subscriber call and an
    /// allocation on every call, and the call's own audit event names its
    /// RPC anyway (BENCHMARKS.md has the measured cost).
    pub fn span(&self) -> tracing::Span {
        if self.trace.is_none()
            && tracing::level_filters::LevelFilter::current() < tracing::Level::DEBUG
        {
            return tracing::Span::none();
        }
        tracing::info_span!(
            "rpc",
            rpc = self.rpc.map_or("unknown", Rpc::name),
            trace_id = self.trace.map(|t| t.trace_id()),
        )
    }

    /// Emits the event and counts the call.
    pub fn finish(mut self, code: Code) {
        self.emit(code);
    }

    fn emit(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let took = self
            .auditor
            .clock
            .now()
            .saturating_duration_since(self.started);
        if let Some(rpc) = self.rpc {
            self.auditor.metrics.rpc(rpc, code, took);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let duration_ms = micros as f64 / 1000.0;
        let rpc = self.rpc.map_or("unknown", Rpc::name);
        let code_name = code_name(code);
        // The trace the call came in: the contract names `trace_id` only
        // then, so a trace the broker starts itself is not in the line.
        let trace_id = self.trace.map(|t| t.trace_id());
        #[cfg(feature = "otlp")]
        if let (Some(span), Some(spans)) = (self.span.take(), &self.auditor.spans) {
            spans.finish_server(span, rpc, code, |a| {
                self.fields(rpc, code_name, micros, trace_id.as_deref(), a)
            });
        }
        // The members in the event's own order (message first, as tracing
        // puts it), each as the formatter writes that field.
        let render = |m: &mut logging::JsonMembers<'_>| {
            m.str("message", "rpc");
            self.fields(rpc, code_name, micros, trace_id.as_deref(), m);
        };
        let code = code_name;
        logging::with_json_fields(render, || {
            tracing::info!(
                target: TARGET,
                caller = self.caller.as_deref().map(tracing::field::display),
                rpc = tracing::field::display(rpc),
                terminal = self.terminal.as_deref(),
                credential = self.credential.as_deref().map(tracing::field::display),
                code = tracing::field::display(code),
                upstream_status = self.upstream_status,
                token_fp = self.token_fp.as_ref().map(Fingerprint::as_str).map(tracing::field::display),
                idempotency_key = self.idempotency_key.map(|k| tracing::field::display(k.hyphenated())),
                peer = self.peer.map(tracing::field::display),
                duration_ms,
                trace_id = trace_id.as_deref().map(tracing::field::display),
                "rpc"
            )
        });
    }
}

impl Audit {
    /// The record's fields, in the audit event's order: the one list that
    /// both the JSON line and a trace span's attributes are written from.
    fn fields(
        &self,
        rpc: &str,
        code: &str,
        micros: u64,
        trace_id: Option<&str>,
        out: &mut impl Fields,
    ) {
        if let Some(caller) = &self.caller {
            out.str("caller", caller);
        }
        out.str("rpc", rpc);
        if let Some(terminal) = &self.terminal {
            out.str("terminal", terminal);
        }
        if let Some(credential) = &self.credential {
            out.str("credential", credential);
        }
        out.str("code", code);
        if let Some(status) = self.upstream_status {
            out.u64("upstream_status", status.into());
        }
        if let Some(fp) = &self.token_fp {
            out.fingerprint(fp.as_str());
        }
        if let Some(key) = self.idempotency_key {
            out.str(
                "idempotency_key",
                key.hyphenated().encode_lower(&mut Uuid::encode_buffer()),
            );
        }
        if let Some(peer) = &self.peer {
            out.peer(peer);
        }
        out.duration(micros);
        if let Some(trace_id) = trace_id {
            out.trace_id(trace_id);
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // Unfinished: the call's future was dropped (the caller cancelled or
        // its connection went away) before an answer.
        self.emit(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit line as the JSON format writes it, through the
    /// pre-rendered members or (`visit`) through tracing's field visitor.
    fn audit_line(visit: bool, fill: impl Fn(&mut Audit)) -> String {
        logging::visit_always(visit);
        let text = logging::json_output(|| {
            let clock = Clock::starting_at(std::time::SystemTime::UNIX_EPOCH);
            let auditor = Auditor::new(clock, Metrics::new());
            let mut a = auditor.start(
                Some(Rpc::CreateSession),
                Some("127.0.0.1:4711".parse().unwrap()),
                TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            fill(&mut a);
            a.finish(Code::ResourceExhausted);
        });
        logging::visit_always(false);
        // The timestamp differs between the two runs, nothing else may.
        let (_, rest) = text
            .split_once("\",\"level\"")
            .unwrap_or_else(|| panic!("a JSON line: {text:?}"));
        rest.to_owned()
    }

    // Paused: both lines take the same (zero) time.
    #[tokio::test(start_paused = true)]
    async fn pre_rendered_audit_lines_are_the_lines_the_field_visitor_writes() {
        let full = |a: &mut Audit| {
            a.caller("web".into());
            a.terminal("12\"34\\\n\u{1}é");
            a.credential(&Arc::from("acme"));
            a.upstream_status(Some(429));
            a.token(Fingerprint::of("token"));
            a.idempotency_key(Uuid::from_u128(0x5f0c6a8e_3b7d_4c2a_9e1f_2a4b6c8d0e1f));
        };
        let pre = audit_line(false, full);
        assert_eq!(pre, audit_line(true, full));
        for field in [
            "\"caller\":\"web\"",
            "\"terminal\":\"12\\\"34\\\\\\n\\u0001é\"",
            "\"upstream_status\":429",
            "\"idempotency_key\":\"5f0c6a8e-3b7d-4c2a-9e1f-2a4b6c8d0e1f\"",
            "\"peer\":\"127.0.0.1:4711\"",
            "\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"",
            "\"code\":\"RESOURCE_EXHAUSTED\"",
            "\"duration_ms\":0.0",
        ] {
            assert!(pre.contains(field), "{field} in {pre}");
        }
        // Every optional field left out.
        let bare = |_: &mut Audit| {};
        assert_eq!(audit_line(false, bare), audit_line(true, bare));
        assert!(!audit_line(false, bare).contains("caller"));
    }

    #[test]
    fn long_terminals_are_cut() {
        let auditor = Auditor::new(Clock::system(), Metrics::new());
        let mut a = auditor.start(None, None, None);
        a.terminal(&"é".repeat(100));
        assert_eq!(
            a.terminal.as_deref(),
            Some(&*format!("{}…", "é".repeat(64)))
        );
        a.terminal("1234001");
        assert_eq!(a.terminal.as_deref(), Some("1234001"));
        a.finish(Code::Ok);
    }
}
