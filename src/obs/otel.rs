//! OpenTelemetry traces (cargo feature `otlp`, `[telemetry] otlp_endpoint`):
//! one server span per call, made from its audit record, one client span
//! per HTTP attempt to Payroc, exported over OTLP/gRPC.
//!
//! Export never blocks or slows a call: a finished span goes into a bounded
//! queue with `try_send`, and one task sends batches to the collector. A
//! full queue (the collector slow or down) drops the span, counted in
//! `payroc_broker_trace_spans_dropped_total`, as is a batch the collector
//! refused or did not take in time.
//!
//! Why not `tracing-opentelemetry` and the SDK's `BatchSpanProcessor`, the
//! usual route: the broker has no `tracing` span per call (a span is a
//! subscriber call and an allocation, BENCHMARKS.md), and bridging
//! `tracing` spans would bring one back for every call and visit every
//! field again; the audit record already holds the call's fields, typed. And
//! the SDK's processor counts the spans it drops only in a log line at
//! shutdown, where an SRE needs a metric. So spans are `SpanData` built here
//! and handed to `opentelemetry-otlp`'s exporter; the SDK's parent-based
//! ratio sampler decides which.
//!
//! Span ids are the ones on the wire: a sampled call's trace scope is its
//! server span, so the `traceparent` the Payroc client sends names the
//! attempt's span as parent, and the attempt's client span has the id that
//! value carries (`AttemptTrace`).

use std::{borrow::Cow, fmt, net::SocketAddr, sync::Arc, time::Duration};

use opentelemetry::{
    Context, InstrumentationScope, KeyValue,
    trace::{
        SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    },
};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{
        Sampler, SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanExporter, SpanLinks,
    },
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tonic::Code;

use crate::{
    clock::{Clock, SharedEntropy},
    config::TelemetryConfig,
    obs::{fields::Fields, metrics::Metrics},
    payroc::{Attempt, AttemptObserver, Endpoint},
    trace::TraceParent,
};

/// Finished spans waiting for the exporter. At the default batch size a
/// few seconds of a busy broker; past it, spans are dropped, never waited for.
const QUEUE: usize = 4096;
/// Spans per export request (the SDK's default).
const MAX_BATCH: usize = 512;
/// How long the exporter gathers a batch before sending it (the SDK waits
/// 5 s; shorter, so that a trace shows up while someone is looking for it).
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// One export request (a single attempt); then its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the exporter could not be set up.
#[derive(Debug)]
pub struct OtlpError(String);

impl fmt::Display for OtlpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot set up the OTLP exporter (telemetry.otlp_endpoint): {}",
            self.0
        )
    }
}

impl std::error::Error for OtlpError {}

/// Makes and queues spans; shared by the auditor and the Payroc client.
pub struct Spans {
    sampler: Sampler,
    clock: Clock,
    entropy: SharedEntropy,
    queue: mpsc::Sender<SpanData>,
    metrics: Arc<Metrics>,
    scope: InstrumentationScope,
}

impl fmt::Debug for Spans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spans").finish_non_exhaustive()
    }
}

/// The export thread; [`Exporter::shutdown`] sends what is queued.
pub struct Exporter {
    stop: Option<oneshot::Sender<()>>,
    /// Sent when the thread is done.
    done: Option<oneshot::Receiver<()>>,
}

/// A sampled call's server span, open.
#[derive(Debug)]
pub struct ServerSpan {
    /// The span's own context: this trace, this span's id as parent id
    /// (what the call passes on).
    context: TraceParent,
    /// The caller's span, when the call came with a `traceparent`.
    parent: Option<[u8; 8]>,
    started: Instant,
}

impl ServerSpan {
    /// The trace context the call passes on: this span as parent.
    pub fn context(&self) -> TraceParent {
        self.context
    }
}

