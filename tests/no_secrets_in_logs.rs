//! Captures every log line, at TRACE for every crate (h2, hyper, reqwest,
//! tonic included), in both log formats as the binary configures them,
//! through full flows (traced, refused, rate-limited and abandoned calls
//! too), and asserts no API key, Bearer token, session token or caller token
//! appears.

mod common;

use common::*;
use payroc_broker::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context, authorization_client::AuthorizationClient,
};
use payroc_broker::{config::LogFormat, obs::logging};
use payroc_sim::{Fault, SimEndpoint};
use tonic::Request;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};

const CALLERS: &str = callers_with_web!(
    r#"
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["*"]
    rpcs = ["*"]
    rate_limit = "1/m"
"#
);

/// [`authed`] with a `traceparent`, so the trace paths are in the capture too.
fn authed_traced<T>(msg: T, token: &str) -> Request<T> {
    let mut r = authed(msg, token);
    r.metadata_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    r
}

#[tokio::test]
async fn no_secret_reaches_a_log_line() {
    let capture = LogBuffer::default();
    let (text, json) = (capture.clone(), capture.clone());
    tracing_subscriber::registry()
        .with(logging::fmt_layer(
            LogFormat::Text,
            move || text.clone(),
            false,
        ))
        .with(logging::fmt_layer(
            LogFormat::Json,
            move || json.clone(),
            false,
        ))
        .with(tracing_subscriber::filter::LevelFilter::TRACE)
        .init();

    let h = Harness::with(Options {
        callers: CALLERS,
        ext_authz: true,
        ..Options::default()
    })
    .await;
    let mut c = h.client.clone();
    let mut secrets: Vec<String> = vec![
        KEY_ACME.into(),
        KEY_GLOBEX.into(),
        "revoked-api-key-000000".into(),
        CALLER_WEB.into(),
        CALLER_OPS.into(),
    ];

    let first = c
        .get_bearer_token(authed_traced(bearer_request("1234001"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    secrets.push(first.access_token);
    let s = c
        .create_session(authed_traced(payment("1234001"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    secrets.push(s.session_token);

    // A revoked token: 401, refresh, retry.
    h.sim.revoke_tokens();
    let s = c
        .create_session(authed_traced(payment("1234002"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    secrets.push(s.session_token);
    let second = c
        .get_bearer_token(authed_traced(bearer_request("1234001"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    secrets.push(second.access_token);

    // Failures: a rejected API key, upstream problems, a bad caller token.
    c.get_bearer_token(authed_traced(bearer_request("7777001"), CALLER_WEB))
        .await
        .unwrap_err();
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::status(400), 1);
    c.create_session(authed_traced(payment("1234001"), CALLER_WEB))
        .await
        .unwrap_err();
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::malformed(), 1);
    c.create_session(authed_traced(payment("1234001"), CALLER_WEB))
        .await
        .unwrap_err();
    c.get_bearer_token(authed_traced(
        bearer_request("1234001"),
        "not-a-caller-token-xyz",
    ))
    .await
    .unwrap_err();
    secrets.push("not-a-caller-token-xyz".into());
    let g = c
        .get_bearer_token(authed_traced(bearer_request("5678001"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    secrets.push(g.access_token);
    // Rate-limited, then abandoned while Payroc is slow.
    c.get_bearer_token(authed_traced(bearer_request("1234001"), CALLER_OPS))
        .await
        .unwrap();
    c.get_bearer_token(authed_traced(bearer_request("1234001"), CALLER_OPS))
        .await
        .unwrap_err();
    h.sim.faults().push(
        SimEndpoint::Sessions,
        Fault::status(0).with_delay(std::time::Duration::from_secs(3)),
        1,
    );
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        c.create_session(authed_traced(payment("1234001"), CALLER_WEB)),
    )
    .await;
    assert!(abandoned.is_err());
    eventually("the abandoned call's audit event", || {
        let seen = capture.text().contains("code=CANCELLED");
        async move { seen }
    })
    .await;

    // ext_authz: a token attached, then a request to another host refused.
    for host in [h.sim.addr().to_string(), "evil.example".into()] {
        let check = authed_traced(
            CheckRequest {
                attributes: Some(AttributeContext {
                    request: Some(attribute_context::Request {
                        http: Some(attribute_context::HttpRequest {
                            host,
                            path: "/v1/processing-terminals/1234001/refunds".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            CALLER_WEB,
        );
        AuthorizationClient::new(h.channel.clone())
            .check(check)
            .await
            .unwrap();
    }

    h.shutdown().await.unwrap();

    let logs = capture.text();
    // The capture really saw the flows, down to the HTTP/2 frames.
    assert!(
        logs.contains("payroc_broker::audit: rpc caller=web rpc=CreateSession"),
        "capture is working"
    );
    assert!(
        logs.contains(r#""target":"payroc_broker::audit""#),
        "{logs}"
    );
    assert!(logs.contains("code=RESOURCE_EXHAUSTED"));
    assert!(logs.contains("code=CANCELLED"));
    assert!(logs.contains("fetched a Bearer token"));
    // ext_authz Checks, allowed and denied, audited like the RPCs.
    assert!(logs.contains(r#"rpc=ExtAuthz terminal="1234001" credential=acme code=OK"#));
    assert!(logs.contains("rpc=ExtAuthz code=PERMISSION_DENIED"));
    assert!(logs.contains("check denied"));
    assert!(logs.contains("h2::"), "transport traces were captured too");
    assert!(logs.lines().count() > 200, "{} lines", logs.lines().count());
    for secret in &secrets {
        assert!(!secret.is_empty());
        if let Some(line) = logs.lines().find(|l| l.contains(secret.as_str())) {
            panic!("a secret reached the logs: {line}");
        }
    }
}
