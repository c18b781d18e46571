//! Fault injection: the broker riding out a misbehaving Payroc, against the
//! simulated Payroc on loopback with short token lifetimes and real time.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use payroc_broker::proto::GetBearerTokenRequest;
use payroc_sim::{Fault, SimEndpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Short-lived-token timing: single-attempt fetches retried after 50 to
/// 200 ms, tokens usable down to 200 ms, renewed `refresh_before_expiry`
/// (minus up to a quarter) before expiry.
const FAST_REFRESH_3S: &str = r#"refresh_before_expiry = "3s"
    min_token_validity = "200ms"
    max_attempts = 1
    identity_backoff = "100ms"
    identity_max_backoff = "200ms""#;
const FAST_REFRESH_1S: &str = r#"refresh_before_expiry = "1s"
    min_token_validity = "200ms"
    max_attempts = 1
    identity_backoff = "100ms"
    identity_max_backoff = "200ms""#;

#[tokio::test]
async fn an_identity_outage_while_a_token_is_valid_fails_no_rpc() {
    // 6 s tokens renewed 3 to 3.75 s before expiry; single-attempt fetches
    // retried after 50 ms to 200 ms; a token is usable down to 200 ms.
    let h = Harness::with(Options {
        token_lifetime: 6,
        payroc: FAST_REFRESH_3S,
        ..Options::default()
    })
    .await;
    let first = h.bearer("1234001").await.unwrap().access_token;
    h.sim
        .faults()
        .always(SimEndpoint::Identity, Some(Fault::status(503)));

    // The outage lasts one second from the first failed renewal, then Payroc
    // recovers and the refresher catches up; callers keep calling throughout.
    const OUTAGE: Duration = Duration::from_secs(1);
    let (mut rpcs, mut failures) = (0u64, Vec::new());
    let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut outage_started = None;
    let mut outage = None; // (RPCs, identity attempts) during the outage
    loop {
        assert!(
            tokio::time::Instant::now() < give_up,
            "no renewal after the outage"
        );
        rpcs += 2;
        let b = h.bearer("1234001").await;
        let s = h.session(payment("1234002")).await;
        for e in [b.as_ref().err(), s.as_ref().err()].into_iter().flatten() {
            failures.push(format!("{:?}: {}", e.code(), e.message()));
        }
        let attempts = h.sim.identity_requests(KEY_ACME) - 1;
        match (outage_started, outage) {
            (None, _) if attempts >= 1 => {
                outage_started = Some((tokio::time::Instant::now(), rpcs))
            }
            (Some((at, rpcs_before)), None) if at.elapsed() >= OUTAGE => {
                outage = Some((rpcs - rpcs_before, attempts));
                h.sim.faults().always(SimEndpoint::Identity, None);
            }
            (_, Some(_)) if b.is_ok_and(|b| b.access_token != first) => break,
            _ => {}
        }
        tokio::task::yield_now().await;
    }
    let (rpcs_during_outage, attempts_during_outage) = outage.unwrap();

    assert_eq!(failures, Vec::<String>::new(), "no RPC failed");
    assert!(
        rpcs_during_outage >= 20,
        "{rpcs_during_outage} RPCs during the outage"
    );
    // Backoff 50-100 ms, then 100-200 ms: about 6 to 12 attempts in a second,
    // not one per RPC.
    assert!(
        (3..=13).contains(&attempts_during_outage),
        "{attempts_during_outage} identity attempts in the 1 s outage, for {rpcs_during_outage} RPCs"
    );
}

#[tokio::test]
async fn with_identity_down_and_no_token_callers_fail_fast_without_a_storm() {
    let h = Harness::cold().await;
    h.sim
        .faults()
        .always(SimEndpoint::Identity, Some(Fault::status(503)));
    let calls = (0..100).map(|_| h.bearer("1234001"));
    let results = futures_util::future::join_all(calls).await;
    for r in results {
        let (_, d) = expect_code(r.unwrap_err(), Code::Unavailable);
        assert_eq!(d.error_info().unwrap().reason, "API_ERROR");
    }
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        3,
        "one fetch of max_attempts = 3, shared by 100 callers"
    );
    // Callers arriving now are answered from the negative cache, with a hint.
    for _ in 0..50 {
        let (_, d) = expect_code(h.bearer("1234002").await.unwrap_err(), Code::Unavailable);
        assert!(d.retry_info().is_some());
    }
    assert_eq!(h.sim.identity_requests(KEY_ACME), 3);
}