/// Starts exporting to `config.otlp_endpoint`; `None` when it is not set.
///
/// The export loop runs on a thread of its own, with its own single-thread
/// runtime: converting and encoding a batch (about 25,000 instructions a
/// span, BENCHMARKS.md) then never sits in an RPC worker's queue.
pub fn start(
    config: &TelemetryConfig,
    clock: Clock,
    entropy: SharedEntropy,
    metrics: Arc<Metrics>,
) -> Result<Option<(Arc<Spans>, Exporter)>, OtlpError> {
    let Some(endpoint) = config.otlp_endpoint.clone() else {
        return Ok(None);
    };
    let (queue, rx) = mpsc::channel(QUEUE);
    let (stop, stopped) = oneshot::channel();
    let (done_tx, done) = oneshot::channel();
    let (built_tx, built) = std::sync::mpsc::channel();
    let service_name = config.service_name.clone();
    let export_metrics = Arc::clone(&metrics);
    let thread_endpoint = endpoint.clone();
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = built_tx.send(Err(OtlpError(format!("no runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                // Built here: the collector's channel lives on this runtime.
                match exporter(&thread_endpoint, &service_name) {
                    Ok(exporter) => {
                        let _ = built_tx.send(Ok(()));
                        export(exporter, rx, stopped, export_metrics).await;
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                    }
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(|e| OtlpError(format!("cannot start the export thread: {e}")))?;
    built
        .recv()
        .map_err(|_| OtlpError("the export thread ended before it started".into()))??;
    tracing::info!(endpoint = %endpoint, sample_ratio = config.sample_ratio, "exporting traces over OTLP");
    let spans = Spans {
        sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))),
        clock,
        entropy,
        queue,
        metrics,
        scope: InstrumentationScope::builder("payroc-broker")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    };
    Ok(Some((
        Arc::new(spans),
        Exporter {
            stop: Some(stop),
            done: Some(done),
        },
    )))
}

/// The OTLP/gRPC exporter for `endpoint`: an https:// one verifies the
/// collector against the webpki roots.
fn exporter(endpoint: &str, service_name: &str) -> Result<impl SpanExporter, OtlpError> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        // One attempt per batch: a failed batch is dropped (and counted)
        // and the next one tries again. The exporter's own retries convert
        // and send the batch anew each time, which made a dead collector
        // cost more per call than a live one (BENCHMARKS.md).
        .with_retry_policy(RetryPolicy::disabled());
    if endpoint.starts_with("https:") {
        // Without roots of its own the exporter's TLS config trusts none.
        builder =
            builder.with_tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots());
    }
    let mut exporter = builder
        .build()
        .map_err(|e| OtlpError(crate::chain::error_chain(&e)))?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(service_name.to_owned())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    Ok(exporter)
}

impl Exporter {
    /// Sends the spans still queued, waiting at most `grace`. Spans still
    /// queued or in flight when it is over are lost, and not counted: the
    /// process is exiting.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(grace, done).await;
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // The thread sends what is queued and ends (it also ends once every
        // `Spans` is gone and the queue is empty).
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The export loop: a batch when [`MAX_BATCH`] spans are waiting or
/// [`BATCH_DELAY`] after the first, one request at a time.
async fn export(
    exporter: impl SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
) {
    let mut failing = false;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
                _ = &mut stop => { stopping = true; rx.close(); }
            }
            if !stopping && batch.len() < MAX_BATCH {
                let gather = tokio::time::sleep(BATCH_DELAY);
                tokio::pin!(gather);
                while batch.len() < MAX_BATCH {
                    let room = MAX_BATCH - batch.len();
                    tokio::select! {
                        n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                        _ = &mut gather => break,
                        _ = &mut stop => { stopping = true; rx.close(); break }
                    }
                }
            }
        }
        if stopping {
            // Closed: take what is left without waiting.
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
        }
        let n = batch.len() as u64;
        let sent = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let outcome = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(sent)).await;
        match outcome {
            Ok(Ok(())) => {
                metrics.spans_exported(n);
                if std::mem::take(&mut failing) {
                    tracing::info!("exporting traces works again");
                }
            }
            Ok(Err(e)) => {
                metrics.spans_dropped(n);
                if !std::mem::replace(&mut failing, true) {
                    // Once per outage, not once per batch.
                    tracing::warn!(error = %e, "exporting traces failed; spans are dropped until the collector takes them (payroc_broker_trace_spans_dropped_total)");
                }
            }
            Err(_) => {
                metrics.spans_dropped(n);
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(timeout = ?EXPORT_TIMEOUT, "exporting traces timed out; spans are dropped until the collector takes them (payroc_broker_trace_spans_dropped_total)");
                }
            }
        }
    }
}

