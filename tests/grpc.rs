//! The contract, row by row, against a real broker on loopback in front of the
//! simulated Payroc.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use payroc_broker::proto::{CreateSessionRequest, GetBearerTokenRequest, Scenario};
use payroc_sim::{Fault, SimEndpoint};
use tonic::Code;

/// Asserts `t` lies more than `after` and at most `until` seconds from now.
#[track_caller]
fn assert_expires_within(t: prost_types::Timestamp, after: u64, until: u64) {
    let left = SystemTime::try_from(t)
        .unwrap()
        .duration_since(now())
        .unwrap();
    assert!(
        left > Duration::from_secs(after) && left <= Duration::from_secs(until),
        "{left:?}"
    );
}

#[allow(clippy::disallowed_methods)] // tests compare against the real wall clock
fn now() -> SystemTime {
    SystemTime::now()
}

fn body(record: &payroc_sim::SessionRecord) -> serde_json::Value {
    serde_json::from_str(&record.body).unwrap()
}

// ---- GetBearerToken ----------------------------------------------------------

#[tokio::test]
async fn bearer_token_has_every_field() {
    let h = Harness::start().await;
    let r = h.bearer("1234001").await.unwrap();
    assert!(!r.access_token.is_empty());
    assert_eq!(r.token_type, "Bearer");
    assert_eq!(r.credential, "acme");
    assert_eq!(r.scopes, ["hosted_fields", "payments"]);
    assert_expires_within(r.expires_at.unwrap(), 3590, 3600);
}

#[tokio::test]
async fn one_token_per_credential_is_shared_by_callers_and_terminals() {
    let h = Harness::start().await;
    let a = h.bearer("1234001").await.unwrap();
    let b = h.bearer("1234002").await.unwrap();
    assert_eq!(a.access_token, b.access_token);
    assert_eq!(h.sim.identity_requests(KEY_ACME), 1);
    let other = h.bearer("5678001").await.unwrap();
    assert_eq!(other.credential, "globex");
    assert_ne!(other.access_token, a.access_token);
    assert_eq!(h.sim.identity_requests(KEY_GLOBEX), 1);
}

