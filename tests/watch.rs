//! Bearer tokens followed over time, through a real broker in front of the
//! simulated Payroc: WatchBearerToken, and the cache's robustness against
//! identity answers that would break its arithmetic.

mod common;

use common::*;
use tonic::Code;

#[tokio::test]
async fn an_absurd_expires_in_fails_internal_and_the_next_request_succeeds() {
    let h = Harness::cold().await;
    h.sim.faults().announce_expires_in(Some(u64::MAX));
    let e = h.bearer("1234001").await.unwrap_err();
    let (status, _) = expect_code(e, Code::Internal);
    assert!(status.message().contains("expires_in"), "{status:?}");
    h.sim.faults().announce_expires_in(None);
    // The failed fetch is negatively cached for about a second; then the
    // cache (no lock poisoned, no task dead) fetches a good token.
    eventually("a token after the fault is removed", || async {
        h.bearer("1234001").await.is_ok()
    })
    .await;
}

// ---- WatchBearerToken --------------------------------------------------------

use payroc_broker::proto::{GetBearerTokenResponse, WatchBearerTokenRequest};
use tonic::{Request, Status, Streaming};

async fn watch(h: &Harness, terminal: &str) -> Result<Streaming<GetBearerTokenResponse>, Status> {
    watch_as(h, terminal, None).await
}

async fn watch_as(
    h: &Harness,
    terminal: &str,
    caller_token: Option<&str>,
) -> Result<Streaming<GetBearerTokenResponse>, Status> {
    let mut req = Request::new(WatchBearerTokenRequest {
        processing_terminal_id: terminal.into(),
        min_validity: None,
    });
    if let Some(t) = caller_token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    h.client
        .clone()
        .watch_bearer_token(req)
        .await
        .map(tonic::Response::into_inner)
}

/// The next message, failing the test after 10 s.
async fn next(s: &mut Streaming<GetBearerTokenResponse>) -> Result<GetBearerTokenResponse, Status> {
    tokio::time::timeout(std::time::Duration::from_secs(10), s.message())
        .await
        .expect("a message within 10 s")
        .map(|m| m.expect("the stream goes on"))
}

#[tokio::test]
async fn the_current_token_comes_at_once_then_each_replacement() {
    let h = Harness::start().await;
    let mut s = watch(&h, "1234001").await.unwrap();
    let first = next(&mut s).await.unwrap();
    assert_eq!(
        first.access_token,
        h.bearer("1234001").await.unwrap().access_token
    );
    assert_eq!(first.credential, "acme");
    assert_eq!(first.token_type, "Bearer");
    assert_eq!(h.sim.identity_requests(KEY_ACME), 1, "no fetch of its own");

    // Payroc revokes the token; a session request meets the 401 and the
    // broker replaces the cached token: the watcher gets the new one.
    h.sim.revoke_tokens();
    h.session(payment("1234001")).await.unwrap();
    let second = next(&mut s).await.unwrap();
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(
        second.access_token,
        h.bearer("1234001").await.unwrap().access_token
    );
    assert_eq!(h.sim.identity_requests(KEY_ACME), 2);
}

#[tokio::test]
async fn the_first_token_is_fetched_on_demand_with_get_bearer_tokens_errors() {
    let h = Harness::cold().await;
    let mut s = watch(&h, "1234001").await.unwrap();
    assert!(!next(&mut s).await.unwrap().access_token.is_empty());
    expect_code(watch(&h, "9999999").await.unwrap_err(), Code::NotFound);
    expect_code(watch(&h, "1").await.unwrap_err(), Code::InvalidArgument);
    // Payroc refuses the key: as GetBearerToken.
    let e = watch(&h, "7777001").await.unwrap_err();
    assert_eq!(e.code(), h.bearer("7777001").await.unwrap_err().code());
}

const EXTRA: &str = r#"
    [[credentials]]
    name = "extra"
    api_key_env = "KEY_GLOBEX_NEW"
    terminals = ["9999001"]