impl Spans {
    /// The server span of a call that came with `incoming`, if sampled:
    /// parent based (a sampled `traceparent` is always followed, an
    /// unsampled one never), the ratio for traces that start here.
    pub fn start_server(
        &self,
        rpc: &'static str,
        incoming: Option<TraceParent>,
    ) -> Option<ServerSpan> {
        // A trace started here: only its id before the decision (the ratio
        // sampler reads it), the span id once it is sampled.
        let (id, parent) = match incoming {
            Some(t) => (t.trace_id_bytes(), Some(t.parent_id_bytes())),
            None => (crate::trace::trace_id(&*self.entropy), None),
        };
        let trace_id = TraceId::from_bytes(id);
        let parent_cx = incoming.map(|t| {
            Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                SpanId::from_bytes(t.parent_id_bytes()),
                if t.sampled() {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            ))
        });
        let decision = self
            .sampler
            .should_sample(
                parent_cx.as_ref(),
                trace_id,
                rpc,
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision;
        if decision != SamplingDecision::RecordAndSample {
            return None;
        }
        let context = match incoming {
            Some(t) => t.child(&*self.entropy).with_sampled(true),
            None => TraceParent::root_of(id, &*self.entropy, true),
        };
        Some(ServerSpan {
            context,
            parent,
            started: self.clock.now(),
        })
    }

    /// Ends `span` as call `rpc` answered with `code`; `fields` writes the
    /// audit record's fields as its attributes.
    pub fn finish_server(
        &self,
        span: ServerSpan,
        rpc: &'static str,
        code: Code,
        fields: impl FnOnce(&mut Attributes),
    ) {
        let mut attributes = Attributes(Vec::with_capacity(12));
        attributes
            .0
            .push(KeyValue::new("rpc.grpc.status_code", code as i64));
        fields(&mut attributes);
        // OpenTelemetry's gRPC conventions: a server span is an error for
        // the codes that mean the server failed, not for refusals.
        let status = match code {
            Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss => Status::error(crate::rpc::code_name(code)),
            _ => Status::Unset,
        };
        let now = self.clock.now();
        self.queue(SpanData {
            span_context: self.context_of(span.context),
            parent_span_id: span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: SpanKind::Server,
            name: Cow::Borrowed(rpc),
            start_time: self.clock.wall(span.started),
            end_time: self.clock.wall(now),
            attributes: attributes.0,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }

    fn context_of(&self, t: TraceParent) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(t.trace_id_bytes()),
            SpanId::from_bytes(t.parent_id_bytes()),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    fn queue(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.metrics.spans_dropped(1);
        }
    }
}

/// One client span per sampled attempt: the attempt's `traceparent` is its
/// context, the call's server span its parent.
impl AttemptObserver for Spans {
    fn attempt(&self, a: &Attempt) {
        let Some(t) = a.trace.filter(|t| t.sent.sampled()) else {
            return;
        };
        let end = self.clock.wall(self.clock.now());
        let mut attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("payroc.endpoint", a.endpoint.label()),
        ];
        // OpenTelemetry's HTTP conventions: for a client, any 4xx or 5xx
        // is an error, as is no answer at all.
        let status = match a.status {
            Some(s) => {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
                match s {
                    400.. => Status::error(s.to_string()),
                    _ => Status::Unset,
                }
            }
            None => {
                attributes.push(KeyValue::new("error.type", "no response"));
                Status::error("no response (connection failure, timeout or abandoned)")
            }
        };
        self.queue(SpanData {
            span_context: self.context_of(t.sent),
            parent_span_id: SpanId::from_bytes(t.parent.parent_id_bytes()),
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: Cow::Borrowed(match a.endpoint {
                Endpoint::Identity => "POST identity",
                Endpoint::Sessions => "POST sessions",
            }),
            start_time: end.checked_sub(a.took).unwrap_or(end),
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// A server span's attributes: the audit record's fields but the token's
/// fingerprint (a trace backend is not where token identities belong), its
/// duration (the span has one) and trace id (the span is in it).
pub struct Attributes(Vec<KeyValue>);

impl Fields for Attributes {
    fn str(&mut self, name: &'static str, value: &str) {
        self.0.push(KeyValue::new(name, value.to_owned()));
    }

    fn u64(&mut self, name: &'static str, value: u64) {
        self.0.push(KeyValue::new(
            name,
            i64::try_from(value).unwrap_or(i64::MAX),
        ));
    }

    fn peer(&mut self, value: &SocketAddr) {
        self.0.push(KeyValue::new("peer", value.to_string()));
    }

    fn duration(&mut self, _micros: u64) {}

    fn fingerprint(&mut self, _value: &str) {}

    fn trace_id(&mut self, _value: &str) {}
}