#[tokio::test]
async fn concurrent_callers_cause_one_identity_request() {
    let h = Harness::cold().await;
    h.sim
        .faults()
        .set_latency(SimEndpoint::Identity, Duration::from_millis(200));
    let calls = (0..64).map(|i| {
        let h = &h;
        async move {
            h.bearer(if i % 2 == 0 { "1234001" } else { "1234002" })
                .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let first = results[0].as_ref().unwrap().access_token.clone();
    for r in results {
        assert_eq!(r.unwrap().access_token, first);
    }
    assert_eq!(h.sim.identity_requests(KEY_ACME), 1);
}

#[tokio::test]
async fn min_validity_longer_than_a_token_lives_is_out_of_range() {
    let h = Harness::start().await;
    expect_code(
        h.bearer_min("1234001", 7200).await.unwrap_err(),
        Code::OutOfRange,
    );
    expect_code(
        h.bearer_min("1234001", 3601).await.unwrap_err(),
        Code::OutOfRange,
    );
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        1,
        "the warm start's fetch only"
    );
    // Within the lifetime it is served.
    h.bearer_min("1234001", 600).await.unwrap();
}

#[tokio::test]
async fn min_validity_of_a_whole_lifetime_is_out_of_range_without_refetching() {
    // No fresh token can still have its whole lifetime left when it arrives:
    // asking for it must not make every call fetch a new one.
    let h = Harness::start().await;
    for _ in 0..5 {
        expect_code(
            h.bearer_min("1234001", 3600).await.unwrap_err(),
            Code::OutOfRange,
        );
    }
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        1,
        "the warm start's fetch only"
    );
}

#[tokio::test]
async fn bearer_request_fields_are_validated() {
    let h = Harness::start().await;
    let before = h.sim.stats();
    let e = h
        .client
        .clone()
        .get_bearer_token(GetBearerTokenRequest {
            processing_terminal_id: "12".into(),
            min_validity: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    let (_, d) = expect_code(e, Code::InvalidArgument);
    assert_eq!(
        violated_fields(&d),
        ["processing_terminal_id", "min_validity"]
    );
    let e = h.bearer("").await.unwrap_err();
    let (_, d) = expect_code(e, Code::InvalidArgument);
    assert_eq!(violated_fields(&d), ["processing_terminal_id"]);
    let e = h.bearer(&"1".repeat(51)).await.unwrap_err();
    expect_code(e, Code::InvalidArgument);
    // CR/LF would be dropped from the upstream path, naming another terminal.
    for id in ["1234001\r\n", "1234\r\n001", "1234001/x", "1234 001"] {
        let (_, d) = expect_code(h.bearer(id).await.unwrap_err(), Code::InvalidArgument);
        assert_eq!(violated_fields(&d), ["processing_terminal_id"], "{id:?}");
    }
    assert_eq!(h.sim.stats(), before, "Payroc was not asked");
}

#[tokio::test]
async fn an_unknown_terminal_is_not_found() {
    let h = Harness::start().await;
    let before = h.sim.stats();
    let (s, _) = expect_code(h.bearer("9999999").await.unwrap_err(), Code::NotFound);
    assert!(s.message().contains("9999999"), "{}", s.message());
    expect_code(
        h.session(payment("9999999")).await.unwrap_err(),
        Code::NotFound,
    );
    assert_eq!(h.sim.stats(), before, "Payroc was not asked");
}

#[tokio::test]
async fn a_rejected_api_key_is_failed_precondition() {
    let h = Harness::start().await;
    let (s, d) = expect_code(
        h.bearer("7777001").await.unwrap_err(),
        Code::FailedPrecondition,
    );
    // The RPC is answered from the negative cache (the warm start's
    // failure), so the error is the broker's own, naming Payroc's answer.
    let info = d.error_info().expect("ErrorInfo");
    assert_eq!(info.domain, "payroc-broker");
    assert_eq!(info.reason, "UPSTREAM_BACKING_OFF");
    assert_eq!(
        info.metadata.get("upstream_reason").map(String::as_str),
        Some("NOT_AUTHORIZED")
    );
    assert_eq!(info.metadata.get("status").map(String::as_str), Some("401"));
    assert!(!s.message().contains("revoked-api-key"), "{}", s.message());
    // Not retried within a fetch (the key will not get better); the RPC got
    // the warm start's failure at once rather than asking again.
    let asked = h.sim.identity_requests(KEY_REVOKED);
    assert!(asked <= 2, "{asked}");
    assert!(d.retry_info().is_none(), "no point retrying soon");
}

#[tokio::test]
async fn identity_forbidden_is_failed_precondition() {
    let h = Harness::cold().await;
    h.sim
        .faults()
        .push(SimEndpoint::Identity, Fault::status(403), 1);
    let (_, d) = expect_code(
        h.bearer("1234001").await.unwrap_err(),
        Code::FailedPrecondition,
    );
    assert_eq!(d.error_info().unwrap().reason, "FORBIDDEN");
}

#[tokio::test]
async fn identity_outages_are_retried_then_unavailable() {
    let h = Harness::cold().await;
    h.sim
        .faults()
        .push(SimEndpoint::Identity, Fault::status(503), 2);
    h.bearer("1234001").await.unwrap();
    assert_eq!(h.sim.identity_requests(KEY_ACME), 3);

    let h = Harness::cold().await;
    h.sim
        .faults()
        .always(SimEndpoint::Identity, Some(Fault::status(503)));
    let (_, d) = expect_code(h.bearer("1234001").await.unwrap_err(), Code::Unavailable);
    assert_eq!(d.error_info().unwrap().reason, "API_ERROR");
    assert_eq!(h.sim.identity_requests(KEY_ACME), 3, "max_attempts = 3");
    // The next caller fails fast, told when the broker will try again.
    let (_, d) = expect_code(h.bearer("1234002").await.unwrap_err(), Code::Unavailable);
    let wait = d.retry_info().and_then(|r| r.retry_delay);
    assert!(
        wait.is_some_and(|w| w <= Duration::from_secs(1)),
        "{wait:?}"
    );
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        3,
        "no new identity request while backing off"
    );
}

#[tokio::test]
async fn malformed_identity_answers_are_internal() {
    let h = Harness::cold().await;
    h.sim
        .faults()
        .push(SimEndpoint::Identity, Fault::malformed(), 1);
    let (s, _) = expect_code(h.bearer("1234001").await.unwrap_err(), Code::Internal);
    assert!(s.message().contains("malformed"), "{}", s.message());
    // The broker is still fine: another credential works.
    h.bearer("5678001").await.unwrap();
}

// ---- CreateSession -----------------------------------------------------------

#[tokio::test]
async fn a_session_is_created_as_payroc_documents() {
    let h = Harness::start().await;
    let r = h.session(payment("1234001")).await.unwrap();
    assert_eq!(r.processing_terminal_id, "1234001");
    assert!(!r.session_token.is_empty());
    assert_eq!(r.lib_version, "1.7.0.261457", "the configured default");
    let key = uuid::Uuid::parse_str(&r.idempotency_key).unwrap();
    assert_eq!(key.get_version_num(), 4);
    assert_expires_within(r.expires_at.unwrap(), 590, 600);

    let sent = h.sim.sessions();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, 201);
    assert_eq!(
        sent[0].idempotency_key.as_deref(),
        Some(r.idempotency_key.as_str())
    );
    assert_eq!(
        body(&sent[0]),
        serde_json::json!({"libVersion": "1.7.0.261457", "scenario": "payment"})
    );
    let bearer = h.bearer("1234001").await.unwrap();
    assert_eq!(
        sent[0].authorization_token.as_deref(),
        Some(bearer.access_token.as_str())
    );
}

#[tokio::test]
async fn optional_session_fields_are_sent_when_set() {
    let h = Harness::start().await;
    let key = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let r = h
        .session(CreateSessionRequest {
            processing_terminal_id: "1234002".into(),
            scenario: Scenario::Tokenization as i32,
            lib_version: "1.2.0-beta.135020".into(),
            secure_token_id: "MREF_abc123".into(),
            idempotency_key: key.into(),
        })
        .await
        .unwrap();
    assert_eq!(r.idempotency_key, key);
    assert_eq!(r.lib_version, "1.2.0-beta.135020");
    assert_eq!(
        body(&h.sim.sessions()[0]),
        serde_json::json!({"libVersion": "1.2.0-beta.135020", "scenario": "tokenization", "secureTokenId": "MREF_abc123"})
    );
}

#[tokio::test]
async fn a_missing_expires_at_falls_back_to_ten_minutes() {
    let h = Harness::start().await;
    h.sim.faults().omit_expires_at(true);
    let r = h.session(payment("1234001")).await.unwrap();
    assert_expires_within(r.expires_at.unwrap(), 590, 600);
}

#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_session() {
    let h = Harness::start().await;
    let mut req = payment("1234001");
    req.idempotency_key = "3f2b8a64-5c1e-4d7a-9b0e-2a6c1d8e4f00".into();
    let a = h.session(req.clone()).await.unwrap();
    let b = h.session(req.clone()).await.unwrap();
    assert_eq!(a.session_token, b.session_token);
    assert_eq!(h.sim.stats().sessions_created, 1);
    // Same key, another body: Payroc's 409.
    req.scenario = Scenario::Tokenization as i32;
    let (_, d) = expect_code(h.session(req).await.unwrap_err(), Code::AlreadyExists);
    assert_eq!(d.error_info().unwrap().reason, "IDEMPOTENCY_KEY_IN_USE");
}

