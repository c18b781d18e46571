//! Assembly: the TokenBroker service with health, reflection and graceful
//! shutdown, on a listener the caller has already bound (so tests bind port 0
//! and learn the address first).

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::{
    auth::Callers,
    broker::Broker,
    clock::{Clock, SharedEntropy},
    config::Config,
    proto::{self, token_broker_server::TokenBrokerServer},
    service::TokenBrokerService,
};

/// The fully qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "payroc.broker.v1.TokenBroker";

/// Requests are a few hundred bytes; anything much larger is abuse.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why the server could not run.
#[derive(Debug)]
pub enum ServeError {
    /// The HTTP client could not be built (TLS roots, for example).
    Client(reqwest::Error),
    Transport(tonic::transport::Error),
    Reflection(tonic_reflection::server::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Client(e) => write!(f, "cannot build the Payroc HTTP client: {e}"),
            ServeError::Transport(e) => write!(f, "gRPC server failed: {e}"),
            ServeError::Reflection(e) => write!(f, "cannot build the reflection service: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// Serves `config` on `listener` until `shutdown` completes, then turns health
/// NOT_SERVING, refuses new RPCs, and lets in-flight ones finish for up to
/// `config.server.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    config: &Config,
    clock: Clock,
    entropy: SharedEntropy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let broker = Arc::new(Broker::new(config, clock.clone(), entropy).map_err(ServeError::Client)?);
    let callers = Arc::new(Callers::from_config(&config.callers));
    let service = TokenBrokerService::new(broker, callers, clock);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    health.set_service_status("", ServingStatus::Serving).await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServeError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    let broker_service = TokenBrokerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);

    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker_service);
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpIncoming::from(listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    tracing::info!(addr = %local, credentials = config.credentials.len(), callers = config.callers.len(), "payroc-broker serving");

    tokio::select! {
        finished = &mut server => {
            // The server stopped on its own: that is an error worth exiting on.
            return finished.map_err(|e| ServeError::Transport(panic_to_error(e)))?.map_err(ServeError::Transport);
        }
        () = shutdown => {}
    }

    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: health NOT_SERVING, draining in-flight RPCs");
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.server.shutdown_grace, &mut server).await {
        Ok(result) => result
            .map_err(|e| ServeError::Transport(panic_to_error(e)))?
            .map_err(ServeError::Transport)?,
        Err(_) => {
            tracing::warn!("grace period over; abandoning the RPCs still in flight");
            server.abort();
        }
    }
    tracing::info!("payroc-broker stopped");
    Ok(())
}

fn panic_to_error(e: tokio::task::JoinError) -> tonic::transport::Error {
    std::panic::resume_unwind(e.into_panic())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
