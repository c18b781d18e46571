//! Caller identification and per-caller limits through the real server on
//! loopback: forwarded identities from trusted and untrusted peers, two
//! `authorization` entries, allow lists for workload identities, rate limits
//! exhausted and refilled, per-caller session quotas, failing peers, and
//! refusal before the request body arrives.

mod common;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use common::*;
use hyper_util::rt::TokioIo;
use payroc_broker::proto::{GetBearerTokenRequest, token_broker_client::TokenBrokerClient};
use payroc_sim::SimEndpoint;
use tokio::net::{TcpSocket, TcpStream};
use tonic::{
    Code, Request,
    codegen::{Service, http::Uri},
    transport::{Channel, Endpoint},
};

const SPIFFE_WEB: &str = "spiffe://cluster.local/ns/shop/sa/checkout-web";
const DNS_BATCH: &str = "batch.jobs.svc.cluster.local";

/// checkout-web (SPIFFE ID): CreateSession on 1234001.
/// batch (DNS name): GetBearerToken on 1234001.
/// ops (token CALLER_OPS): everything, with `ops_extra` (a rate limit).
fn callers(ops_extra: &str) -> &'static str {
    let text = format!(
        r#"
        [[callers]]
        name = "checkout-web"
        spiffe_id = "{SPIFFE_WEB}"
        terminals = ["1234001"]
        rpcs = ["CreateSession"]
        [[callers]]
        name = "batch"
        dns_name = "{DNS_BATCH}"
        terminals = ["1234001"]
        rpcs = ["GetBearerToken"]
        [[callers]]
        name = "ops"
        token_env = "CALLER_OPS"
        terminals = ["*"]
        rpcs = ["*"]
        {ops_extra}
        "#
    );
    Box::leak(text.into_boxed_str())
}

const XFCC_FROM_LOOPBACK: &str = r#"
    forwarded_identity = "xfcc"
    trusted_proxies = ["127.0.0.0/8", "::1/128"]
"#;
const XFCC_FROM_ELSEWHERE: &str = r#"
    forwarded_identity = "xfcc"
    trusted_proxies = ["10.0.0.0/8"]
"#;
const L5D_FROM_LOOPBACK: &str = r#"
    forwarded_identity = "l5d-client-id"
    trusted_proxies = ["127.0.0.1/32"]
"#;

async fn harness(server: &'static str) -> Harness {
    Harness::with(Options {
        server,
        callers: callers(""),
        ..Options::default()
    })
    .await
}