#[tokio::test]
async fn session_request_fields_are_validated_together() {
    let h = Harness::start().await;
    let before = h.sim.stats();
    let e = h
        .session(CreateSessionRequest {
            processing_terminal_id: "123".into(),
            scenario: Scenario::Unspecified as i32,
            lib_version: "1.7".into(),
            secure_token_id: "x".repeat(201),
            idempotency_key: "6ba7b810-9dad-11d1-80b4-00c04fd430c8".into(), // v1
        })
        .await
        .unwrap_err();
    let (s, d) = expect_code(e, Code::InvalidArgument);
    assert_eq!(
        violated_fields(&d),
        [
            "processing_terminal_id",
            "scenario",
            "lib_version",
            "secure_token_id",
            "idempotency_key"
        ]
    );
    assert!(s.message().contains("scenario"), "{}", s.message());
    let mut bad_enum = payment("1234001");
    bad_enum.scenario = 7;
    let (_, d) = expect_code(
        h.session(bad_enum).await.unwrap_err(),
        Code::InvalidArgument,
    );
    assert_eq!(violated_fields(&d), ["scenario"]);
    let mut not_uuid = payment("1234001");
    not_uuid.idempotency_key = "not-a-uuid".into();
    let (_, d) = expect_code(
        h.session(not_uuid).await.unwrap_err(),
        Code::InvalidArgument,
    );
    assert_eq!(violated_fields(&d), ["idempotency_key"]);
    assert_eq!(h.sim.stats(), before, "Payroc was not asked");
}