"#;

#[tokio::test]
async fn a_reload_that_removes_the_terminal_ends_the_stream_not_found() {
    let h = Harness::with(Options {
        credentials: EXTRA,
        ..Options::default()
    })
    .await;
    let mut kept = watch(&h, "1234001").await.unwrap();
    let mut removed = watch(&h, "9999001").await.unwrap();
    next(&mut kept).await.unwrap();
    next(&mut removed).await.unwrap();
    h.reload(&Options::default()).await;
    expect_code(next(&mut removed).await.unwrap_err(), Code::NotFound);
    // The other stream goes on: it sees the next replacement.
    h.sim.revoke_tokens();
    h.session(payment("1234001")).await.unwrap();
    let fresh = next(&mut kept).await.unwrap();
    assert_eq!(
        fresh.access_token,
        h.bearer("1234001").await.unwrap().access_token
    );
}

#[tokio::test]
async fn shutdown_ends_the_stream_unavailable_and_the_server_stops() {
    let mut h = Harness::start().await;
    let mut s = watch(&h, "1234001").await.unwrap();
    next(&mut s).await.unwrap();
    h.begin_shutdown();
    expect_code(next(&mut s).await.unwrap_err(), Code::Unavailable);
    h.shutdown().await.unwrap();
}

const CALLERS: &str = r#"
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["GetBearerToken"]
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["1234001"]
    rpcs = ["WatchBearerToken"]
"#;

#[tokio::test]
async fn callers_need_watch_bearer_token_in_their_rpcs() {
    let h = Harness::with(Options {
        callers: CALLERS,
        ..Options::default()
    })
    .await;
    let denied = watch_as(&h, "1234001", Some(CALLER_WEB)).await.unwrap_err();
    expect_code(denied, Code::PermissionDenied);
    let outside = watch_as(&h, "1234002", Some(CALLER_OPS)).await.unwrap_err();
    expect_code(outside, Code::PermissionDenied);
    expect_code(
        watch(&h, "1234001").await.unwrap_err(),
        Code::Unauthenticated,
    );
    let mut s = watch_as(&h, "1234001", Some(CALLER_OPS)).await.unwrap();
    next(&mut s).await.unwrap();
}

const WATCHERS: &str = r#"
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["WatchBearerToken", "CreateSession"]
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["1234001"]
    rpcs = ["WatchBearerToken"]
"#;
const WEB_ONLY: &str = r#"
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["WatchBearerToken", "CreateSession"]
"#;
const WEB_WITHOUT_WATCH: &str = r#"
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["CreateSession"]
"#;

#[tokio::test]
async fn a_reload_that_takes_away_a_callers_access_ends_its_streams() {
    let with = |callers| Options {
        callers,
        ..Options::default()
    };
    let h = Harness::with(with(WATCHERS)).await;
    let mut web = watch_as(&h, "1234001", Some(CALLER_WEB)).await.unwrap();
    let mut ops = watch_as(&h, "1234001", Some(CALLER_OPS)).await.unwrap();
    let first = next(&mut web).await.unwrap();
    next(&mut ops).await.unwrap();

    // ops is no longer configured: its stream ends as a new call would.
    h.reload(&with(WEB_ONLY)).await;
    expect_code(next(&mut ops).await.unwrap_err(), Code::Unauthenticated);
    // web keeps its access and its stream: it sees the next token.
    h.sim.revoke_tokens();
    let mut session = Request::new(payment("1234001"));
    let bearer = format!("Bearer {CALLER_WEB}").parse().unwrap();
    session.metadata_mut().insert("authorization", bearer);
    h.client.clone().create_session(session).await.unwrap();
    let fresh = next(&mut web).await.unwrap();
    assert_ne!(fresh.access_token, first.access_token);

    // web may no longer watch.
    h.reload(&with(WEB_WITHOUT_WATCH)).await;
    expect_code(next(&mut web).await.unwrap_err(), Code::PermissionDenied);
}
