//! The `otlp` scenario's collectors: OTLP/gRPC trace receivers (the
//! collector's `TraceService`, generated from the official protos) that
//! answer at once, or only after a delay (a slow collector). A dead
//! collector is a port nobody listens on.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{Request, Response, Status};

/// How the collector of one run behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No `[telemetry]`: traces off.
    Off,
    /// A collector that takes every batch at once.
    Up,
    /// Nothing listens at the endpoint.
    Down,
    /// A collector that answers each batch after [`SLOW`].
    Slow,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Off, Mode::Up, Mode::Down, Mode::Slow];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Up => "up",
            Mode::Down => "down",
            Mode::Slow => "slow",
        }
    }
}

/// A slow collector's answer time: under the broker's 10 s export timeout,
/// so batches do arrive, one every 5 s, while spans pile up behind them.
pub const SLOW: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
struct Receiver {
    delay: Option<Duration>,
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A collector for `mode`, served on the current runtime: its endpoint
/// (`None` for [`Mode::Off`]) and the count of spans it received.
pub async fn collector(mode: Mode) -> (Option<String>, Arc<AtomicU64>) {
    let spans = Arc::new(AtomicU64::new(0));
    let delay = match mode {
        Mode::Off => return (None, spans),
        Mode::Down => {
            let dead: SocketAddr = crate::child::free_addr();
            return (Some(format!("http://{dead}")), spans);
        }
        Mode::Up => None,
        Mode::Slow => Some(SLOW),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    let receiver = Receiver {
        delay,
        spans: Arc::clone(&spans),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (Some(format!("http://{addr}")), spans)
}
