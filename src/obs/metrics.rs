//! Prometheus metrics: what the broker counts, and the `/metrics` endpoint
//! that serves them in Prometheus' text format (version 0.0.4).
//!
//! Hand-written rather than `prometheus-client` or `metrics`: the contract
//! fixes ten names, the RPC counters sit on the cached path (one array index
//! and an atomic add per call, no label hashing or lock), the gauges are read
//! from the token caches at scrape time, and the whole format is a few
//! dozen lines: no new dependency for that. The endpoint is plain hyper
//! (already in the tree through tonic), so production builds without the
//! `sandbox` feature serve it too.
//!
//! Labels hold only bounded, non-secret values: RPC names, gRPC code names,
//! endpoint names, HTTP statuses, and the credential and caller names of the
//! configuration. Never a terminal id, a key or a token.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::Semaphore};
use tonic::Code;

use crate::{
    payroc::{Attempt, AttemptObserver, Endpoint},
    rpc::{Rpc, code_name},
    sync::lock,
};

/// gRPC status codes 0..=16.
const CODES: usize = 17;

/// Bucket bounds in seconds: from a cached token (well under a millisecond)
/// to an upstream exchange with retries (seconds).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What a scrape reads now rather than counts: filled in by whoever owns
/// what it measures (the server reads the token caches and the log queue), so
/// that the metrics know nothing of the broker.
#[derive(Debug, Default)]
pub struct Gauges<'a> {
    pub credentials: Vec<CredentialGauges<'a>>,
    /// Session requests to Payroc in flight.
    pub sessions_in_flight: usize,
    /// Log lines dropped since start.
    pub log_lines_dropped: u64,
}

/// One credential's gauges.
#[derive(Debug)]
pub struct CredentialGauges<'a> {
    pub name: &'a str,
    /// Seconds until the cached token expires (0: none, or expired).
    pub expiry_seconds: f64,
    /// Failed identity fetches in a row.
    pub refresh_failures: u32,
}

/// What the broker counts. One per server; cheap to share.
pub struct Metrics {
    rpcs: [[AtomicU64; CODES]; Rpc::COUNT],
    rpc_duration: [Histogram; Rpc::COUNT],
    /// (endpoint index, HTTP status; 0 for "error") -> requests.
    upstream: Mutex<BTreeMap<(usize, u16), u64>>,
    upstream_duration: [Histogram; Endpoint::ALL.len()],
    rate_limited: Mutex<BTreeMap<String, u64>>,
    /// Trace spans sent to the collector, and dropped (queue full, export
    /// failed or timed out); both 0 without `[telemetry] otlp_endpoint`.
    spans_exported: AtomicU64,
    spans_dropped: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            rpcs: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            rpc_duration: std::array::from_fn(|_| Histogram::default()),
            upstream: Mutex::default(),
            upstream_duration: std::array::from_fn(|_| Histogram::default()),
            rate_limited: Mutex::default(),
            spans_exported: AtomicU64::new(0),
            spans_dropped: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// One finished RPC.
    pub fn rpc(&self, rpc: Rpc, code: Code, took: Duration) {
        let i = rpc.index();
        let c = (code as usize).min(CODES - 1);
        self.rpcs[i][c].fetch_add(1, Ordering::Relaxed);
        self.rpc_duration[i].observe(took);
    }

    /// One upstream HTTP attempt: its status, or `None` when no response came
    /// (connection failure, timeout, abandoned at the caller's deadline).
    fn upstream(&self, endpoint: Endpoint, status: Option<u16>, took: Duration) {
        let e = endpoint.index();
        *lock(&self.upstream)
            .entry((e, status.unwrap_or(0)))
            .or_default() += 1;
        self.upstream_duration[e].observe(took);
    }

