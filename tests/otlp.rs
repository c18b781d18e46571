//! OpenTelemetry traces (feature `otlp`) against a real OTLP receiver: a
//! tonic server for `opentelemetry.proto.collector.trace.v1.TraceService`
//! generated from the official protos, on loopback. Spans arrive with the
//! right parent, attributes and status; a collector that is down or stalled
//! changes no call's outcome.

#![cfg(feature = "otlp")]

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use payroc_sim::SimEndpoint;
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, metadata::MetadataValue};

/// What the collector received: each span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// Never answer (a collector that accepts connections and hangs).
    stall: bool,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        if self.stall {
            std::future::pending::<()>().await;
        }
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start(stall: bool) -> (Collector, SocketAddr) {
        let collector = Collector {
            stall,
            ..Collector::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (15 s at most) until `found` finds what it looks for in the
    /// spans received so far.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(Vec<Span>) -> Option<T>) -> T {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let spans: Vec<Span> = self.spans().into_iter().map(|(_, s)| s).collect();
            if let Some(t) = found(spans.clone()) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "{what} within 15 s; got {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until spans of `trace` have arrived, `n` of them at least.
    async fn trace(&self, trace: &str, n: usize) -> Vec<Span> {
        self.wait_for(&format!("{n} spans of trace {trace}"), |spans| {
            let of_trace: Vec<Span> = spans
                .into_iter()
                .filter(|s| hex(&s.trace_id) == trace)
                .collect();
            (of_trace.len() >= n).then_some(of_trace)
        })
        .await
    }
}

/// The span of `kind` among `spans` (there is one).
fn of_kind(spans: &[Span], kind: SpanKind) -> &Span {
    spans
        .iter()
        .find(|s| s.kind == kind as i32)
        .unwrap_or_else(|| panic!("a {kind:?} span in {spans:#?}"))
}

/// A span's status code (`Unset` when it has no status).
fn status_code(s: &Span) -> i32 {
    s.status
        .as_ref()
        .map_or(StatusCode::Unset as i32, |st| st.code)
}

fn text(v: Option<&AnyValue>) -> Option<String> {
    match v?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(kv.value.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced<T>(msg: T, traceparent: &'static str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("traceparent", MetadataValue::from_static(traceparent));
    r
}

fn telemetry(endpoint: SocketAddr, ratio: &str) -> String {
    format!(
        "otlp_endpoint = \"http://{endpoint}\"\nservice_name = \"broker-under-test\"\nsample_ratio = {ratio}\n"
    )
}

const T_BEARER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const T_SESSION: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const T_REFUSED: &str = "00-11111111111111111111111111111111-2222222222222222-01";
const T_FORBIDDEN: &str = "00-33333333333333333333333333333333-4444444444444444-01";
const T_UNSAMPLED: &str = "00-55555555555555555555555555555555-6666666666666666-00";

fn trace_id(traceparent: &str) -> &str {
    &traceparent[3..35]
}

fn parent_id(traceparent: &str) -> &str {
    &traceparent[36..52]
}

#[tokio::test]
async fn sampled_calls_arrive_with_their_parent_attributes_and_status() {
    let (collector, endpoint) = Collector::start(false).await;
    // Ratio 0: only what a caller's sampled traceparent asks for is traced.
    let h = Harness::with(Options {
        telemetry: telemetry(endpoint, "0"),
        ..Options::default()
    })
    .await;
    let mut client = h.client.clone();

    // Neither of these is traced: an unsampled parent, and no parent at
    // ratio 0. Sent first, so that their spans (if any) would arrive before
    // the ones waited for below.
    client
        .get_bearer_token(traced(bearer_request("1234001"), T_UNSAMPLED))
        .await
        .unwrap();
    let bearer = h.bearer("1234001").await.unwrap();

    client
        .get_bearer_token(traced(bearer_request("1234001"), T_BEARER))
        .await
        .unwrap();
    client
        .create_session(traced(payment("1234001"), T_SESSION))
        .await
        .unwrap();
    let refused = client
        .get_bearer_token(traced(bearer_request("9999001"), T_REFUSED))
        .await
        .unwrap_err();
    // Payroc answers 403: globex's terminal under acme's key.
    let forbidden = client
        .create_session(traced(payment("5678002"), T_FORBIDDEN))
        .await
        .unwrap_err();

    // GetBearerToken: a server span, child of the caller's span.
    let spans = collector.trace(trace_id(T_BEARER), 1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let s = &spans[0];
    assert_eq!(s.name, "GetBearerToken");
    assert_eq!(s.kind, SpanKind::Server as i32);
    assert_eq!(hex(&s.parent_span_id), parent_id(T_BEARER));
    assert_ne!(hex(&s.span_id), parent_id(T_BEARER));
    assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
    for (key, value) in [
        ("rpc", "GetBearerToken"),
        ("code", "OK"),
        ("terminal", "1234001"),
        ("credential", "acme"),
        ("rpc.grpc.status_code", "0"),
    ] {
        assert_eq!(attr(s, key).as_deref(), Some(value), "{key} in {s:#?}");
    }
    assert!(attr(s, "peer").is_some_and(|p| p.starts_with("127.0.0.1:")));
    assert_eq!(attr(s, "token_fp"), None, "no token fingerprint in a span");
    assert_eq!(status_code(s), StatusCode::Unset as i32);

    // CreateSession: the server span, and under it the client span of the
    // HTTP attempt, whose id is the parent id Payroc received.
    let spans = collector.trace(trace_id(T_SESSION), 2).await;
    let server = of_kind(&spans, SpanKind::Server);
    let attempt = of_kind(&spans, SpanKind::Client);
    assert_eq!(server.name, "CreateSession");
    assert_eq!(hex(&server.parent_span_id), parent_id(T_SESSION));
    assert_eq!(
        attr(server, "upstream_status").as_deref(),
        Some("201"),
        "{server:#?}"
    );
    assert!(attr(server, "idempotency_key").is_some());
    assert_eq!(attempt.name, "POST sessions");
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        attr(attempt, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(
        attr(attempt, "payroc.endpoint").as_deref(),
        Some("sessions")
    );
    assert_eq!(status_code(attempt), StatusCode::Unset as i32);
    let sent = format!("00-{}-{}-01", trace_id(T_SESSION), hex(&attempt.span_id));
    assert!(
        h.sim
            .traceparents()
            .contains(&(SimEndpoint::Sessions, sent.clone())),
        "Payroc received {sent}: {:?}",
        h.sim.traceparents()
    );

    // A refusal is the caller's error, not the server's: status unset.
    let spans = collector.trace(trace_id(T_REFUSED), 1).await;
    assert_eq!(
        attr(&spans[0], "code").as_deref(),
        Some(rpc_code(refused.code()))
    );
    assert_eq!(status_code(&spans[0]), StatusCode::Unset as i32);

    // An attempt Payroc answered 403 is an error of the client span.
    let spans = collector.trace(trace_id(T_FORBIDDEN), 2).await;
    let attempt = of_kind(&spans, SpanKind::Client);
    assert_eq!(
        attr(attempt, "http.response.status_code").as_deref(),
        Some("403")
    );
    assert_eq!(status_code(attempt), StatusCode::Error as i32);
    let server = of_kind(&spans, SpanKind::Server);
    assert_eq!(
        attr(server, "code").as_deref(),
        Some(rpc_code(forbidden.code()))
    );

    let all = collector.spans();
    assert!(
        all.iter()
            .all(|(service, _)| service == "broker-under-test")
    );
    assert!(
        !all.iter()
            .any(|(_, s)| hex(&s.trace_id) == trace_id(T_UNSAMPLED)),
        "an unsampled parent is not traced"
    );
    // 1 + 2 + 1 + 2: nothing for the two untraced calls.
    assert_eq!(all.len(), 6, "{all:#?}");
    // No secret in any attribute: API keys, the Bearer token.
    let secrets = [KEY_ACME, KEY_GLOBEX, bearer.access_token.as_str()];
    for (_, s) in &all {
        for kv in &s.attributes {
            let v = text(kv.value.as_ref()).unwrap_or_default();
            assert!(
                !secrets.iter().any(|secret| v.contains(secret)),
                "{} holds a secret",
                kv.key
            );
        }
    }
}

fn rpc_code(code: Code) -> &'static str {
    match code {
        Code::NotFound => "NOT_FOUND",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        other => panic!("unexpected code {other:?}"),
    }
}

#[tokio::test]
async fn a_trace_started_here_is_a_root_span_and_goes_upstream() {
    let (collector, endpoint) = Collector::start(false).await;
    let h = Harness::with(Options {
        telemetry: telemetry(endpoint, "1.0"),
        ..Options::default()
    })
    .await;
    h.session(payment("1234002")).await.unwrap();
    let server = collector
        .wait_for("a CreateSession span", |spans| {
            spans.into_iter().find(|s| s.name == "CreateSession")
        })
        .await;
    assert!(server.parent_span_id.is_empty(), "a root span: {server:#?}");
    let trace = hex(&server.trace_id);
    let spans = collector.trace(&trace, 2).await;
    let attempt = of_kind(&spans, SpanKind::Client);
    assert_eq!(attempt.parent_span_id, server.span_id);
    // Payroc got the trace the broker started.
    let sent = format!("00-{trace}-{}-01", hex(&attempt.span_id));
    assert!(
        h.sim
            .traceparents()
            .contains(&(SimEndpoint::Sessions, sent)),
        "{:?}",
        h.sim.traceparents()
    );
}

/// Calls that must all succeed whatever the collector does.
async fn calls_succeed(h: &Harness, n: usize) {
    for i in 0..n {
        let terminal = ["1234001", "1234002", "5678001"][i % 3];
        h.bearer(terminal).await.unwrap();
    }
    h.session(payment("1234001")).await.unwrap();
}

#[tokio::test]
async fn a_dead_collector_changes_no_outcome_and_its_spans_are_counted_dropped() {
    // A port nobody listens on.
    let endpoint = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let h = Harness::with(Options {
        telemetry: telemetry(endpoint, "1.0"),
        metrics: true,
        ..Options::default()
    })
    .await;
    calls_succeed(&h, 30).await;
    let dropped = |page: &str| -> u64 {
        page.lines()
            .find_map(|l| l.strip_prefix("payroc_broker_trace_spans_dropped_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // 30 + 1 server spans and the session's client span, at least.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = h.scrape().await;
        if dropped(&page) >= 32 {
            assert!(
                page.contains("payroc_broker_trace_spans_exported_total 0"),
                "{page}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "spans counted dropped: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the broker still answers, and stops in time.
    calls_succeed(&h, 3).await;
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stalled_collector_changes_no_outcome_and_does_not_hold_up_the_exit() {
    let (collector, endpoint) = Collector::start(true).await;
    let h = Harness::with(Options {
        telemetry: telemetry(endpoint, "1.0"),
        ..Options::default()
    })
    .await;
    calls_succeed(&h, 30).await;
    // Give the exporter time to send its first batch into the stall.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    calls_succeed(&h, 3).await;
    // The harness allows 10 s; the exit waits for the collector 2 s at most.
    h.shutdown().await.unwrap();
    assert!(collector.spans().is_empty());
}
