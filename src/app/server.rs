//! Assembly: the TokenBroker service with health, reflection, live reload,
//! connection limits and graceful shutdown, on a listener the caller has
//! already bound (so tests bind port 0 and learn the address first).

use std::{collections::HashMap, future::Future, sync::Arc};

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt, future::OptionFuture};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::service::Routes;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    access::{Callers, layer::Admission},
    api::ext_authz::{self, ExtAuthzService},
    api::{identity::IdentityService, state::State, token_broker::TokenBrokerService},
    clock::{Clock, SharedEntropy},
    config::Config,
    domain::broker::Broker,
    domain::tokens::TokenHealth,
    obs::audit::Auditor,
    obs::metrics::{CredentialGauges, Gauges, Metrics},
    payroc::AttemptObserver,
    proto::{self, token_broker_server::TokenBrokerServer},
    transport::{Protocol, Transport, tls::TlsError},
};

/// The fully qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "payroc.broker.v1.TokenBroker";

/// Requests are a few hundred bytes; anything much larger is abuse.
const MAX_MESSAGE: usize = 64 * 1024;

/// How long the exit waits for the last trace spans to reach the collector.
#[cfg(feature = "otlp")]
const OTLP_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the server could not run.
#[derive(Debug)]
pub enum ServeError {
    /// The HTTP client could not be built (TLS roots, for example).
    Client(reqwest::Error),
    /// A `[server.tls]` file could not be used.
    Tls(TlsError),
    /// The listening socket failed.
    Transport(std::io::Error),
    Reflection(tonic_reflection::server::Error),
    /// `metrics_listen` could not be bound.
    Metrics(std::net::SocketAddr, std::io::Error),
    /// `identity_endpoint.listen` could not be bound.
    IdentityEndpoint(std::net::SocketAddr, std::io::Error),
    /// `[telemetry] otlp_endpoint` could not be used.
    #[cfg(feature = "otlp")]
    Otlp(crate::obs::otel::OtlpError),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Client(e) => write!(f, "cannot build the Payroc HTTP client: {e}"),
            ServeError::Tls(e) => write!(f, "{e}"),
            ServeError::Transport(e) => write!(f, "gRPC server failed: {e}"),
            ServeError::Reflection(e) => write!(f, "cannot build the reflection service: {e}"),
            ServeError::Metrics(addr, e) => {
                write!(f, "cannot listen on {addr} (server.metrics_listen): {e}")
            }
            ServeError::IdentityEndpoint(addr, e) => {
                write!(f, "cannot listen on {addr} (identity_endpoint.listen): {e}")
            }
            #[cfg(feature = "otlp")]
            ServeError::Otlp(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// The per-credential health entry: `payroc.broker.v1.TokenBroker/<credential>`.
pub fn credential_service_name(credential: &str) -> String {
    format!("{SERVICE_NAME}/{credential}")
}

/// Serves `config` on `listener` until `shutdown` completes, then turns health
/// NOT_SERVING, refuses new RPCs, and lets in-flight ones finish for up to
/// `config.server.shutdown_grace`. Each configuration from `reloads` (already
/// validated) replaces the running one without disturbing RPCs in flight.
///
/// With `server.metrics_listen`, Prometheus metrics are served there too;
/// with `[identity_endpoint]`, the identity endpoint on its `listen`.
pub async fn serve(
    listener: TcpListener,
    config: &Config,
    clock: Clock,
    entropy: SharedEntropy,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: impl Stream<Item = Config> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = match config.server.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Metrics(addr, e))?,
        ),
        None => None,
    };
    let identity = match &config.identity_endpoint {
        Some(endpoint) => Some(
            TcpListener::bind(endpoint.listen)
                .await
                .map_err(|e| ServeError::IdentityEndpoint(endpoint.listen, e))?,
        ),
        None => None,
    };
    let listeners = Listeners {
        grpc: listener,
        metrics,
        identity,
    };
    serve_on(listeners, config, clock, entropy, shutdown, reloads).await
}

/// The sockets the broker serves on, already bound (so tests can bind port
/// 0 and learn the addresses).
pub struct Listeners {
    /// The gRPC port (`server.listen`).
    pub grpc: TcpListener,
    /// Prometheus `/metrics` (`server.metrics_listen`).
    pub metrics: Option<TcpListener>,
    /// The identity endpoint (`identity_endpoint.listen`); ignored when the
    /// configuration has no `[identity_endpoint]`.
    pub identity: Option<TcpListener>,
}