    /// `n` trace spans the collector took.
    pub fn spans_exported(&self, n: u64) {
        self.spans_exported.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` trace spans lost: the export queue was full, or the collector
    /// refused them or did not answer in time.
    pub fn spans_dropped(&self, n: u64) {
        self.spans_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// A call refused by the caller's `rate_limit`.
    pub fn caller_rate_limited(&self, caller: &str) {
        let mut map = lock(&self.rate_limited);
        match map.get_mut(caller) {
            Some(n) => *n += 1,
            None => {
                map.insert(caller.to_owned(), 1);
            }
        }
    }

    /// RPCs counted for `rpc` with `code` so far (tests).
    pub fn rpcs_total(&self, rpc: Rpc, code: Code) -> u64 {
        self.rpcs[rpc.index()][code as usize].load(Ordering::Relaxed)
    }

    /// The exposition: counters as counted, and `gauges` as read now by
    /// whoever owns what they measure.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let o = &mut out;

        header(
            o,
            "payroc_broker_rpcs_total",
            "counter",
            "TokenBroker and ext_authz calls answered, by RPC and gRPC code.",
        );
        for (i, rpc) in Rpc::ALL.iter().enumerate() {
            for (c, n) in self.rpcs[i].iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let code = code_name(Code::from_i32(c as i32));
                    let _ = writeln!(
                        o,
                        "payroc_broker_rpcs_total{{rpc=\"{}\",code=\"{code}\"}} {n}",
                        rpc.name()
                    );
                }
            }
        }

        header(
            o,
            "payroc_broker_rpc_duration_seconds",
            "histogram",
            "Time to answer a call, by RPC.",
        );
        for (i, rpc) in Rpc::ALL.iter().enumerate() {
            let labels = format!("rpc=\"{}\"", rpc.name());
            self.rpc_duration[i].render(o, "payroc_broker_rpc_duration_seconds", &labels);
        }

        header(
            o,
            "payroc_broker_upstream_requests_total",
            "counter",
            "HTTP requests to Payroc, by endpoint and HTTP status (`error`: no response).",
        );
        for ((e, status), n) in lock(&self.upstream).iter() {
            let status = match status {
                0 => "error".to_owned(),
                s => s.to_string(),
            };
            let _ = writeln!(
                o,
                "payroc_broker_upstream_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                Endpoint::ALL[*e].label()
            );
        }

        header(
            o,
            "payroc_broker_upstream_duration_seconds",
            "histogram",
            "Time of one HTTP request to Payroc, by endpoint.",
        );
        for (e, endpoint) in Endpoint::ALL.iter().enumerate() {
            let labels = format!("endpoint=\"{}\"", endpoint.label());
            self.upstream_duration[e].render(o, "payroc_broker_upstream_duration_seconds", &labels);
        }

        header(
            o,
            "payroc_broker_token_expiry_seconds",
            "gauge",
            "Seconds until the cached Bearer token expires (0: none, or expired).",
        );
        for c in &gauges.credentials {
            let _ = writeln!(
                o,
                "payroc_broker_token_expiry_seconds{{credential=\"{}\"}} {}",
                escape(c.name),
                c.expiry_seconds
            );
        }
        header(
            o,
            "payroc_broker_token_refresh_failures",
            "gauge",
            "Failed identity fetches in a row (0 after a success).",
        );
        for c in &gauges.credentials {
            let _ = writeln!(
                o,
                "payroc_broker_token_refresh_failures{{credential=\"{}\"}} {}",
                escape(c.name),
                c.refresh_failures
            );
        }

        header(
            o,
            "payroc_broker_caller_rate_limited_total",
            "counter",
            "Calls refused by the caller's rate_limit.",
        );
        for (caller, n) in lock(&self.rate_limited).iter() {
            let _ = writeln!(
                o,
                "payroc_broker_caller_rate_limited_total{{caller=\"{}\"}} {n}",
                escape(caller)
            );
        }

        unlabelled(
            o,
            "payroc_broker_sessions_in_flight",
            "gauge",
            "Session requests to Payroc in flight.",
            gauges.sessions_in_flight,
        );

        unlabelled(
            o,
            "payroc_broker_log_lines_dropped_total",
            "counter",
            "Log lines dropped because stderr was slow, full or closed.",
            gauges.log_lines_dropped,
        );

        unlabelled(
            o,
            "payroc_broker_trace_spans_exported_total",
            "counter",
            "Trace spans the OTLP collector accepted.",
            self.spans_exported.load(Ordering::Relaxed),
        );
        unlabelled(
            o,
            "payroc_broker_trace_spans_dropped_total",
            "counter",
            "Trace spans dropped: export queue full, or the collector refused them or did not answer in time.",
            self.spans_dropped.load(Ordering::Relaxed),
        );

        header(
            o,
            "payroc_broker_build_info",
            "gauge",
            "Always 1; the version is in the label.",
        );
        let _ = writeln!(
            o,
            "payroc_broker_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

/// The Payroc client's attempts, counted as `upstream_*`.
impl AttemptObserver for Metrics {
    fn attempt(&self, a: &Attempt) {
        self.upstream(a.endpoint, a.status, a.took);
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family of one series without labels: its header and its value.
fn unlabelled(o: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(o, name, kind, help);
    let _ = writeln!(o, "{name} {value}");
}

/// A label value, escaped as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A histogram with the fixed [`BUCKETS`]; lock-free.
struct Histogram {
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, o: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(o, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(o, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Scrapes served at once at most; more connections wait to be accepted.
const MAX_SCRAPERS: usize = 16;
/// A scraper must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The `/metrics` server; stops when dropped.
pub struct MetricsServer(tokio::task::JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `GET /metrics` on `listener` with what `render` returns, until the
/// returned server is dropped. Anything else is 404 (405 for other methods
/// on `/metrics`).
pub fn serve(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> MetricsServer {
    use http_body_util::Full;
    use hyper::{Method, Request, Response, StatusCode, body::Bytes, header};
    let render = Arc::new(render);
    let gate = Arc::new(Semaphore::new(MAX_SCRAPERS));
    MetricsServer(tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(error) => {
                    // Out of file descriptors, usually: the gRPC port matters
                    // more; try again on the next scrape.
                    tracing::debug!(%error, "metrics listener: accept failed");
                    continue;
                }
            };
            let render = Arc::clone(&render);
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = Arc::clone(&render);
                async move {
                    let (status, body) = match (req.method(), req.uri().path()) {
                        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, render()),
                        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
                        _ => (StatusCode::NOT_FOUND, "see /metrics\n".to_owned()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _permit = permit;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = conn.await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "rpc=\"A\"");
        assert!(
            out.contains("x_bucket{rpc=\"A\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{rpc=\"A\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{rpc=\"A\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{rpc=\"A\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{rpc=\"A\"} 60.0033\n"), "{out}");
        assert!(out.contains("x_count{rpc=\"A\"} 3\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
