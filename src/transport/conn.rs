//! One accepted connection, from TCP to HTTP: the TLS handshake and (gRPC)
//! the HTTP/2 client preface under one deadline, then hyper's HTTP/2 server
//! (gRPC) or its HTTP/1.1-and-HTTP/2 server (plain HTTP) with an idle
//! timeout, a maximum age and graceful shutdown; closed early when its place
//! in the connection table goes to a new connection.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
};

use super::{
    Edge, Limits, PeerInfo, Protocol,
    limits::{Activity, ConnSlot},
    request::{ConnService, Shared},
    tls::{TlsAcceptor, peer_cert},
};

/// What a client sends first on an HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Flow-control windows, small on purpose: requests are a few hundred bytes,
/// and the windows bound what a client can make the server buffer (see the
/// memory ceiling in README).
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Header blocks above this are refused (hyper's default is 16 KiB too; set
/// so the README's ceiling does not depend on a default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/1.1's read buffer, which bounds a request head the same way (hyper's
/// default is about 400 KiB).
const HTTP1_MAX_BUF: usize = 16 * 1024;

/// Serves one accepted TCP connection until it closes, the limits close it,
/// `slot` is evicted, or `stop` turns true (server shutdown: graceful, no
/// deadline here; the server bounds the whole drain).
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: Edge>(
    tcp: TcpStream,
    remote: SocketAddr,
    protocol: Protocol,
    tls: Option<Arc<TlsAcceptor>>,
    shared: Shared<S>,
    limits: Limits,
    stop: watch::Receiver<bool>,
    slot: &ConnSlot,
) where
    S::Future: Send,
{
    let mut evicted = std::pin::pin!(slot.evicted());
    let handshake = tokio::time::timeout(limits.handshake_timeout, async {
        match tls {
            None => {
                let io = preface(protocol, tcp).await?;
                Ok::<_, io::Error>(Established::Plain(io))
            }
            Some(tls) => {
                let stream = tls.acceptor().accept(tcp).await?;
                let cert = peer_cert(stream.get_ref().1.peer_certificates()).map(Arc::new);
                let io = preface(protocol, stream).await?;
                Ok(Established::Tls(Box::new(io), cert))
            }
        }
    });
    let handshake = tokio::select! {
        done = handshake => done,
        () = &mut evicted => {
            tracing::debug!(peer = %remote, "connection in its handshake evicted for a new one (server.max_connections)");
            return;
        }
    };
    let established = match handshake {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            // Scanners, plaintext clients on a TLS port, failed client
            // certificates: routine, and the client learns it from the close.
            tracing::debug!(peer = %remote, error = %e, "connection closed before HTTP/2 began");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %remote, timeout = ?limits.handshake_timeout, "handshake not completed in time; connection closed");
            return;
        }
    };
    if *stop.borrow() {
        return;
    }
    match established {
        Established::Plain(io) => {
            serve_http(
                io, remote, protocol, None, shared, limits, stop, slot, evicted,
            )
            .await
        }
        Established::Tls(io, cert) => {
            serve_http(
                io, remote, protocol, cert, shared, limits, stop, slot, evicted,
            )
            .await
        }
    }
}