/// [`serve`], on listeners bound by the caller instead of the configured
/// addresses.
pub async fn serve_on(
    listeners: Listeners,
    config: &Config,
    clock: Clock,
    entropy: SharedEntropy,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: impl Stream<Item = Config> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
        identity: identity_listener,
    } = listeners;
    let metrics = Metrics::new();
    // Traces (feature `otlp`): the Payroc client's attempts go to the
    // metrics and the span exporter, and each auditor makes server spans.
    #[cfg(feature = "otlp")]
    let traces = crate::obs::otel::start(
        &config.telemetry,
        clock.clone(),
        Arc::clone(&entropy),
        Arc::clone(&metrics),
    )
    .map_err(ServeError::Otlp)?;
    #[cfg(feature = "otlp")]
    let observer: Arc<dyn AttemptObserver> = match &traces {
        Some((spans, _)) => Arc::new((Arc::clone(&metrics), Arc::clone(spans))),
        None => Arc::clone(&metrics) as Arc<dyn AttemptObserver>,
    };
    #[cfg(not(feature = "otlp"))]
    let observer = Arc::clone(&metrics) as Arc<dyn AttemptObserver>;
    let auditor = {
        let auditor = Auditor::new(clock.clone(), Arc::clone(&metrics));
        #[cfg(feature = "otlp")]
        let auditor = match &traces {
            Some((spans, _)) => auditor.with_spans(Arc::clone(spans)),
            None => auditor,
        };
        auditor
    };
    let broker = Broker::new(
        config,
        clock.clone(),
        Arc::clone(&entropy),
        None,
        Arc::clone(&observer),
    )
    .map_err(ServeError::Client)?;
    let state = Arc::new(ArcSwap::from_pointee(State {
        broker,
        callers: Callers::new(config, clock.clone(), None),
    }));
    let service = TokenBrokerService::new(Arc::clone(&state), clock.clone(), auditor.clone());
    let metrics_server = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics serving on /metrics");
        }
        let (state, metrics, clock) = (Arc::clone(&state), Arc::clone(&metrics), clock.clone());
        crate::obs::metrics::serve(listener, move || {
            let state = state.load();
            metrics.render(&gauges(&state.broker, &clock))
        })
    });

    // NOT_SERVING until every credential's first fetch is done, or
    // warm_start_timeout: a slow identity service delays readiness only so long.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_overall(&health, ServingStatus::NotServing).await;
    let mut credential_health = CredentialHealth::new(health.clone());
    credential_health.follow(&state.load().broker).await;
    let ready = tokio::spawn({
        let (state, health, bound) = (
            Arc::clone(&state),
            health.clone(),
            config.server.warm_start_timeout,
        );
        async move {
            let broker = state.load_full();
            if tokio::time::timeout(bound, broker.broker.warmed())
                .await
                .is_err()
            {
                tracing::warn!(
                    ?bound,
                    "first Bearer tokens not all fetched in time; serving anyway"
                );
            }
            set_overall(&health, ServingStatus::Serving).await;
        }
    });

    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Error details are no service's types: without them grpcurl
            // prints "google.rpc.BadRequest is not recognized".
            .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET);
        // So that grpcurl can send a Check with a JSON body.
        match config.ext_authz.enabled {
            true => {
                builder.register_encoded_file_descriptor_set(proto::ENVOY_EXT_AUTHZ_DESCRIPTOR_SET)
            }
            false => builder,
        }
    };
    let reflection_v1 = reflection().build_v1().map_err(ServeError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    // Callers are identified and rate-limited on the headers, before the
    // body is read: an unidentified request costs no buffered body.
    let admit = {
        let service = service.clone();
        // `path` (`/payroc.broker.v1.TokenBroker/<Rpc>`) names the RPC in
        // the audit event of a call refused here, before any handler runs.
        move |path: &str,
              metadata: &tonic::metadata::MetadataMap,
              extensions: &tonic::Extensions| {
            service.admission(path, metadata, extensions)
        }
    };
    // Kept to end open WatchBearerToken streams at shutdown and to tell them
    // of reloads.
    let signals = service.clone();
    let broker_service = Admission::new(
        TokenBrokerServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        admit,
    );

    // Envoy's external authorization, on the same port: it shares the
    // state (callers, token caches) and follows reloads with it.
    let ext_authz = config.ext_authz.enabled.then(|| {
        ext_authz::server(ExtAuthzService::new(
            Arc::clone(&state),
            clock.clone(),
            auditor.clone(),
        ))
    });

    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let transport =
        Transport::new(&config.server, Protocol::Grpc, clock.clone()).map_err(ServeError::Tls)?;
    let tls = transport.reloader();
    let mut routes = Routes::builder();
    routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker_service);
    if let Some(ext_authz) = ext_authz {
        routes.add_service(ext_authz);
    }
    let routes = routes.routes().prepare();
    // Both ports stop on the same signal.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut server = tokio::spawn(transport.serve(listener, routes, stopped(stop_rx.clone())));

    // The identity endpoint: its own port, the same TLS and limits, the
    // same state; follows reloads with it.
    let identity = match identity_listener.filter(|_| config.identity_endpoint.is_some()) {
        None => None,
        Some(listener) => {
            let transport = Transport::new(&config.server, Protocol::Http, clock.clone())
                .map_err(ServeError::Tls)?;
            let reloader = transport.reloader();
            let service = IdentityService::new(Arc::clone(&state), clock.clone(), auditor.clone());
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, tls = config.server.tls.is_some(), "identity endpoint serving on /credentials/{{credential}}/authorize");
            }
            let task = tokio::spawn(transport.serve(listener, service, stopped(stop_rx.clone())));
            Some((task, reloader))
        }
    };
    let (mut identity_server, identity_tls) = match identity {
        Some((task, reloader)) => (Some(task), Some(reloader)),
        None => (None, None),
    };
    tracing::info!(
        addr = %local,
        tls = config.server.tls.is_some(),
        credentials = config.credentials.len(),
        callers = config.callers.len(),
        "payroc-broker serving"
    );

    let server_config = config.server.clone();
    let mut reloads = std::pin::pin!(reloads);
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            finished = &mut server => {
                // The server stopped on its own: that is an error worth exiting on.
                ready.abort();
                return finished.map_err(panic_to_error)?.map_err(ServeError::Transport);
            }
            Some(finished) = OptionFuture::from(identity_server.as_mut()) => {
                ready.abort();
                server.abort();
                return finished.map_err(panic_to_error)?.map_err(ServeError::Transport);
            }
            () = &mut shutdown => break,
            Some(next) = reloads.next() => {
                if next.ext_authz != config.ext_authz {
                    tracing::warn!("[ext_authz] settings changed; they take effect at the next restart");
                }
                if next.identity_endpoint != config.identity_endpoint {
                    tracing::warn!("[identity_endpoint] settings changed; they take effect at the next restart");
                }
                if next.telemetry != config.telemetry {
                    tracing::warn!("[telemetry] settings changed; they take effect at the next restart");
                }
                tls.reload(next.server.tls.as_ref());
                if let Some(identity_tls) = &identity_tls {
                    identity_tls.reload(next.server.tls.as_ref());
                }
                reload(&state, &next, &server_config, &clock, &entropy, &observer, &mut credential_health).await;
                signals.reloaded();
            }
        }
    }

    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: health NOT_SERVING, draining in-flight RPCs");
    ready.abort();
    set_overall(&health, ServingStatus::NotServing).await;
    // Streams never finish on their own: end them, or the drain waits for
    // them until the grace period is over.
    signals.begin_shutdown();
    let _ = stop_tx.send(true);
    // One grace period for both ports, drained side by side.
    let drained = async {
        let grpc = (&mut server).await;
        let identity = match identity_server.as_mut() {
            Some(task) => Some(task.await),
            None => None,
        };
        (grpc, identity)
    };
    match tokio::time::timeout(config.server.shutdown_grace, drained).await {
        Ok((grpc, identity)) => {
            grpc.map_err(panic_to_error)?
                .map_err(ServeError::Transport)?;
            if let Some(identity) = identity {
                identity
                    .map_err(panic_to_error)?
                    .map_err(ServeError::Transport)?;
            }
        }
        Err(_) => {
            tracing::warn!("grace period over; abandoning the requests still in flight");
            server.abort();
            if let Some(task) = &identity_server {
                task.abort();
            }
        }
    }
    credential_health.stop();
    // What is still queued goes to the collector, briefly: a collector that
    // is down must not hold up the exit.
    #[cfg(feature = "otlp")]
    if let Some((_, exporter)) = traces {
        exporter.shutdown(OTLP_FLUSH).await;
    }
    drop(metrics_server);
    tracing::info!("payroc-broker stopped");
    Ok(())
}