#[tokio::test]
async fn rate_limited_sessions_wait_as_retry_after_says() {
    let h = Harness::start().await;
    h.sim.faults().push(
        SimEndpoint::Sessions,
        Fault::status(429).with_retry_after("1"),
        1,
    );
    let r = h.session(payment("1234001")).await.unwrap();
    let sent = h.sim.sessions();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].status, 429);
    assert!(
        sent.iter()
            .all(|s| s.idempotency_key.as_deref() == Some(r.idempotency_key.as_str()))
    );
    assert_eq!(sent[0].body, sent[1].body);
    let waited = sent[1].received_at - sent[0].received_at;
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before Retry-After"
    );
}

#[tokio::test]
async fn broken_answers_give_clean_errors_and_the_broker_stays_up() {
    let h = Harness::cold().await;
    // Identity: a connection reset on every attempt.
    h.sim
        .faults()
        .always(SimEndpoint::Identity, Some(Fault::reset()));
    let (s, _) = expect_code(h.bearer("1234001").await.unwrap_err(), Code::Unavailable);
    assert!(s.message().contains("could not reach"), "{}", s.message());
    h.sim.faults().clear();
    // Sessions: malformed JSON, then resets on every attempt.
    h.bearer("5678001").await.unwrap();
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::malformed(), 1);
    expect_code(
        h.session(payment("5678001")).await.unwrap_err(),
        Code::Internal,
    );
    h.sim
        .faults()
        .always(SimEndpoint::Sessions, Some(Fault::reset()));
    expect_code(
        h.session(payment("5678001")).await.unwrap_err(),
        Code::Unavailable,
    );
    let keys: Vec<_> = h.sim.sessions()[1..]
        .iter()
        .map(|s| s.idempotency_key.clone())
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one Idempotency-Key for all attempts"
    );
    h.sim.faults().clear();
    // Still serving.
    assert_eq!(health_of(&h.channel, "").await, Ok(ServingStatus::Serving));
    h.session(payment("5678001")).await.unwrap();
}

#[tokio::test]
async fn sessions_beyond_the_bulkhead_are_shed() {
    let h = Harness::with(Options {
        payroc: "max_concurrent_sessions = 2",
        ..Options::default()
    })
    .await;
    h.sim
        .faults()
        .set_latency(SimEndpoint::Sessions, Duration::from_millis(500));
    let calls = (0..6).map(|_| h.session(payment("1234001")));
    let results = futures_util::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let shed: Vec<_> = results
        .into_iter()
        .filter_map(Result::err)
        .map(|e| expect_code(e, Code::ResourceExhausted).0)
        .collect();
    assert_eq!(ok, 2);
    assert_eq!(shed.len(), 4);
    assert!(
        shed[0].message().contains("already in flight"),
        "{}",
        shed[0].message()
    );
    assert_eq!(
        h.sim.stats().session_requests,
        2,
        "shed requests never reached Payroc"
    );
}

#[tokio::test]
async fn a_connection_beyond_the_limit_takes_an_idle_ones_place() {
    let h = Harness::with(Options {
        server: "max_connections = 2",
        ..Options::default()
    })
    .await;
    let connect = || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
            .unwrap()
            .connect()
            .await?;
        let mut c =
            payroc_broker::proto::token_broker_client::TokenBrokerClient::new(channel.clone());
        c.get_bearer_token(GetBearerTokenRequest {
            processing_terminal_id: "1234001".into(),
            min_validity: None,
        })
        .await
        .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(channel)
    };
    let second = connect()
        .await
        .expect("the second connection is within the limit");
    // Both open connections are idle: the third takes the place of one
    // (a connection with an RPC in flight is never evicted; refusals when all
    // are busy: tests/transport.rs).
    let third = connect()
        .await
        .expect("the third takes an idle connection's place");
    drop((second, third));
}