enum Established {
    Plain(Replay<TcpStream>),
    /// Boxed: rustls's connection state is large.
    Tls(
        Box<Replay<tokio_rustls::server::TlsStream<TcpStream>>>,
        Option<Arc<super::PeerCert>>,
    ),
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<IO, S: Edge>(
    io: IO,
    remote: SocketAddr,
    protocol: Protocol,
    cert: Option<Arc<super::PeerCert>>,
    shared: Shared<S>,
    limits: Limits,
    stop: watch::Receiver<bool>,
    slot: &ConnSlot,
    evicted: Pin<&mut impl Future<Output = ()>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S::Future: Send,
{
    let activity = Activity::default();
    slot.serving(&activity);
    let service = ConnService {
        shared,
        peer: PeerInfo { remote, cert },
        activity: activity.clone(),
    };
    let io = TokioIo::new(io);
    match protocol {
        Protocol::Grpc => {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http2_settings(&mut builder, &limits);
            let conn = builder.serve_connection(io, service);
            let graceful =
                |c: Pin<&mut _>| hyper::server::conn::http2::Connection::graceful_shutdown(c);
            drive(conn, graceful, remote, &limits, &activity, stop, evicted).await;
        }
        Protocol::Http => {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                // The request head must arrive in time, as a TLS handshake
                // and HTTP/2 preface must: a slow-loris client is closed.
                .header_read_timeout(limits.handshake_timeout)
                .max_buf_size(HTTP1_MAX_BUF);
            http2_settings(&mut builder.http2(), &limits);
            let conn = builder.serve_connection(io, service);
            let graceful =
                |c: Pin<&mut _>| hyper_util::server::conn::auto::Connection::graceful_shutdown(c);
            drive(conn, graceful, remote, &limits, &activity, stop, evicted).await;
        }
    }
}

/// The HTTP/2 settings of every port, on either builder.
fn http2_settings<B: Http2Settings>(builder: &mut B, limits: &Limits) {
    builder.apply(limits);
}

/// hyper's two HTTP/2 builders (alone, and inside the auto builder) have the
/// same setters but no common trait.
trait Http2Settings {
    fn apply(&mut self, limits: &Limits);
}

macro_rules! http2_settings_for {
    ($t:ty) => {
        impl Http2Settings for $t {
            fn apply(&mut self, limits: &Limits) {
                self.timer(TokioTimer::new())
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_header_list_size(MAX_HEADER_LIST)
                    // A peer that stops answering pings is gone (or not
                    // reading): its connection is closed instead of held.
                    .keep_alive_interval(limits.keepalive_interval)
                    .keep_alive_timeout(limits.keepalive_timeout);
            }
        }
    };
}

http2_settings_for!(hyper::server::conn::http2::Builder<TokioExecutor>);
http2_settings_for!(hyper_util::server::conn::auto::Http2Builder<'_, TokioExecutor>);

/// Runs `conn` until it ends, closing it gracefully at `idle_timeout`,
/// `max_connection_age`, eviction or server shutdown.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: fn(Pin<&mut C>),
    remote: SocketAddr,
    limits: &Limits,
    activity: &Activity,
    mut stop: watch::Receiver<bool>,
    mut evicted: Pin<&mut impl Future<Output = ()>>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);

    let age = tokio::time::sleep(limits.max_connection_age);
    let idle = activity.idle_for(limits.idle_timeout);
    let mut age = std::pin::pin!(age);
    let mut idle = std::pin::pin!(idle);
    // Once closing for idleness or age, open streams get `close_grace` to
    // finish; a peer that does not read the GOAWAY cannot hold it open.
    let mut forced = std::pin::pin!(futures_util::future::OptionFuture::from(None));
    let mut closing = false;
    let mut stopping = false;
    loop {
        tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    tracing::debug!(peer = %remote, error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut idle, if !closing => {
                tracing::debug!(peer = %remote, "idle connection closed (server.idle_timeout)");
                graceful_shutdown(conn.as_mut());
                closing = true;
                forced.set(Some(tokio::time::sleep(limits.close_grace)).into());
            }
            () = &mut evicted, if !closing => {
                // Its place already went to a new connection: an idle one is
                // dropped now, not given a graceful close that a peer which
                // never answers the GOAWAY's ping could stretch to
                // `close_grace` (each eviction would leave a socket behind
                // beyond `max_connections`). A request that raced the
                // eviction gets the graceful close.
                tracing::debug!(peer = %remote, "idle connection evicted for a new one (server.max_connections)");
                if activity.is_idle() {
                    return;
                }
                graceful_shutdown(conn.as_mut());
                closing = true;
                forced.set(Some(tokio::time::sleep(limits.close_grace)).into());
            }
            () = &mut age, if !closing => {
                tracing::debug!(peer = %remote, "connection closed at its maximum age (server.max_connection_age)");
                graceful_shutdown(conn.as_mut());
                closing = true;
                forced.set(Some(tokio::time::sleep(limits.close_grace)).into());
            }
            Some(()) = &mut forced => {
                tracing::debug!(peer = %remote, "connection did not close in time; dropped");
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                // Server shutdown: the server bounds the drain as a whole.
                stopping = true;
                if !closing {
                    graceful_shutdown(conn.as_mut());
                    closing = true;
                }
            }
        }
    }
}

/// The gRPC port reads the HTTP/2 preface; the HTTP port has none to read
/// (hyper tells HTTP/1.1 from HTTP/2 itself, and its header read timeout
/// bounds an HTTP/1.1 client's first request head).
async fn preface<IO: AsyncRead + Unpin>(protocol: Protocol, io: IO) -> io::Result<Replay<IO>> {
    match protocol {
        Protocol::Grpc => read_preface(io).await,
        Protocol::Http => Ok(Replay::replaying_nothing(io)),
    }
}

/// Reads the HTTP/2 client preface, refusing the connection at the first byte
/// that differs (an HTTP/1 request, TLS on a plaintext port), and hands back
/// an IO that replays it to hyper.
async fn read_preface<IO: AsyncRead + Unpin>(mut io: IO) -> io::Result<Replay<IO>> {
    let mut buf = [0u8; PREFACE.len()];
    let mut got = 0;
    while got < buf.len() {
        let n = io.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the HTTP/2 preface",
            ));
        }
        if buf[got..got + n] != PREFACE[got..got + n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client preface (HTTP/1, or TLS on a plaintext port?)",
            ));
        }
        got += n;
    }
    Ok(Replay { pos: 0, inner: io })
}

/// An IO whose first bytes read are the preface already consumed.
struct Replay<IO> {
    pos: usize,
    inner: IO,
}

impl<IO> Replay<IO> {
    /// An IO of which nothing was consumed (no preface read).
    fn replaying_nothing(inner: IO) -> Self {
        Self {
            pos: PREFACE.len(),
            inner,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < PREFACE.len() {
            let rest = &PREFACE[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn the_preface_is_replayed_to_the_reader() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(PREFACE).await.unwrap();
        client.write_all(b"after").await.unwrap();
        let mut io = read_preface(server).await.unwrap();
        let mut got = vec![0u8; PREFACE.len() + 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..PREFACE.len()], PREFACE);
        assert_eq!(&got[PREFACE.len()..], b"after");
    }

    #[tokio::test]
    async fn anything_else_is_refused_at_the_first_wrong_byte() {
        for wrong in [&b"GET / HTTP/1.1\r\n"[..], &[0x16, 0x03, 0x01][..]] {
            let (mut client, server) = tokio::io::duplex(64);
            // The connection stays open: the refusal must not wait for the
            // rest of the 24 bytes.
            client.write_all(wrong).await.unwrap();
            let e = read_preface(server).await.err().expect("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
    }
}
