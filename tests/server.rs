//! Caller authentication, health, reflection and graceful shutdown, against a
//! real server on loopback.

mod common;

use std::time::Duration;

use common::*;
use payroc_broker::proto::GetBearerTokenRequest;
use payroc_sim::SimEndpoint;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const CALLERS: &str = r#"
    [[callers]]
    name = "checkout-web"
    token_env = "CALLER_WEB"
    terminals = ["1234001"]
    rpcs = ["CreateSession"]
    [[callers]]
    name = "ops"
    token_sha256 = "SHA_OPS"
    terminals = ["*"]
    rpcs = ["*"]
"#;

async fn with_callers() -> Harness {
    // token_sha256 is given as hex, the way an operator would paste it.
    let hex: String = payroc_broker::config::sha256(CALLER_OPS.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let callers: &'static str = Box::leak(CALLERS.replace("SHA_OPS", &hex).into_boxed_str());
    Harness::with(Options {
        callers,
        ..Options::default()
    })
    .await
}

fn bearer_req(terminal: &str) -> GetBearerTokenRequest {
    GetBearerTokenRequest {
        processing_terminal_id: terminal.into(),
        min_validity: None,
    }
}

#[tokio::test]
async fn callers_must_present_a_known_token() {
    let h = with_callers().await;
    let mut c = h.client.clone();
    let e = c.get_bearer_token(bearer_req("1234001")).await.unwrap_err();
    expect_code(e, Code::Unauthenticated);
    let e = c
        .get_bearer_token(authed(bearer_req("1234001"), "wrong"))
        .await
        .unwrap_err();
    let (s, _) = expect_code(e, Code::Unauthenticated);
    assert!(
        !s.message().contains("wrong"),
        "the presented token is not echoed"
    );
    // Authentication is checked before the request's fields.
    let e = c.get_bearer_token(bearer_req("1")).await.unwrap_err();
    expect_code(e, Code::Unauthenticated);
    c.get_bearer_token(authed(bearer_req("1234001"), CALLER_OPS))
        .await
        .unwrap();
}

#[tokio::test]
async fn callers_stay_within_their_allow_lists() {
    let h = with_callers().await;
    let mut c = h.client.clone();
    // checkout-web may CreateSession on 1234001 only.
    c.create_session(authed(payment("1234001"), CALLER_WEB))
        .await
        .unwrap();
    let e = c
        .get_bearer_token(authed(bearer_req("1234001"), CALLER_WEB))
        .await
        .unwrap_err();
    let (s, _) = expect_code(e, Code::PermissionDenied);
    assert!(s.message().contains("checkout-web"), "{}", s.message());
    let e = c
        .create_session(authed(payment("1234002"), CALLER_WEB))
        .await
        .unwrap_err();
    expect_code(e, Code::PermissionDenied);
    // A terminal outside the list is denied whether or not it is configured.
    let e = c
        .create_session(authed(payment("9999999"), CALLER_WEB))
        .await
        .unwrap_err();
    expect_code(e, Code::PermissionDenied);
    // ...but bad fields are reported before the allow lists.
    let e = c
        .create_session(authed(payment("12"), CALLER_WEB))
        .await
        .unwrap_err();
    let (_, d) = expect_code(e, Code::InvalidArgument);
    assert_eq!(violated_fields(&d), ["processing_terminal_id"]);
    // An allowed caller on an unconfigured terminal: NOT_FOUND.
    let e = c
        .get_bearer_token(authed(bearer_req("9999999"), CALLER_OPS))
        .await
        .unwrap_err();
    expect_code(e, Code::NotFound);
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let h = with_callers().await;
    let mut health = HealthClient::new(h.channel.clone());
    for service in ["", "payroc.broker.v1.TokenBroker"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    assert_eq!(
        reflected_services_v1(&h).await.len(),
        reflected_services_v1alpha(&h).await.len()
    );
    let services = reflected_services_v1alpha(&h).await;
    assert!(
        services.contains(&"payroc.broker.v1.TokenBroker".to_owned()),
        "{services:?}"
    );
    assert!(
        services.contains(&"grpc.health.v1.Health".to_owned()),
        "{services:?}"
    );
}

/// `ListServices` through one reflection version (the generated types differ
/// per version, the exchange does not).
macro_rules! reflected_services {
    ($name:ident, $version:ident) => {
        async fn $name(h: &Harness) -> Vec<String> {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut c = ServerReflectionClient::new(h.channel.clone());
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = c
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            match stream.next().await.unwrap().unwrap().message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    l.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
    };
}
reflected_services!(reflected_services_v1, v1);
reflected_services!(reflected_services_v1alpha, v1alpha);

#[tokio::test]
async fn shutdown_turns_health_not_serving_and_lets_in_flight_rpcs_finish() {
    let mut h = Harness::start().await;
    h.bearer("1234001").await.unwrap();
    let mut health = HealthClient::new(h.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "payroc.broker.v1.TokenBroker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    // An RPC that is in flight when shutdown begins.
    h.sim
        .faults()
        .set_latency(SimEndpoint::Sessions, Duration::from_millis(500));
    let in_flight = tokio::spawn({
        let mut c = h.client.clone();
        async move { c.create_session(payment("1234001")).await }
    });
    while h.sim.stats().session_requests == 0 {
        tokio::task::yield_now().await;
    }
    h.begin_shutdown();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    drop(watch);

    let done = in_flight.await.unwrap();
    assert!(done.is_ok(), "the in-flight RPC finished: {done:?}");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn during_the_grace_period_new_rpcs_are_refused() {
    let mut h = Harness::start().await;
    h.sim
        .faults()
        .set_latency(SimEndpoint::Sessions, Duration::from_millis(1500)); // < request_timeout
    let in_flight = tokio::spawn({
        let mut c = h.client.clone();
        async move { c.create_session(payment("1234001")).await }
    });
    while h.sim.stats().session_requests == 0 {
        tokio::task::yield_now().await;
    }
    let addr = h.addr;
    h.begin_shutdown();
    // Neither the open connection nor a new one takes new RPCs...
    eventually("new RPCs refused", || async {
        h.bearer("1234001").await.is_err()
    })
    .await;
    let fresh = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(fresh.is_err(), "the listener is closed");
    // ...while the RPC already in flight still completes.
    assert!(!in_flight.is_finished());
    in_flight
        .await
        .unwrap()
        .expect("the in-flight RPC finished");
    h.shutdown().await.unwrap();
}
