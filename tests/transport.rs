//! Connection and request limits of the gRPC port, probed the way an attacker
//! on loopback would: silent sockets, half prefaces, many sockets from one
//! address, HEADERS with a body that never ends. Real server, real sockets;
//! each limit is set small so the tests wait only as long as it takes.

mod common;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use hyper_util::rt::TokioIo;
use payroc_broker::config::Config;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::{Instant, timeout},
};
use tonic::{
    Code,
    transport::{Channel, Endpoint, Uri},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest any test waits for the server to act; the limits under test are
/// a few hundred ms, so this is only hit when a control is missing.
const PATIENCE: Duration = Duration::from_secs(5);

/// A broker whose `[server]` limits `adjust` sets (until the configuration
/// parser knows the new keys, they are set here in Rust).
async fn serve_adjusted(adjust: impl FnOnce(&mut Config)) -> (Served, payroc_sim::SimPayroc) {
    let opts = Options::default();
    let sim = start_sim(&opts).await;
    let mut config = config_for(&sim, &opts);
    adjust(&mut config);
    (serve(config).await, sim)
}

/// A TCP connection to `addr` from the loopback address `from`, so tests can
/// play several peers on one machine.
async fn tcp_from(from: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(addr).await
}

/// Connects tonic over a socket from `from`.
#[derive(Clone)]
struct From(IpAddr, SocketAddr);

impl tower_service::Service<Uri> for From {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (from, addr) = (self.0.to_string(), self.1);
        Box::pin(async move { tcp_from(&from, addr).await.map(TokioIo::new) })
    }
}

/// One health Check on a new connection from `from`.
async fn check_from(from: &str, addr: SocketAddr) -> Result<Channel, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(PATIENCE)
        .connect_with_connector(From(from.parse().unwrap(), addr))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    check(&channel).await.map_err(|s| format!("{s:?}"))?;
    Ok(channel)
}

async fn check(channel: &Channel) -> Result<(), tonic::Status> {
    let mut health = HealthClient::new(channel.clone());
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(PATIENCE);
    health.check(req).await.map(drop)
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(mut tcp: TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let closed = timeout(PATIENCE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // e.g. the server's SETTINGS or GOAWAY
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
    start.elapsed()
}

#[tokio::test]
async fn connections_that_send_no_preface_are_closed_after_the_handshake_timeout() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.handshake_timeout = Duration::from_millis(200);
    })
    .await;
    let silent = TcpStream::connect(served.addr).await.unwrap();
    let mut half = TcpStream::connect(served.addr).await.unwrap();
    half.write_all(&PREFACE[..10]).await.unwrap();
    let (silent, half) = tokio::join!(closed_after(silent), closed_after(half));
    for took in [silent, half] {
        assert!(took >= Duration::from_millis(150), "closed after {took:?}");
    }
    // The port still serves.
    check_from("127.0.0.1", served.addr).await.unwrap();
}

#[tokio::test]
async fn anything_but_http2_is_closed_at_once() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let mut http1 = TcpStream::connect(served.addr).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let took = closed_after(http1).await;
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn each_peer_address_gets_at_most_its_share_of_connections() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connections_per_peer = 2;
        c.server.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let addr = served.addr;
    let first = check_from("127.0.0.3", addr).await.expect("first");
    let _second = check_from("127.0.0.3", addr).await.expect("second");
    assert!(
        check_from("127.0.0.3", addr).await.is_err(),
        "the third connection of one peer is closed"
    );
    check_from("127.0.0.4", addr)
        .await
        .expect("another peer is not affected");
    drop(first);
    eventually("the freed slot comes back", || async {
        check_from("127.0.0.3", addr).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_peer_holding_sockets_does_not_lock_out_health_checks() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connections = 8;
        c.server.max_connections_per_peer = 4;
        // Long, so only the per-peer cap can be what saves the port.
        c.server.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tcp_from("127.0.0.2", served.addr).await.unwrap());
    }
    check_from("127.0.0.1", served.addr)
        .await
        .expect("a health check is served while another peer holds sockets");
    drop(held);
}

/// Starts a gRPC request on a raw HTTP/2 connection and sends the 5-byte
/// message header plus 3 of the 100 bytes it announces, never the rest.
async fn partial_request(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = client.clone().ready().await.unwrap();
    let (response, mut body) = ready.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2, 3]), false)
        .unwrap();
    *client = ready;
    (response, body)
}

async fn h2_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