async fn reload(
    state: &ArcSwap<State>,
    next: &Config,
    server: &crate::config::ServerConfig,
    clock: &Clock,
    entropy: &SharedEntropy,
    observer: &Arc<dyn AttemptObserver>,
    credential_health: &mut CredentialHealth,
) {
    let current = state.load_full();
    let broker = match Broker::new(
        next,
        clock.clone(),
        Arc::clone(entropy),
        Some(&current.broker),
        Arc::clone(observer),
    ) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: cannot build the Payroc HTTP client; the old configuration keeps serving");
            return;
        }
    };
    let kept = broker
        .credentials()
        .iter()
        .filter(|c| {
            current
                .broker
                .credentials()
                .iter()
                .any(|o| Arc::ptr_eq(o, c))
        })
        .count();
    // TLS files are re-read above on every reload; other [server] keys need
    // a restart.
    let unchanged_tls = |s: &crate::config::ServerConfig| crate::config::ServerConfig {
        tls: None,
        ..s.clone()
    };
    if unchanged_tls(&next.server) != unchanged_tls(server) {
        tracing::warn!("[server] settings changed; they take effect at the next restart");
    }
    credential_health.follow(&broker).await;
    state.store(Arc::new(State {
        broker,
        callers: Callers::new(next, clock.clone(), Some(&current.callers)),
    }));
    tracing::info!(
        credentials = next.credentials.len(),
        kept_tokens = kept,
        callers = next.callers.len(),
        "configuration reloaded"
    );
}

