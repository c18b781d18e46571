//! A port from TCP up to the routes: the accept loop, TLS (with reload), and
//! the limits that keep one peer from exhausting the server. The gRPC port
//! speaks HTTP/2 only ([`Protocol::Grpc`]); the identity endpoint's port
//! HTTP/1.1 and HTTP/2 ([`Protocol::Http`]), with the same TLS and limits.
//!
//! Each accepted connection gets, in order:
//! 1. a slot under `max_connections_per_peer` and `max_connections` (refused
//!    connections are closed at once; the WARN line about them is
//!    rate-limited). When `max_connections` are open, the new connection
//!    takes the place of one still in its handshake, else of one with no
//!    open request, of the peer address holding the most
//!    ([`limits::ConnTable`]), so sockets held from many addresses cannot
//!    lock callers and health checks out;
//! 2. `handshake_timeout` to finish the TLS handshake and send the HTTP/2
//!    preface (HTTP/1.1: its request head), else it is closed;
//! 3. HTTP with `idle_timeout` (no open request), `max_connection_age`
//!    (both graceful), and HTTP/2 keepalive pings;
//! 4. per request: [`PeerInfo`] in the extensions, a permit of
//!    `max_in_flight_requests` (else the service's [`Edge::overloaded`]
//!    answer at once), and `request_timeout` for the request body to arrive
//!    in full.
//!
//! The accept loop is ours rather than tonic's `serve_with_incoming`, which
//! has no place for the handshake deadline, the idle timeout, or per-request
//! state of the connection.

pub mod conn;
pub mod limits;
pub mod request;
pub mod tls;

use std::{convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tonic::{Status, service::Routes};

use crate::{
    clock::Clock,
    config::{ServerConfig, TlsConfig},
    domain::error::BrokerError,
};
use limits::{Admitted, ConnSlot, ConnTable, PeerSlots, RefusalLog};
use tls::{TlsAcceptor, TlsError};

/// Who is on the other end of a request's connection; in every request's
/// extensions, for plaintext and TLS alike.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The TCP peer (a mesh sidecar, when there is one).
    pub remote: SocketAddr,
    /// The client certificate, when one was presented and verified against
    /// `server.tls.client_ca_file`.
    pub cert: Option<Arc<PeerCert>>,
}

/// The SANs of a verified client certificate's leaf.
#[derive(Clone, Debug, Default)]
pub struct PeerCert {
    /// URI SANs, e.g. SPIFFE IDs (`spiffe://cluster.local/ns/shop/sa/web`).
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
}

/// What a port speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 only (ALPN `h2`); anything else is refused at its first byte.
    Grpc,
    /// HTTP/1.1 and HTTP/2 (ALPN `h2`, `http/1.1`), for plain HTTP clients.
    Http,
}

/// The request and response types every port serves.
pub type HttpRequest = http::Request<tonic::body::Body>;
pub type HttpResponse = http::Response<tonic::body::Body>;

/// What a port serves: requests to responses, and the answer to a request
/// shed because too many are in flight (in the service's own wire format:
/// a gRPC status, a problem document).
pub trait Edge:
    tower_service::Service<HttpRequest, Response = HttpResponse, Error = Infallible>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The answer for a request refused with `e` before it reached the
    /// service.
    fn overloaded(&self, e: BrokerError) -> HttpResponse;
}

/// The gRPC routes answer with a status.
impl Edge for Routes {
    fn overloaded(&self, e: BrokerError) -> HttpResponse {
        Status::from(e).into_http()
    }
}