fn with<T>(msg: T, metadata: &[(&'static str, &str)]) -> Request<T> {
    let mut r = Request::new(msg);
    for (k, v) in metadata {
        r.metadata_mut().append(*k, v.parse().unwrap());
    }
    r
}

fn bearer_req(terminal: &str) -> GetBearerTokenRequest {
    GetBearerTokenRequest {
        processing_terminal_id: terminal.into(),
        min_validity: None,
    }
}

const OPS: (&str, &str) = ("authorization", "Bearer caller-ops-token-77b0e1f3");

fn xfcc_of(uri: &str) -> String {
    format!(
        "By=spiffe://cluster.local/ns/payments/sa/payroc-broker;Hash=9f86d08188;Subject=\"O=a,CN=b\";URI={uri}"
    )
}

#[tokio::test]
async fn xfcc_from_a_trusted_proxy_identifies_the_caller() {
    let h = harness(XFCC_FROM_LOOPBACK).await;
    let mut c = h.client.clone();
    let web = xfcc_of(SPIFFE_WEB);
    let web = [("x-forwarded-client-cert", web.as_str())];
    c.create_session(with(payment("1234001"), &web))
        .await
        .unwrap();
    // The identity's allow lists hold: not this RPC, not that terminal.
    let (s, _) = expect_code(
        c.get_bearer_token(with(bearer_req("1234001"), &web))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
    );
    assert!(s.message().contains("checkout-web"), "{}", s.message());
    expect_code(
        c.create_session(with(payment("1234002"), &web))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
    );
    // Only the last element counts: the hop next to the broker.
    let relayed = format!(
        "{},URI=spiffe://cluster.local/ns/gw/sa/gateway",
        xfcc_of(SPIFFE_WEB)
    );
    expect_code(
        c.create_session(with(
            payment("1234001"),
            &[("x-forwarded-client-cert", &relayed)],
        ))
        .await
        .unwrap_err(),
        Code::Unauthenticated,
    );
    // An identity no caller has, and no token: nothing.
    let stranger = xfcc_of("spiffe://cluster.local/ns/x/sa/stranger");
    expect_code(
        c.create_session(with(
            payment("1234001"),
            &[("x-forwarded-client-cert", &stranger)],
        ))
        .await
        .unwrap_err(),
        Code::Unauthenticated,
    );
    // A malformed header from the proxy is refused, token or not.
    expect_code(
        c.get_bearer_token(with(
            bearer_req("1234001"),
            &[("x-forwarded-client-cert", "URI=\"open"), OPS],
        ))
        .await
        .unwrap_err(),
        Code::Unauthenticated,
    );
}

#[tokio::test]
async fn xfcc_from_an_untrusted_peer_is_ignored() {
    let h = harness(XFCC_FROM_ELSEWHERE).await;
    let mut c = h.client.clone();
    let web = xfcc_of(SPIFFE_WEB);
    expect_code(
        c.create_session(with(
            payment("1234001"),
            &[("x-forwarded-client-cert", &web)],
        ))
        .await
        .unwrap_err(),
        Code::Unauthenticated,
    );
    // With ops's token beside it, the caller is ops, not checkout-web: ops
    // may get a Bearer token for 1234002, checkout-web may not.
    c.get_bearer_token(with(
        bearer_req("1234002"),
        &[("x-forwarded-client-cert", &web), OPS],
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn l5d_client_id_from_a_trusted_proxy_identifies_the_caller() {
    let h = harness(L5D_FROM_LOOPBACK).await;
    let mut c = h.client.clone();
    let batch = [("l5d-client-id", DNS_BATCH)];
    c.get_bearer_token(with(bearer_req("1234001"), &batch))
        .await
        .unwrap();
    expect_code(
        c.get_bearer_token(with(bearer_req("1234002"), &batch))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
    );
    expect_code(
        c.create_session(with(payment("1234001"), &batch))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
    );
    // In this mode XFCC means nothing, and l5d-client-id is no SPIFFE ID.
    let web = xfcc_of(SPIFFE_WEB);
    for md in [
        [("x-forwarded-client-cert", web.as_str())],
        [("l5d-client-id", SPIFFE_WEB)],
    ] {
        expect_code(
            c.create_session(with(payment("1234001"), &md))
                .await
                .unwrap_err(),
            Code::Unauthenticated,
        );
    }
}

#[tokio::test]
async fn two_authorization_entries_are_refused() {
    let h = harness("").await;
    let mut c = h.client.clone();
    c.get_bearer_token(with(bearer_req("1234001"), &[OPS]))
        .await
        .unwrap();
    let before = h.sim.stats();
    for second in ["Bearer caller-ops-token-77b0e1f3", "Bearer other"] {
        let (s, _) = expect_code(
            c.get_bearer_token(with(
                bearer_req("1234001"),
                &[OPS, ("authorization", second)],
            ))
            .await
            .unwrap_err(),
            Code::Unauthenticated,
        );
        assert!(s.message().contains("more than one"), "{}", s.message());
    }
    assert_eq!(h.sim.stats(), before);
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_is_told_when_to_come_back() {
    // One call back every 100 ms, two at once.
    let h = Harness::with(Options {
        callers: callers("rate_limit = \"10/s\"\nburst = 2"),
        ..Options::default()
    })
    .await;
    let mut c = h.client.clone();
    let ops = |terminal: &str| with(bearer_req(terminal), &[OPS]);
    c.get_bearer_token(ops("1234001")).await.unwrap();
    c.get_bearer_token(ops("1234001")).await.unwrap();
    let before = h.sim.stats();
    // Exhausted: refused before the request's fields are looked at.
    let (s, d) = expect_code(
        c.get_bearer_token(ops("1")).await.unwrap_err(),
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("ops"), "{}", s.message());
    let info = d.error_info().expect("ErrorInfo");
    assert_eq!(
        (info.domain.as_str(), info.reason.as_str()),
        ("payroc-broker", "CALLER_RATE_LIMITED")
    );
    assert_eq!(info.metadata["caller"], "ops");
    let wait = d
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    assert_eq!(h.sim.stats(), before, "refused calls never reach Payroc");
    // A client doing what RetryInfo says is admitted: this sleep is the
    // client behaviour under test (at most 100 ms), not a wait for the server.
    tokio::time::sleep(wait).await;
    c.get_bearer_token(ops("1234001")).await.unwrap();
}

#[tokio::test]
async fn a_reload_keeps_a_callers_bucket_unless_its_limit_changed() {
    let limited = callers("rate_limit = \"1/m\"\nburst = 1");
    let h = Harness::with(Options {
        callers: limited,
        ..Options::default()
    })
    .await;
    let mut c = h.client.clone();
    let ops = || with(bearer_req("1234001"), &[OPS]);
    c.get_bearer_token(ops()).await.unwrap();
    expect_code(
        c.get_bearer_token(ops()).await.unwrap_err(),
        Code::ResourceExhausted,
    );
    // Reload with one more caller (how we see the reload applied) and ops
    // unchanged: its bucket stays empty.
    let more: &'static str = Box::leak(
        format!(
            "{limited}\n[[callers]]\nname = \"web\"\ntoken_env = \"CALLER_WEB\"\nterminals = [\"*\"]\nrpcs = [\"*\"]"
        )
        .into_boxed_str(),
    );
    h.reload(&Options {
        callers: more,
        ..Options::default()
    })
    .await;
    let web = || {
        with(
            bearer_req("1234001"),
            &[("authorization", "Bearer caller-web-token-4c1d2e9a")],
        )
    };
    eventually("the reload", || {
        let mut c = c.clone();
        async move { c.get_bearer_token(web()).await.is_ok() }
    })
    .await;
    expect_code(
        c.get_bearer_token(ops()).await.unwrap_err(),
        Code::ResourceExhausted,
    );
    // A new limit is a new bucket.
    h.reload(&Options {
        callers: callers("rate_limit = \"2/m\"\nburst = 1"),
        ..Options::default()
    })
    .await;
    eventually("the new limit", || {
        let mut c = c.clone();
        async move { c.get_bearer_token(ops()).await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn one_caller_at_its_session_quota_leaves_room_for_others() {
    let h = Harness::with(Options {
        server: XFCC_FROM_LOOPBACK,
        payroc: "max_concurrent_sessions_per_caller = 2",
        callers: callers(""),
        ..Options::default()
    })
    .await;
    h.sim
        .faults()
        .set_latency(SimEndpoint::Sessions, Duration::from_millis(500));
    let ops = || with(payment("1234001"), &[OPS]);
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = h.client.clone();
        slow.push(tokio::spawn(async move { c.create_session(ops()).await }));
    }
    eventually("ops's two sessions at Payroc", || async {
        h.sim.stats().session_requests == 2
    })
    .await;
    // ops is at its quota: refused at once, without reaching Payroc...
    let (s, d) = expect_code(
        h.client.clone().create_session(ops()).await.unwrap_err(),
        Code::ResourceExhausted,
    );
    let info = d.error_info().expect("ErrorInfo");
    assert_eq!(
        (info.domain.as_str(), info.reason.as_str()),
        ("payroc-broker", "CALLER_CONCURRENCY_LIMITED"),
        "{}",
        s.message()
    );
    assert_eq!(h.sim.stats().session_requests, 2);
    // ...while another caller is served.
    let web = xfcc_of(SPIFFE_WEB);
    h.client
        .clone()
        .create_session(with(
            payment("1234001"),
            &[("x-forwarded-client-cert", &web)],
        ))
        .await
        .unwrap();
    for r in slow {
        r.await.unwrap().unwrap();
    }
    assert_eq!(h.sim.stats().session_requests, 3);
}

/// Connects to the broker from another loopback address (Linux routes all
/// of 127.0.0.0/8 to lo), as a second peer would.
#[derive(Clone)]
struct FromAddress {
    local: IpAddr,
    server: SocketAddr,
}

impl Service<Uri> for FromAddress {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (local, server) = (self.local, self.server);
        Box::pin(async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(local, 0))?;
            Ok(TokioIo::new(socket.connect(server).await?))
        })
    }
}

async fn client_from(local: &str, h: &Harness) -> TokenBrokerClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect_with_connector(FromAddress {
            local: local.parse().unwrap(),
            server: h.addr,
        })
        .await
        .expect("connects from another loopback address");
    TokenBrokerClient::new(channel)
}

#[tokio::test]
async fn a_peer_that_keeps_guessing_tokens_is_refused_for_a_while() {
    let h = harness("").await;
    let mut attacker = client_from("127.0.0.3", &h).await;
    let ops_req = || with(bearer_req("1234001"), &[OPS]);
    attacker.get_bearer_token(ops_req()).await.unwrap();
    // 20 wrong tokens in a minute (the default policy).
    for i in 0..20 {
        let guess = format!("Bearer guess-{i}");
        let (s, d) = expect_code(
            attacker
                .get_bearer_token(with(bearer_req("1234001"), &[("authorization", &guess)]))
                .await
                .unwrap_err(),
            Code::Unauthenticated,
        );
        assert!(d.error_info().is_none(), "{i}: {}", s.message());
    }
    // Now its tokens are refused unread, the right one too.
    let (_, d) = expect_code(
        attacker.get_bearer_token(ops_req()).await.unwrap_err(),
        Code::Unauthenticated,
    );
    let info = d.error_info().expect("ErrorInfo");
    assert_eq!(
        (info.domain.as_str(), info.reason.as_str()),
        ("payroc-broker", "PEER_AUTHENTICATION_THROTTLED")
    );
    let wait = d.retry_info().and_then(|r| r.retry_delay).unwrap();
    assert!(
        wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    // Also on a new connection from the same address...
    let mut again = client_from("127.0.0.3", &h).await;
    expect_code(
        again.get_bearer_token(ops_req()).await.unwrap_err(),
        Code::Unauthenticated,
    );
    // ...but not from another peer.
    let mut other = client_from("127.0.0.4", &h).await;
    other.get_bearer_token(ops_req()).await.unwrap();
}

/// The request path of GetBearerToken.
const GET_BEARER_TOKEN: &str = "/payroc.broker.v1.TokenBroker/GetBearerToken";

/// Sends the headers of a GetBearerToken call and the first bytes of a gRPC
/// frame announcing 100 bytes, then nothing: the body never completes.
async fn partial_request(
    addr: SocketAddr,
    authorization: Option<&str>,
) -> (
    h2::client::ResponseFuture,
    h2::SendStream<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{GET_BEARER_TOKEN}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    let (response, mut body) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    // Compressed flag 0, length 100, then 3 of the 100 bytes.
    body.send_data(
        bytes::Bytes::from_static(&[0, 0, 0, 0, 100, 0x0a, 0x07, b'1']),
        false,
    )
    .unwrap();
    (response, body, conn)
}

#[tokio::test]
async fn an_unidentified_request_is_refused_before_its_body_arrives() {
    let h = harness("").await;
    for authorization in [None, Some("Bearer wrong-token-0123456789")] {
        let started = tokio::time::Instant::now();
        let (response, mut body, conn) = partial_request(h.addr, authorization).await;
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("answered while the body is still incomplete")
            .unwrap();
        let elapsed = started.elapsed();
        // A trailers-only gRPC answer: the status is in the headers.
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"16"[..]),
            "{authorization:?}: {:?}",
            response.headers()
        );
        // And the server is done with the stream: it resets our half
        // instead of waiting for (and buffering) the rest of the body.
        let reset = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| body.poll_reset(cx)),
        )
        .await
        .expect("the server resets the unread stream")
        .unwrap();
        eprintln!("{authorization:?}: refused in {elapsed:?}, stream reset with {reset:?}");
        conn.abort();
    }
}