#[tokio::test]
async fn a_revoked_bearer_token_is_refreshed_once_and_the_session_retried() {
    let h = Harness::start().await;
    let before = h.bearer("1234001").await.unwrap();
    h.sim.revoke_tokens();
    let r = h.session(payment("1234001")).await.unwrap();
    let sent = h.sim.sessions();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].status, 401);
    assert_eq!(sent[1].status, 201);
    assert_eq!(
        sent[0].idempotency_key, sent[1].idempotency_key,
        "same Idempotency-Key"
    );
    assert_eq!(sent[0].body, sent[1].body, "same body");
    assert_eq!(
        sent[1].idempotency_key.as_deref(),
        Some(r.idempotency_key.as_str())
    );
    assert_ne!(sent[0].authorization_token, sent[1].authorization_token);
    assert_eq!(h.sim.identity_requests(KEY_ACME), 2);
    // The broker now hands out the new token.
    let after = h.bearer("1234001").await.unwrap();
    assert_ne!(after.access_token, before.access_token);
    assert_eq!(
        sent[1].authorization_token.as_deref(),
        Some(after.access_token.as_str())
    );
}

#[tokio::test]
async fn many_concurrent_401s_cause_one_refresh() {
    let h = Harness::start().await;
    h.bearer("1234001").await.unwrap();
    h.sim.revoke_tokens();
    let calls = (0..20).map(|_| h.session(payment("1234001")));
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        2,
        "one initial fetch, one refresh"
    );
    assert_eq!(h.sim.stats().sessions_created, 20);
}

#[tokio::test]
async fn a_second_401_after_the_refresh_is_failed_precondition() {
    let h = Harness::start().await;
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::status(401), 2);
    let (s, d) = expect_code(
        h.session(payment("1234001")).await.unwrap_err(),
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("freshly fetched"), "{}", s.message());
    assert_eq!(d.error_info().unwrap().reason, "NOT_AUTHORIZED");
    assert_eq!(h.sim.stats().session_requests, 2, "retried exactly once");
    assert_eq!(h.sim.identity_requests(KEY_ACME), 2);
}