#[tokio::test]
async fn a_slow_identity_service_delays_serving_only_up_to_the_bound() {
    let h = Harness::with(Options {
        server: r#"warm_start_timeout = "300ms""#,
        identity_latency_ms: 1500, // under request_timeout (2 s)
        ..Options::default()
    })
    .await;
    // The harness saw SERVING; no token has arrived yet.
    assert_eq!(health_of(&h.channel, "").await, Ok(ServingStatus::Serving));
    assert_eq!(
        health_of(&h.channel, "payroc.broker.v1.TokenBroker/acme").await,
        Ok(ServingStatus::NotServing)
    );
    let mut req = tonic::Request::new(GetBearerTokenRequest {
        processing_terminal_id: "1234001".into(),
        min_validity: None,
    });
    req.set_timeout(Duration::from_millis(500));
    let e = h.client.clone().get_bearer_token(req).await.unwrap_err();
    expect_code(e, Code::DeadlineExceeded);
    wait_for_health(
        &h.channel,
        "payroc.broker.v1.TokenBroker/acme",
        ServingStatus::Serving,
    )
    .await;
}

#[tokio::test]
async fn each_credential_has_its_own_health_entry() {
    let h = Harness::with(Options {
        token_lifetime: 2,
        payroc: FAST_REFRESH_1S,
        ..Options::default()
    })
    .await;
    let svc = |c: &str| format!("payroc.broker.v1.TokenBroker/{c}");
    assert_eq!(
        health_of(&h.channel, &svc("acme")).await,
        Ok(ServingStatus::Serving)
    );
    assert_eq!(
        health_of(&h.channel, &svc("globex")).await,
        Ok(ServingStatus::Serving)
    );
    // Payroc rejects revoked's key: that credential alone is down.
    wait_for_health(&h.channel, &svc("revoked"), ServingStatus::NotServing).await;
    assert_eq!(health_of(&h.channel, "").await, Ok(ServingStatus::Serving));

    // Identity down: tokens run out, and health says so, per credential.
    h.sim
        .faults()
        .always(SimEndpoint::Identity, Some(Fault::status(503)));
    wait_for_health(&h.channel, &svc("acme"), ServingStatus::NotServing).await;
    assert_eq!(
        health_of(&h.channel, "").await,
        Ok(ServingStatus::Serving),
        "the service itself is up"
    );
    h.sim.faults().always(SimEndpoint::Identity, None);
    wait_for_health(&h.channel, &svc("acme"), ServingStatus::Serving).await;
}