async fn set_overall(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Mirrors each credential's token health into the health service.
struct CredentialHealth {
    reporter: HealthReporter,
    followers: HashMap<String, JoinHandle<()>>,
}

impl CredentialHealth {
    fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            followers: HashMap::new(),
        }
    }

    /// Follows `broker`'s credentials: new ones are added, removed ones cleared.
    async fn follow(&mut self, broker: &Broker) {
        let mut next = HashMap::new();
        for c in broker.credentials() {
            let name = credential_service_name(&c.name);
            if let Some(old) = self.followers.remove(&name) {
                old.abort();
            }
            let mut rx = c.health();
            let reporter = self.reporter.clone();
            let service = name.clone();
            next.insert(
                name,
                tokio::spawn(async move {
                    loop {
                        let status = match *rx.borrow_and_update() {
                            TokenHealth::Usable => ServingStatus::Serving,
                            TokenHealth::Starting | TokenHealth::Unusable => {
                                ServingStatus::NotServing
                            }
                        };
                        reporter.set_service_status(&service, status).await;
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                }),
            );
        }
        for (name, follower) in self.followers.drain() {
            follower.abort();
            self.reporter.clear_service_status(&name).await;
        }
        self.followers = next;
    }

    fn stop(&mut self) {
        for (_, f) in self.followers.drain() {
            f.abort();
        }
    }
}

fn panic_to_error(e: tokio::task::JoinError) -> ServeError {
    std::panic::resume_unwind(e.into_panic())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: a signal that arrives while
/// the server is still starting then shuts it down gracefully instead of
/// killing it (the default action). Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The metrics' gauges, read now: the one place that reads the broker for
/// them.
fn gauges<'a>(broker: &'a Broker, clock: &Clock) -> Gauges<'a> {
    let now = clock.now();
    Gauges {
        credentials: broker
            .credentials()
            .iter()
            .map(|c| CredentialGauges {
                name: &c.name,
                expiry_seconds: c.cached().map_or(0.0, |t| t.remaining(now).as_secs_f64()),
                refresh_failures: c.consecutive_failures(),
            })
            .collect(),
        sessions_in_flight: broker.sessions_in_flight(),
        log_lines_dropped: crate::obs::logging::lines_dropped(),
    }
}
