//! The Payroc-compatible identity endpoint (contract part 3) through its real
//! listener on loopback, with plain HTTP clients over HTTP/1.1 and HTTP/2:
//! the answer an SDK expects, every row of the error table, the
//! every-terminal rule, the caller-token headers, the rate limit, and the
//! shared token costing no identity request of its own.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use common::*;
use payroc_sim::{Fault, SimEndpoint};
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;

/// web: everything. ops: GetBearerToken on 1234001 only, rate-limited.
/// partial: Authorize on two of acme's four terminals. all-acme: Authorize on
/// every terminal of acme.
const CALLERS: &str = callers_with_web!(
    r#"
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["1234001"]
    rpcs = ["GetBearerToken", "Authorize"]
    [[callers]]
    name = "all-acme"
    token_env = "CALLER_ALL_ACME"
    terminals = ["1234001", "1234002", "5678002", "4444001"]
    rpcs = ["Authorize"]
    rate_limit = "2/m"
    burst = 2
"#
);

async fn harness(opts: Options) -> Harness {
    Harness::with(Options {
        identity_endpoint: true,
        ..opts
    })
    .await
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

fn authorize(h: &Harness, credential: &str) -> String {
    url(
        h.identity_addr.unwrap(),
        &format!("/credentials/{credential}/authorize"),
    )
}

fn h1() -> Client {
    Client::builder().http1_only().build().unwrap()
}

fn h2() -> Client {
    Client::builder().http2_prior_knowledge().build().unwrap()
}

/// POSTs as the SDKs do: `x-api-key`, no body.
async fn post_key(client: &Client, url: &str, key: &str) -> Response {
    client
        .post(url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

/// A problem document's status and body, after checking its shape.
async fn problem(r: Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "{status}"
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    for field in ["type", "title", "detail", "code"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
    body
}

#[tokio::test]
async fn the_answer_is_payrocs_with_the_shared_token_over_http1_and_http2() {
    let h = harness(Options {
        callers: CALLERS,
        ..Options::default()
    })
    .await;
    let fetched = h.sim.identity_requests(KEY_ACME);
    let grpc = h
        .client
        .clone()
        .get_bearer_token(authed(bearer_request("1234001"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    for (client, version) in [
        (h1(), reqwest::Version::HTTP_11),
        (h2(), reqwest::Version::HTTP_2),
    ] {
        let r = post_key(&client, &authorize(&h, "acme"), CALLER_WEB).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), version);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["cache-control"], "no-store");
        let body: Value = r.json().await.unwrap();
        let keys: BTreeSet<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["access_token", "token_type", "expires_in", "scope"])
        );
        assert_eq!(body["access_token"], grpc.access_token.as_str());
        assert_eq!(body["token_type"], "Bearer");
        assert!(body["scope"].is_string());
        // Whole seconds, never more than Payroc granted (3600), never under
        // the floor (60 s by default).
        let expires_in = body["expires_in"].as_u64().expect("an integer");
        assert!((60..=3600).contains(&expires_in), "{expires_in}");
    }
    // A body is ignored, whatever it is; `authorization: Bearer` works too.
    let r = h1()
        .post(authorize(&h, "acme"))
        .header("authorization", format!("Bearer {CALLER_WEB}"))
        .header("content-type", "application/json")
        .body(r#"{"anything": ["the", "SDK", "sends"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Every answer came from the cache the gRPC port shares.
    assert_eq!(h.sim.identity_requests(KEY_ACME), fetched);
}

#[tokio::test]
async fn every_row_of_the_error_table() {
    let h = harness(Options {
        callers: CALLERS,
        ..Options::default()
    })
    .await;
    let c = h1();
    let acme = authorize(&h, "acme");
    // 401: no caller, unknown or malformed token.
    let none = c.post(&acme).send().await.unwrap();
    let body = problem(none, StatusCode::UNAUTHORIZED).await;
    assert_eq!(body["code"], "UNAUTHENTICATED");
    assert!(
        body["detail"].as_str().unwrap().contains("x-api-key"),
        "{body}"
    );
    problem(
        post_key(&c, &acme, "not-a-caller-token-0123").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let basic = c
        .post(&acme)
        .header("authorization", "Basic d2ViOnNlY3JldA==")
        .send()
        .await
        .unwrap();
    problem(basic, StatusCode::UNAUTHORIZED).await;
    // 403: not every terminal of the credential (ops has one of four)...
    let body = problem(post_key(&c, &acme, CALLER_OPS).await, StatusCode::FORBIDDEN).await;
    assert_eq!(body["code"], "PERMISSION_DENIED");
    assert!(body["detail"].as_str().unwrap().contains("ops"), "{body}");
    // ...while all of them is enough (globex is not all-acme's).
    assert_eq!(
        post_key(&c, &acme, CALLER_ALL_ACME).await.status(),
        StatusCode::OK
    );
    problem(
        post_key(&c, &authorize(&h, "globex"), CALLER_ALL_ACME).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    // 404: no such credential; any other path.
    let body = problem(
        post_key(&c, &authorize(&h, "nope"), CALLER_WEB).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(body["code"], "NOT_FOUND");
    for path in [
        "/authorize",
        "/credentials/acme",
        "/credentials/acme/authorize/x",
        "/",
    ] {
        let r = post_key(&c, &url(h.identity_addr.unwrap(), path), CALLER_WEB).await;
        problem(r, StatusCode::NOT_FOUND).await;
    }
    // 405 with Allow: POST.
    for method in [reqwest::Method::GET, reqwest::Method::PUT] {
        let r = c
            .request(method, &acme)
            .header("x-api-key", CALLER_WEB)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["allow"], "POST");
        problem(r, StatusCode::METHOD_NOT_ALLOWED).await;
    }
    // 502: Payroc rejected the API key.
    let body = problem(
        post_key(&c, &authorize(&h, "revoked"), CALLER_WEB).await,
        StatusCode::BAD_GATEWAY,
    )
    .await;
    assert_eq!(body["code"], "FAILED_PRECONDITION");
    // 503 with Retry-After: Payroc unavailable, for a credential with no
    // token yet.
    let cold = Harness::with(Options {
        callers: CALLERS,
        identity_endpoint: true,
        cold: true,
        ..Options::default()
    })
    .await;
    cold.sim.faults().always(
        SimEndpoint::Identity,
        Some(Fault::status(503).with_retry_after("7")),
    );
    let r = post_key(&c, &authorize(&cold, "globex"), CALLER_WEB).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=7).contains(&retry), "{retry}");
    let body = problem(r, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["code"], "UNAVAILABLE");
}

#[tokio::test]
async fn repeated_or_conflicting_caller_tokens_are_refused() {
    let h = harness(Options {
        callers: CALLERS,
        ..Options::default()
    })
    .await;
    let acme = authorize(&h, "acme");
    let c = h2();
    let send = |key: Vec<&'static str>, auth: Vec<String>| {
        let mut r = c.post(&acme);
        for k in key {
            r = r.header("x-api-key", k);
        }
        for a in auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let agree = send(vec![CALLER_WEB], vec![format!("Bearer {CALLER_WEB}")])
        .await
        .unwrap();
    assert_eq!(agree.status(), 200);
    for (key, auth) in [
        (vec![CALLER_WEB], vec![format!("Bearer {CALLER_OPS}")]),
        (vec![CALLER_WEB, CALLER_WEB], vec![]),
        (
            vec![],
            vec![
                format!("Bearer {CALLER_WEB}"),
                format!("Bearer {CALLER_WEB}"),
            ],
        ),
    ] {
        let r = send(key, auth).await.unwrap();
        let body = problem(r, StatusCode::UNAUTHORIZED).await;
        assert!(
            body["detail"].as_str().unwrap().contains("repeated"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_and_a_peer_guessing_tokens_get_429() {
    let h = harness(Options {
        callers: CALLERS,
        ..Options::default()
    })
    .await;
    let c = h1();
    let acme = authorize(&h, "acme");
    for _ in 0..2 {
        assert_eq!(post_key(&c, &acme, CALLER_ALL_ACME).await.status(), 200);
    }
    let r = post_key(&c, &acme, CALLER_ALL_ACME).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=30).contains(&retry),
        "2/m refills one every 30 s: {retry}"
    );
    let body = problem(r, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["code"], "RESOURCE_EXHAUSTED");

    // Wrong tokens from one address: after enough, 429 for a while, even
    // for a right token (the peer's tokens are not read).
    let mut throttled = None;
    for _ in 0..50 {
        let r = post_key(&c, &acme, "guess-0123456789abcdef").await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            throttled = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = throttled.expect("a guessing peer is throttled");
    assert!(r.headers().contains_key("retry-after"));
    let body = problem(r, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["code"], "UNAUTHENTICATED");
    let r = post_key(&c, &acme, CALLER_WEB).await;
    problem(r, StatusCode::TOO_MANY_REQUESTS).await;
}

#[tokio::test]
async fn a_thousand_requests_for_a_cold_credential_cause_one_identity_request() {
    let h = Harness::with(Options {
        identity_endpoint: true,
        cold: true,
        identity_latency_ms: 200,
        ..Options::default()
    })
    .await;
    assert_eq!(h.sim.identity_requests(KEY_GLOBEX), 0);
    let c = h2();
    let url = authorize(&h, "globex");
    let answers = futures_util::future::join_all((0..1000).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c
                .post(&url)
                .header("x-api-key", "anything")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }))
    .await;
    let distinct: BTreeSet<&String> = answers.iter().collect();
    assert_eq!(distinct.len(), 1, "one shared token");
    assert_eq!(h.sim.identity_requests(KEY_GLOBEX), 1);
}

#[tokio::test]
async fn expires_in_follows_the_token_and_never_goes_under_the_floor() {
    // Tokens live 200 s; the floor is 120 s and the refresh 150 s ahead.
    let h = harness(Options {
        token_lifetime: 200,
        payroc: "min_token_validity = \"120s\"\nrefresh_before_expiry = \"150s\"",
        ..Options::default()
    })
    .await;
    let r = post_key(&h1(), &authorize(&h, "acme"), "anything").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((120..=200).contains(&expires_in), "{expires_in}");
}

#[tokio::test]
async fn requests_are_counted_in_the_rpc_metrics() {
    let h = harness(Options {
        callers: CALLERS,
        metrics: true,
        ..Options::default()
    })
    .await;
    let c = h1();
    post_key(&c, &authorize(&h, "acme"), CALLER_WEB).await;
    post_key(&c, &authorize(&h, "acme"), CALLER_OPS).await;
    post_key(&c, &authorize(&h, "nope"), CALLER_WEB).await;
    let page = h.scrape().await;
    for line in [
        r#"payroc_broker_rpcs_total{rpc="Authorize",code="OK"} 1"#,
        r#"payroc_broker_rpcs_total{rpc="Authorize",code="PERMISSION_DENIED"} 1"#,
        r#"payroc_broker_rpcs_total{rpc="Authorize",code="NOT_FOUND"} 1"#,
    ] {
        assert!(page.lines().any(|l| l == line), "{line} in:\n{page}");
    }
    assert!(
        page.contains(r#"payroc_broker_rpc_duration_seconds_count{rpc="Authorize"} 3"#),
        "{page}"
    );
}

#[tokio::test]
async fn no_secret_reaches_a_refusal() {
    let h = harness(Options {
        callers: CALLERS,
        ..Options::default()
    })
    .await;
    let c = h1();
    let mut bodies = String::new();
    for (credential, key) in [
        ("acme", CALLER_OPS),
        ("revoked", CALLER_WEB),
        ("nope", CALLER_WEB),
        ("acme", "wrong-token-but-secret-looking-0123"),
    ] {
        let r = post_key(&c, &authorize(&h, credential), key).await;
        bodies.push_str(&r.text().await.unwrap());
    }
    for secret in [
        KEY_ACME,
        KEY_GLOBEX,
        KEY_REVOKED,
        CALLER_WEB,
        CALLER_OPS,
        "wrong-token-but-secret-looking-0123",
    ] {
        assert!(!bodies.contains(secret), "{secret} in {bodies}");
    }
}

#[tokio::test]
async fn shutdown_stops_the_identity_port_too() {
    let h = harness(Options::default()).await;
    let addr = h.identity_addr.unwrap();
    assert_eq!(
        post_key(&h1(), &authorize(&h, "acme"), "x").await.status(),
        200
    );
    h.shutdown().await.unwrap();
    let refused =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .unwrap();
    assert!(refused.is_err(), "the identity port closed");
}

/// A workload identified by its certificate, allowed every terminal of acme.
const MESH_CALLERS: &str = r#"
    [[callers]]
    name = "shop"
    spiffe_id = "spiffe://cluster.local/ns/shop/sa/web"
    terminals = ["1234001", "1234002", "5678002", "4444001"]
    rpcs = ["Authorize"]
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["*"]
"#;

#[tokio::test]
async fn over_tls_and_mtls_with_http1_and_http2() {
    use common::pki::{Pki, uri};
    let pki = Pki::new(false);
    let opts = Options {
        callers: MESH_CALLERS,
        identity_endpoint: true,
        ..Options::default()
    };
    let sim = start_sim(&opts).await;
    let mut config = config_for(&sim, &opts);
    config.server.tls = Some(pki.tls.clone());
    let served = serve(config).await;
    let url = format!(
        "https://localhost:{}/credentials/acme/authorize",
        served.identity_addr.unwrap().port()
    );
    let ca = reqwest::Certificate::from_pem(pki.server_ca.pem().as_bytes()).unwrap();
    let leaf = pki
        .client_ca
        .client_with(vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
    let identity = reqwest::Identity::from_pem((leaf.cert_pem + &leaf.key_pem).as_bytes()).unwrap();
    let client = |cert: bool, http1: bool| {
        let mut b = Client::builder().add_root_certificate(ca.clone());
        if cert {
            b = b.identity(identity.clone());
        }
        if http1 {
            b = b.http1_only();
        }
        b.build().unwrap()
    };
    for (http1, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        // The certificate names the caller; the x-api-key is anything (an
        // SDK must send one).
        let r = post_key(&client(true, http1), &url, "whatever-the-sdk-sends").await;
        assert_eq!((r.status(), r.version()), (StatusCode::OK, version));
        let body: Value = r.json().await.unwrap();
        assert!(body["access_token"].is_string());
        // Without a certificate, the caller token decides.
        let r = post_key(&client(false, http1), &url, CALLER_WEB).await;
        assert_eq!((r.status(), r.version()), (StatusCode::OK, version));
        let r = post_key(&client(false, http1), &url, "whatever-the-sdk-sends").await;
        problem(r, StatusCode::UNAUTHORIZED).await;
    }
    // A certificate held to its allow list: globex is not shop's.
    let globex = url.replace("/acme/", "/globex/");
    let r = post_key(&client(true, false), &globex, CALLER_WEB).await;
    problem(r, StatusCode::FORBIDDEN).await;
    // Plaintext on the TLS port gets nothing.
    let plain = url.replace("https://", "http://");
    assert!(h1().post(&plain).send().await.is_err());
}