/// The grpc-status of a response, from its headers (trailers-only) or trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> String {
    let response = response.await.expect("a response");
    if let Some(s) = response.headers().get("grpc-status") {
        return s.to_str().unwrap().to_owned();
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_request_whose_body_never_arrives_is_ended() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.request_timeout = Duration::from_millis(200);
    })
    .await;
    let (mut client, _conn) = h2_connect(served.addr).await;
    let start = Instant::now();
    let (response, _body) = partial_request(&mut client, served.addr).await;
    let status = timeout(PATIENCE, grpc_status(response))
        .await
        .expect("the server ends the request");
    assert_eq!(status, (Code::DeadlineExceeded as i32).to_string());
    assert!(start.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn requests_beyond_the_in_flight_bound_are_refused_at_once() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_in_flight_requests = 2;
        c.server.request_timeout = Duration::from_secs(60);
    })
    .await;
    let (mut client, conn) = h2_connect(served.addr).await;
    let _held = [
        partial_request(&mut client, served.addr).await,
        partial_request(&mut client, served.addr).await,
    ];
    // The held streams reach the server in their own time: wait for the
    // refusal rather than for a fixed delay.
    let channel = Endpoint::from_shared(format!("http://{}", served.addr))
        .unwrap()
        .connect_lazy();
    eventually("a refusal while two requests are held", || async {
        matches!(check(&channel).await, Err(s) if s.code() == Code::ResourceExhausted)
    })
    .await;
    // Closing the connection ends the held requests and frees their permits.
    drop(client);
    conn.abort();
    eventually("permits come back", || async {
        check(&channel).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.idle_timeout = Duration::from_millis(200);
    })
    .await;
    let (mut client, conn) = h2_connect(served.addr).await;
    // One finished request, then nothing.
    let (response, mut body) = partial_request(&mut client, served.addr).await;
    body.send_data(Bytes::from(vec![0u8; 97]), true).unwrap();
    let _ = grpc_status(response).await;
    let closed = timeout(PATIENCE, conn).await;
    assert!(closed.is_ok(), "the idle connection was not closed");
}

#[tokio::test]
async fn connections_are_closed_at_their_maximum_age() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connection_age = Duration::from_millis(300);
    })
    .await;
    let (_client, conn) = h2_connect(served.addr).await;
    let closed = timeout(PATIENCE, conn).await;
    assert!(closed.is_ok(), "the connection outlived its maximum age");
}

/// An HTTP/2 connection from `from` that has served one health Check and is
/// now idle, as an attacker who completes the preface and then waits would
/// hold it.
async fn idle_h2_from(
    from: &str,
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tcp_from(from, addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(connection);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = client.ready().await.unwrap();
    let (response, mut body) = ready.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    assert_eq!(grpc_status(response).await, "0", "served before going idle");
    (ready, conn)
}

#[tokio::test]
async fn silent_sockets_from_many_addresses_do_not_lock_out_health_checks() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connections = 4;
        c.server.max_connections_per_peer = 2;
        // Long, so only eviction can be what saves the port.
        c.server.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    // Three addresses, two sockets each: more than max_connections, none
    // past its per-peer share.
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..2 {
            held.push(tcp_from(from, served.addr).await.unwrap());
        }
    }
    for _ in 0..3 {
        check_from("127.0.0.1", served.addr)
            .await
            .expect("a health check takes the place of a silent socket");
    }
    drop(held);
}

#[tokio::test]
async fn idle_connections_from_many_addresses_do_not_lock_out_health_checks() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connections = 4;
        c.server.max_connections_per_peer = 2;
        c.server.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..2 {
            held.push(idle_h2_from(from, served.addr).await);
        }
    }
    // The last response may still be on its way out (its request counts as
    // open until then): wait for the idle connection rather than a delay.
    eventually(
        "a health check takes the place of an idle connection",
        || async { check_from("127.0.0.1", served.addr).await.is_ok() },
    )
    .await;
    eventually("the evicted connection is closed", || async {
        held.iter().any(|(_, conn)| conn.is_finished())
    })
    .await;
}

#[tokio::test]
async fn connections_with_a_request_in_flight_are_never_evicted() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connections = 2;
        c.server.request_timeout = Duration::from_secs(600);
    })
    .await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let (mut client, conn) = h2_connect(served.addr).await;
        let (response, body) = partial_request(&mut client, served.addr).await;
        busy.push((client, conn, response, body));
    }
    // Both requests are held by the server: a new connection finds no place.
    eventually("the server is full of busy connections", || async {
        check_from("127.0.0.1", served.addr).await.is_err()
    })
    .await;
    for (_, conn, _, _) in &busy {
        assert!(!conn.is_finished(), "a busy connection was closed");
    }
    // Once a request ends, its connection is idle and may give way.
    let (_, _, response, mut body) = busy.pop().unwrap();
    body.send_data(Bytes::from(vec![0u8; 97]), true).unwrap();
    let _ = grpc_status(response).await;
    eventually("the idle connection gives way", || async {
        check_from("127.0.0.1", served.addr).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn an_evicted_idle_connection_is_closed_at_once_not_after_the_grace() {
    let (served, _sim) = serve_adjusted(|c| {
        c.server.max_connections = 1;
        c.server.idle_timeout = Duration::from_secs(600);
        // The grace of a graceful close: an evicted peer that never answers
        // the GOAWAY's ping must not keep its socket for this long.
        c.server.request_timeout = Duration::from_secs(600);
    })
    .await;
    // The preface and SETTINGS, then nothing, not even the acknowledgements.
    let mut attacker = tcp_from("127.0.0.2", served.addr).await.unwrap();
    attacker.write_all(PREFACE).await.unwrap();
    attacker
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    // The server's SETTINGS: the connection is past its handshake.
    let mut first = [0u8; 9];
    timeout(PATIENCE, attacker.read_exact(&mut first))
        .await
        .expect("the server speaks HTTP/2")
        .unwrap();
    assert_eq!(first[3], 4, "a SETTINGS frame");
    check_from("127.0.0.1", served.addr)
        .await
        .expect("the health check takes the idle connection's place");
    closed_after(attacker).await;
}