/// How often at most the WARN line about refused connections (or shed
/// requests) is written.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The connection and request limits, from `[server]`.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub max_concurrent_streams: u32,
    pub max_in_flight_requests: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connection_age: Duration,
    pub request_timeout: Duration,
    /// After an idle or age close begins, how long open streams get before
    /// the connection is dropped.
    pub close_grace: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(s: &ServerConfig) -> Self {
        Self {
            max_connections: s.max_connections,
            max_connections_per_peer: s.max_connections_per_peer,
            max_concurrent_streams: s.max_concurrent_streams,
            max_in_flight_requests: s.max_in_flight_requests,
            handshake_timeout: s.handshake_timeout,
            idle_timeout: s.idle_timeout,
            max_connection_age: s.max_connection_age,
            request_timeout: s.request_timeout,
            close_grace: s.request_timeout,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// A port: accept loop, TLS and limits around a service.
pub struct Transport {
    limits: Limits,
    tls: Option<Arc<TlsAcceptor>>,
    protocol: Protocol,
    clock: Clock,
}

impl Transport {
    /// A port speaking `protocol` with `[server]`'s limits. Reads the TLS
    /// files when `[server.tls]` is set; a bad one is an error naming the key
    /// and file.
    pub fn new(server: &ServerConfig, protocol: Protocol, clock: Clock) -> Result<Self, TlsError> {
        let tls = server
            .tls
            .as_ref()
            .map(|t| TlsAcceptor::new(t, protocol))
            .transpose()?
            .map(Arc::new);
        Ok(Self {
            limits: Limits::from(server),
            tls,
            protocol,
            clock,
        })
    }

    /// A handle that re-reads the TLS files on reload.
    pub fn reloader(&self) -> TlsReloader {
        TlsReloader {
            tls: self.tls.clone(),
        }
    }

    /// Accepts and serves connections on `listener` until `shutdown`
    /// completes; then stops accepting (the listening socket closes), asks
    /// every connection to finish gracefully, and returns when all are
    /// closed. Dropping the future drops every connection.
    pub async fn serve<S: Edge>(
        self,
        listener: TcpListener,
        service: S,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()>
    where
        S::Future: Send,
    {
        let limits = self.limits;
        let protocol = self.protocol;
        let shared = request::Shared {
            service,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight_requests)),
            request_timeout: limits.request_timeout,
            shed_log: Arc::new(RefusalLog::new(REFUSAL_LOG_EVERY)),
            clock: self.clock.clone(),
        };
        let admission = Admission {
            conns: ConnTable::new(limits.max_connections),
            peers: PeerSlots::new(limits.max_connections_per_peer),
            refusals: RefusalLog::new(REFUSAL_LOG_EVERY),
            evictions: RefusalLog::new(REFUSAL_LOG_EVERY),
            clock: self.clock,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let Some(slots) = admission.admit(&tcp, remote) else {
                            continue;
                        };
                        conns.spawn({
                            let (tls, shared, limits, stop) =
                                (self.tls.clone(), shared.clone(), limits.clone(), stop_rx.clone());
                            async move {
                                let (_peer, conn) = slots;
                                conn::serve(tcp, remote, protocol, tls, shared, limits, stop, &conn).await;
                            }
                        });
                    }
                    Err(e) => accept_error(e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        while conns.join_next().await.is_some() {}
        Ok(())
    }
}

/// Re-reads `[server.tls]` files on reload.
#[derive(Clone, Debug)]
pub struct TlsReloader {
    tls: Option<Arc<TlsAcceptor>>,
}

impl TlsReloader {
    /// Applies `next` (the reloaded `[server.tls]`). A bad file leaves the
    /// configuration in force and is logged naming the key, file and reason.
    /// Switching between plaintext and TLS needs a restart (logged).
    pub fn reload(&self, next: Option<&TlsConfig>) {
        match (&self.tls, next) {
            (Some(tls), Some(config)) => match tls.reload(config) {
                Ok(()) => tracing::info!("TLS certificates and keys re-read"),
                Err(e) => tracing::error!(
                    key = e.key,
                    file = %e.file.display(),
                    reason = %e.reason,
                    "TLS reload refused; the certificates in force keep serving"
                ),
            },
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => tracing::warn!(
                "[server.tls] was added or removed; that takes effect at the next restart"
            ),
        }
    }
}

/// Connection slots, total and per peer.
struct Admission {
    conns: Arc<ConnTable>,
    peers: Arc<PeerSlots>,
    refusals: RefusalLog,
    evictions: RefusalLog,
    clock: Clock,
}

impl Admission {
    /// The slots for a new connection, or `None` (and the connection is to
    /// be closed) when its peer is at its limit, or the server is and every
    /// open connection has a request in flight. The per-peer check comes
    /// first, so a refused peer neither takes from the total nor evicts.
    fn admit(&self, tcp: &TcpStream, remote: SocketAddr) -> Option<(limits::PeerSlot, ConnSlot)> {
        let refused = |limit: &str| {
            if let Some(refused) = self.refusals.record(self.clock.now()) {
                tracing::warn!(
                    refused,
                    peer = %remote,
                    limit,
                    "connection limit reached; closing new connections (one line per 10 s at most, `refused` counts them)"
                );
            }
        };
        let Some(peer) = self.peers.try_acquire(remote.ip()) else {
            refused("server.max_connections_per_peer");
            return None;
        };
        let Some((conn, admitted)) = self.conns.admit(remote.ip()) else {
            refused("server.max_connections");
            return None;
        };
        if let Admitted::Evicted { handshaking } = admitted
            && let Some(evicted) = self.evictions.record(self.clock.now())
        {
            tracing::warn!(
                evicted,
                peer = %remote,
                victim = if handshaking { "in its handshake" } else { "idle" },
                "server.max_connections reached; new connections take the place of one in its handshake, else an idle one, of the address holding the most (one line per 10 s at most, `evicted` counts them)"
            );
        }
        // Requests and answers are small: send them at once.
        let _ = tcp.set_nodelay(true);
        Some((peer, conn))
    }
}

/// Errors of `accept` are mostly one connection's (reset before accepted):
/// go on. Others (out of file descriptors) would repeat at once, so pause
/// briefly instead of spinning.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed; pausing 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