#[tokio::test]
async fn reload_rotates_adds_and_removes_credentials_and_keeps_the_rest() {
    let h = Harness::start().await;
    let acme = h.bearer("1234001").await.unwrap().access_token;
    let globex = h.bearer("5678001").await.unwrap().access_token;
    h.bearer("9990001").await.unwrap_err();

    let next = Options {
        rotate_globex: true,
        drop_revoked: true,
        credentials: r#"
            [[credentials]]
            name = "initech"
            api_key_env = "KEY_GLOBEX"
            terminals = ["9990001"]"#,
        ..Options::default()
    };
    h.reload(&next).await;
    eventually("the new credential", || async {
        h.bearer("9990001").await.is_ok()
    })
    .await;

    assert_eq!(
        h.bearer("1234001").await.unwrap().access_token,
        acme,
        "unchanged: token kept"
    );
    assert_eq!(h.sim.identity_requests(KEY_ACME), 1);
    let rotated = h.bearer("5678001").await.unwrap();
    assert_ne!(rotated.access_token, globex, "rotated key: new token");
    assert_eq!(h.sim.identity_requests(KEY_GLOBEX_NEW), 1);
    expect_code(h.bearer("7777001").await.unwrap_err(), Code::NotFound);
    assert_eq!(
        health_of(&h.channel, "payroc.broker.v1.TokenBroker/revoked").await,
        Err(Code::NotFound),
        "a removed credential's health entry is gone"
    );
    wait_for_health(
        &h.channel,
        "payroc.broker.v1.TokenBroker/initech",
        ServingStatus::Serving,
    )
    .await;

    // A new libVersion changes sessions, not tokens.
    h.reload(&Options {
        payroc: r#"lib_version = "1.7.0.261471""#,
        ..next.clone()
    })
    .await;
    eventually("the new libVersion", || async {
        h.session(payment("1234001"))
            .await
            .is_ok_and(|s| s.lib_version == "1.7.0.261471")
    })
    .await;
    assert_eq!(
        h.bearer("1234001").await.unwrap().access_token,
        acme,
        "token kept"
    );
    assert_eq!(h.sim.identity_requests(KEY_ACME), 1);

    // Callers take effect too.
    h.reload(&Options {
        callers: r#"
            [[callers]]
            name = "web"
            token_env = "CALLER_WEB"
            terminals = ["*"]
            rpcs = ["*"]"#,
        ..next
    })
    .await;
    eventually("caller authentication", || async {
        h.bearer("1234001")
            .await
            .is_err_and(|e| e.code() == Code::Unauthenticated)
    })
    .await;
}

#[tokio::test]
async fn reload_under_load_fails_no_rpc() {
    let h = Arc::new(Harness::start().await);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for i in 0..8 {
        let (h, stop, done) = (Arc::clone(&h), Arc::clone(&stop), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = if i % 2 == 0 {
                    h.bearer("1234001").await.map(drop)
                } else {
                    h.session(payment("1234002")).await.map(drop)
                };
                if let Err(e) = r {
                    failures.push(format!("{:?}: {}", e.code(), e.message()));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let variants = [
        Options {
            rotate_globex: true,
            ..Options::default()
        },
        Options {
            drop_revoked: true,
            ..Options::default()
        },
        Options {
            credentials: r#"
                [[credentials]]
                name = "initech"
                api_key_env = "KEY_GLOBEX"
                terminals = ["9990001"]"#,
            ..Options::default()
        },
    ];
    for round in 0..9 {
        let before = done.load(Ordering::Relaxed);
        h.reload(&variants[round % variants.len()]).await;
        // Let real traffic flow through each configuration.
        eventually("traffic after a reload", || async {
            done.load(Ordering::Relaxed) >= before + 50
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert_eq!(failures, Vec::<String>::new());
    assert!(done.load(Ordering::Relaxed) >= 450);
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        1,
        "acme's token survived every reload"
    );
}

#[tokio::test]
async fn a_reload_keeps_the_session_bulkhead_full() {
    let opts = Options {
        payroc: "max_concurrent_sessions = 2",
        ..Options::default()
    };
    let h = Arc::new(Harness::with(opts.clone()).await);
    h.sim
        .faults()
        .set_latency(SimEndpoint::Sessions, Duration::from_millis(1500)); // < request_timeout
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.session(payment("1234001")).await })
        })
        .collect();
    while h.sim.stats().session_requests < 2 {
        tokio::task::yield_now().await;
    }
    // Same limit, one more credential (to see when the reload has landed).
    h.reload(&Options {
        credentials: r#"
            [[credentials]]
            name = "initech"
            api_key_env = "KEY_GLOBEX"
            terminals = ["9990001"]"#,
        ..opts
    })
    .await;
    eventually("the reload", || async { h.bearer("9990001").await.is_ok() }).await;
    // The two requests admitted before the reload still count.
    let e = h.session(payment("1234001")).await.unwrap_err();
    expect_code(e, Code::ResourceExhausted);
    for t in in_flight {
        t.await.unwrap().unwrap();
    }
    assert_eq!(h.sim.stats().session_requests, 2);
}