#[tokio::test]
async fn payroc_statuses_map_to_the_contracts_codes() {
    let h = Harness::start().await;
    let cases = [
        (400, Code::InvalidArgument, "BAD_REQUEST"),
        (413, Code::InvalidArgument, "PAYLOAD_TOO_LARGE"),
        (403, Code::PermissionDenied, "FORBIDDEN"),
        (404, Code::NotFound, "NOT_FOUND"),
        (409, Code::AlreadyExists, "ATTRIBUTE_CONFLICT"),
        (406, Code::Internal, "NOT_ACCEPTABLE"),
        (415, Code::Internal, "UNSUPPORTED_MEDIA_TYPE"),
    ];
    for (status, code, reason) in cases {
        h.sim
            .faults()
            .push(SimEndpoint::Sessions, Fault::status(status), 1);
        let (s, d) = expect_code(h.session(payment("1234001")).await.unwrap_err(), code);
        let info = d
            .error_info()
            .unwrap_or_else(|| panic!("{status}: no ErrorInfo: {s:?}"));
        assert_eq!(info.domain, "payroc.com");
        assert_eq!(info.reason, reason, "{status}");
        assert_eq!(info.metadata.get("status"), Some(&status.to_string()));
        assert!(info.metadata.contains_key("title"), "{status}");
        assert!(info.metadata.contains_key("detail"), "{status}");
    }
    assert_eq!(
        h.sim.stats().session_requests,
        cases.len() as u64,
        "none of these is retried"
    );
}

#[tokio::test]
async fn payrocs_own_verdicts_on_terminals_come_through() {
    let h = Harness::start().await;
    // 5678002 belongs to another Payroc account: Payroc says 403.
    let (_, d) = expect_code(
        h.session(payment("5678002")).await.unwrap_err(),
        Code::PermissionDenied,
    );
    assert_eq!(d.error_info().unwrap().reason, "FORBIDDEN");
    // 4444001 exists nowhere at Payroc: 404.
    let (_, d) = expect_code(
        h.session(payment("4444001")).await.unwrap_err(),
        Code::NotFound,
    );
    assert_eq!(d.error_info().unwrap().reason, "NOT_FOUND");
}

#[tokio::test]
async fn transient_session_failures_are_retried_with_the_same_key_and_body() {
    let h = Harness::start().await;
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::status(503), 1);
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::reset(), 1);
    let r = h.session(payment("1234001")).await.unwrap();
    let sent = h.sim.sessions();
    assert_eq!(sent.len(), 3);
    for s in &sent {
        assert_eq!(
            s.idempotency_key.as_deref(),
            Some(r.idempotency_key.as_str())
        );
        assert_eq!(s.body, sent[0].body);
    }
    assert_eq!(h.sim.stats().sessions_created, 1);
}

#[tokio::test]
async fn sessions_down_is_unavailable_after_the_bounded_attempts() {
    let h = Harness::start().await;
    h.sim
        .faults()
        .always(SimEndpoint::Sessions, Some(Fault::status(503)));
    let (_, d) = expect_code(
        h.session(payment("1234001")).await.unwrap_err(),
        Code::Unavailable,
    );
    assert_eq!(d.error_info().unwrap().reason, "API_ERROR");
    let sent = h.sim.sessions();
    assert_eq!(sent.len(), 3);
    assert!(
        sent.iter()
            .all(|s| s.idempotency_key == sent[0].idempotency_key)
    );
}

#[tokio::test]
async fn rate_limits_are_resource_exhausted_with_retry_info() {
    let h = Harness::start().await;
    // Retry-After past the caller's deadline: not retried, the wait is reported.
    h.sim.faults().push(
        SimEndpoint::Sessions,
        Fault::status(429).with_retry_after("30"),
        1,
    );
    let mut req = tonic::Request::new(payment("1234001"));
    req.set_timeout(Duration::from_secs(3));
    let e = h.client.clone().create_session(req).await.unwrap_err();
    let (_, d) = expect_code(e, Code::ResourceExhausted);
    assert_eq!(
        d.retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(30))
    );
    assert_eq!(h.sim.stats().session_requests, 1);

    // Attempts spent (Retry-After: 0 each time).
    h.sim.faults().push(
        SimEndpoint::Sessions,
        Fault::status(429).with_retry_after("0"),
        3,
    );
    let (_, d) = expect_code(
        h.session(payment("1234001")).await.unwrap_err(),
        Code::ResourceExhausted,
    );
    assert_eq!(d.retry_info().unwrap().retry_delay, Some(Duration::ZERO));
    assert_eq!(h.sim.stats().session_requests, 4);
}

#[tokio::test]
async fn an_identity_rate_limit_past_the_deadline_is_resource_exhausted() {
    let h = Harness::cold().await;
    h.sim.faults().push(
        SimEndpoint::Identity,
        Fault::status(429).with_retry_after("30"),
        1,
    );
    let mut req = tonic::Request::new(GetBearerTokenRequest {
        processing_terminal_id: "1234001".into(),
        min_validity: None,
    });
    req.set_timeout(Duration::from_secs(5));
    let e = h.client.clone().get_bearer_token(req).await.unwrap_err();
    let (_, d) = expect_code(e, Code::ResourceExhausted);
    assert_eq!(
        d.retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(30))
    );
    // Later callers are told the remaining wait, and Payroc is left alone.
    let (_, d) = expect_code(
        h.bearer("1234002").await.unwrap_err(),
        Code::ResourceExhausted,
    );
    let wait = d.retry_info().unwrap().retry_delay.unwrap();
    assert!(
        wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
    assert_eq!(h.sim.identity_requests(KEY_ACME), 1);
}

#[tokio::test]
async fn a_slow_payroc_gives_deadline_exceeded_on_time() {
    let h = Harness::start().await;
    h.bearer("1234001").await.unwrap();
    h.sim
        .faults()
        .set_latency(SimEndpoint::Sessions, Duration::from_secs(5));
    let mut req = tonic::Request::new(payment("1234001"));
    req.set_timeout(Duration::from_secs(1));
    let e = h.client.clone().create_session(req).await.unwrap_err();
    // The deadline (1 s) ended it, not request_timeout (2 s, which would be
    // UNAVAILABLE) nor the latency (5 s).
    expect_code(e, Code::DeadlineExceeded);

    // Waiting on a slow identity fetch is bounded the same way.
    let h = Harness::cold().await;
    h.sim
        .faults()
        .set_latency(SimEndpoint::Identity, Duration::from_secs(5));
    let mut req = tonic::Request::new(GetBearerTokenRequest {
        processing_terminal_id: "1234001".into(),
        min_validity: None,
    });
    req.set_timeout(Duration::from_secs(1));
    let e = h.client.clone().get_bearer_token(req).await.unwrap_err();
    expect_code(e, Code::DeadlineExceeded);
}

#[tokio::test]
async fn upstream_timeouts_are_unavailable() {
    let h = Harness::with(Options {
        payroc: "max_attempts = 1",
        cold: true,
        ..Options::default()
    })
    .await;
    h.sim
        .faults()
        .set_latency(SimEndpoint::Identity, Duration::from_secs(5));
    let (s, _) = expect_code(h.bearer("1234001").await.unwrap_err(), Code::Unavailable);
    assert!(s.message().contains("request_timeout"), "{}", s.message());
}

#[tokio::test]
async fn a_dead_payroc_is_unavailable() {
    let h = Harness::start().await;
    h.sim.shutdown();
    // Let the simulator's listener close.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(h.sim.addr()).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let (s, _) = expect_code(
        h.session(payment("1234001")).await.unwrap_err(),
        Code::Unavailable,
    );
    assert!(s.message().contains("could not reach"), "{}", s.message());
    // The cached Bearer token is still served: that needs no Payroc.
    h.bearer("1234001").await.unwrap();
}
