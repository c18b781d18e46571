//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`)
//! through the real server on loopback, in front of the simulated Payroc,
//! called with the tonic client generated from the vendored Envoy protos
//! (`payroc_broker::proto::envoy`): one test per row of the contract, and
//! checks that no token ever leaves in a denial.

mod common;

use std::collections::HashMap;

use common::*;
use payroc_broker::proto::envoy::{
    config::core::v3::{HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction},
    service::auth::v3::{
        AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
        attribute_context::{HttpRequest, Peer, Request as AttrRequest},
        authorization_client::AuthorizationClient,
        check_response::HttpResponse,
    },
};
use payroc_sim::{Fault, SimEndpoint};
use prost::Message;
use tonic::{Code, Request};

const SPIFFE_WEB: &str = "spiffe://cluster.local/ns/shop/sa/checkout-web";
const SPIFFE_OTHER: &str = "spiffe://cluster.local/ns/shop/sa/nobody";
const TERMINAL_HEADER: &str = "x-payroc-processing-terminal-id";

/// checkout-web (SPIFFE ID): ExtAuthz on 1234001 only.
/// ops (token CALLER_OPS): ExtAuthz on every terminal.
/// web (token CALLER_WEB): everything but ExtAuthz.
const CALLERS: &str = r#"
    [[callers]]
    name = "checkout-web"
    spiffe_id = "spiffe://cluster.local/ns/shop/sa/checkout-web"
    terminals = ["1234001"]
    rpcs = ["ExtAuthz"]
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["*"]
    rpcs = ["ExtAuthz", "GetBearerToken"]
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["GetBearerToken", "CreateSession", "WatchBearerToken"]
"#;

async fn harness(callers: &'static str) -> Harness {
    Harness::with(Options {
        ext_authz: true,
        callers,
        ..Options::default()
    })
    .await
}

/// The authority of the harness's `payroc.api_url` (the simulator).
fn api_host(h: &Harness) -> String {
    h.sim.addr().to_string()
}

/// A check for a request to `host` + `path` with `headers`, from `principal`.
fn check(host: &str, path: &str, headers: &[(&str, &str)], principal: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: principal.into(),
                ..Peer::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    host: host.into(),
                    path: path.into(),
                    scheme: "http".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<HashMap<_, _>>(),
                    ..HttpRequest::default()
                }),
                ..AttrRequest::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

/// Calls Check, with `metadata` on the gRPC call itself.
async fn call(h: &Harness, req: CheckRequest, metadata: &[(&'static str, &str)]) -> CheckResponse {
    let mut r = Request::new(req);
    for (k, v) in metadata {
        r.metadata_mut().append(*k, v.parse().unwrap());
    }
    AuthorizationClient::new(h.channel.clone())
        .check(r)
        .await
        .expect("Check answers with a decision, not an error")
        .into_inner()
}

/// Asserts an OK decision that sets `authorization` (overwriting) and
/// removes `x-api-key`, nothing else; returns the Bearer token.
#[track_caller]
fn allowed(r: CheckResponse) -> String {
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
    assert_eq!(r.dynamic_metadata, None);
    let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
        panic!("not an OkHttpResponse: {r:?}")
    };
    let token = ok
        .headers
        .first()
        .and_then(|h| h.header.as_ref())
        .and_then(|h| h.value.strip_prefix("Bearer "))
        .expect("a Bearer authorization first")
        .to_owned();
    assert!(!token.is_empty());
    // Exactly this, and nothing else of the request changed (the deprecated
    // `append` is left unset: the whole message is compared).
    let expected = OkHttpResponse {
        headers: vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: "authorization".into(),
                value: format!("Bearer {token}"),
                raw_value: Vec::new(),
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..HeaderValueOption::default()
        }],
        headers_to_remove: vec!["x-api-key".into()],
        ..OkHttpResponse::default()
    };
    assert_eq!(ok, expected);
    token
}

/// Asserts a DENIED decision with HTTP status `http`, and that it carries no
/// header but `retry-after`; returns it.
#[track_caller]
fn denied(r: CheckResponse, http: i32, code: Code) -> DeniedHttpResponse {
    assert_eq!(
        r.status.as_ref().map(|s| s.code),
        Some(code as i32),
        "{r:?}"
    );
    let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
        panic!("not a DeniedHttpResponse: {r:?}")
    };
    assert_eq!(d.status.as_ref().map(|s| s.code), Some(http), "{d:?}");
    for h in &d.headers {
        assert_eq!(h.header.as_ref().unwrap().key, "retry-after", "{d:?}");
    }
    d
}

/// Asserts a denial with no header at all.
#[track_caller]
fn denied_bare(r: CheckResponse, http: i32, code: Code) -> DeniedHttpResponse {
    let d = denied(r, http, code);
    assert!(d.headers.is_empty(), "{d:?}");
    d
}

const TERMINAL_PATH: &str = "/v1/processing-terminals/1234001/refunds?limit=10";

#[tokio::test]
async fn another_authority_never_gets_a_token() {
    let h = harness("").await; // open mode: everything else would be allowed
    let host = api_host(&h);
    let port = h.sim.addr().port();
    // Every token the broker could hand out here.
    let mut tokens = Vec::new();
    for t in ["1234001", "5678001"] {
        tokens.push(h.bearer(t).await.unwrap().access_token);
    }
    for other in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("127.0.0.2:{port}"),
        format!("localhost:{port}"),
        "127.0.0.1".to_owned(), // the default port is not the API's
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("{host}.evil.example"),
        format!("user@{host}"),
        String::new(),
    ] {
        let r = call(
            &h,
            check(&other, TERMINAL_PATH, &[(TERMINAL_HEADER, "1234001")], ""),
            &[],
        )
        .await;
        let bytes = r.encode_to_vec();
        denied_bare(r, 403, Code::PermissionDenied);
        for token in &tokens {
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "the denial for {other:?} holds a token"
            );
        }
    }
    // No HTTP attributes at all: no authority either.
    let r = call(&h, CheckRequest::default(), &[]).await;
    denied_bare(r, 403, Code::PermissionDenied);
    // The same request to the API's authority is allowed.
    allowed(call(&h, check(&host, TERMINAL_PATH, &[], ""), &[]).await);
}

#[tokio::test]
async fn the_authority_is_checked_before_the_terminal_and_the_caller() {
    let h = harness(CALLERS).await;
    // No terminal and no caller: still 403 for the host, not 400.
    let r = call(&h, check("evil.example", "/v1/payments", &[], ""), &[]).await;
    denied_bare(r, 403, Code::PermissionDenied);
    // A caller allowed everything does not change that.
    let r = call(
        &h,
        check("evil.example", TERMINAL_PATH, &[], ""),
        &[("authorization", &format!("Bearer {CALLER_OPS}"))],
    )
    .await;
    denied_bare(r, 403, Code::PermissionDenied);
    // The terminal comes before the caller: no caller, no terminal is a 400.
    let r = call(&h, check(&api_host(&h), "/v1/payments", &[], ""), &[]).await;
    denied_bare(r, 400, Code::InvalidArgument);
}

#[tokio::test]
async fn the_default_port_may_be_left_out_or_written() {
    let h = Harness::with(Options {
        ext_authz: true,
        api_url: "https://api.payroc.test/v1",
        ..Options::default()
    })
    .await;
    for host in ["api.payroc.test", "api.payroc.test:443", "API.Payroc.Test"] {
        allowed(call(&h, check(host, TERMINAL_PATH, &[], ""), &[]).await);
    }
    for host in ["api.payroc.test:80", "api.payroc.test:8443", "payroc.test"] {
        let r = call(&h, check(host, TERMINAL_PATH, &[], ""), &[]).await;
        denied_bare(r, 403, Code::PermissionDenied);
    }
}

#[tokio::test]
async fn the_terminal_in_the_path_gets_the_same_cached_token_as_get_bearer_token() {
    let h = harness("").await;
    let fetched = h.sim.identity_requests(KEY_ACME);
    let token = allowed(call(&h, check(&api_host(&h), TERMINAL_PATH, &[], ""), &[]).await);
    assert_eq!(token, h.bearer("1234001").await.unwrap().access_token);
    // The path wins over a header naming another credential's terminal.
    let r = call(
        &h,
        check(
            &api_host(&h),
            "/v1/processing-terminals/1234002/hosted-fields-sessions",
            &[(TERMINAL_HEADER, "5678001")],
            "",
        ),
        &[],
    )
    .await;
    assert_eq!(allowed(r), token, "1234002 is acme's too");
    assert_eq!(
        h.sim.identity_requests(KEY_ACME),
        fetched,
        "served from the warm cache"
    );
}

#[tokio::test]
async fn the_terminal_header_is_used_when_the_path_names_none() {
    let h = harness("").await;
    let r = call(
        &h,
        check(
            &api_host(&h),
            "/v1/payments",
            &[(TERMINAL_HEADER, "5678001")],
            "",
        ),
        &[],
    )
    .await;
    let globex = h.bearer("5678001").await.unwrap().access_token;
    assert_eq!(allowed(r), globex);
    assert_ne!(globex, h.bearer("1234001").await.unwrap().access_token);
}

#[tokio::test]
async fn no_terminal_or_an_unusable_one_is_a_400() {
    let h = harness("").await;
    let host = api_host(&h);
    for (path, headers) in [
        ("/v1/payments", &[][..]),
        ("/v1/payments", &[("x-terminal", "1234001")][..]),
        ("/v1/payments", &[(TERMINAL_HEADER, "1234001,5678001")][..]),
        ("/v1/processing-terminals/12/refunds", &[][..]),
        (
            "/v1/processing-terminals/1234001/../../processing-terminals/5678001/refunds",
            &[][..],
        ),
    ] {
        let r = call(&h, check(&host, path, headers, ""), &[]).await;
        denied_bare(r, 400, Code::InvalidArgument);
    }
}

#[tokio::test]
async fn the_principal_is_matched_against_spiffe_ids() {
    let h = harness(CALLERS).await;
    let host = api_host(&h);
    let token = allowed(call(&h, check(&host, TERMINAL_PATH, &[], SPIFFE_WEB), &[]).await);
    assert_eq!(token, bearer_as_ops(&h, "1234001").await);
    // checkout-web may use 1234001 only.
    let r = call(
        &h,
        check(
            &host,
            "/v1/processing-terminals/1234002/refunds",
            &[],
            SPIFFE_WEB,
        ),
        &[],
    )
    .await;
    denied_bare(r, 403, Code::PermissionDenied);
    // A principal that is nobody, and no identity on the call: no caller.
    let r = call(&h, check(&host, TERMINAL_PATH, &[], SPIFFE_OTHER), &[]).await;
    denied_bare(r, 403, Code::Unauthenticated);
    // ... but the call's own identity still counts.
    let r = call(
        &h,
        check(&host, TERMINAL_PATH, &[], SPIFFE_OTHER),
        &[("authorization", &format!("Bearer {CALLER_OPS}"))],
    )
    .await;
    assert_eq!(allowed(r), token);
}

#[tokio::test]
async fn the_principal_is_believed_from_trusted_proxies_only() {
    let h = Harness::with(Options {
        ext_authz: true,
        callers: CALLERS,
        server: "trusted_proxies = [\"10.0.0.0/8\"]",
        ..Options::default()
    })
    .await;
    let r = call(
        &h,
        check(&api_host(&h), TERMINAL_PATH, &[], SPIFFE_WEB),
        &[],
    )
    .await;
    denied_bare(r, 403, Code::Unauthenticated);
}

#[tokio::test]
async fn the_caller_of_the_check_is_identified_by_its_bearer_metadata() {
    let h = harness(CALLERS).await;
    let host = api_host(&h);
    let ops = format!("Bearer {CALLER_OPS}");
    let token = allowed(
        call(
            &h,
            check(&host, "/v1/payments", &[(TERMINAL_HEADER, "5678001")], ""),
            &[("authorization", &ops)],
        )
        .await,
    );
    assert_eq!(token, bearer_as_ops(&h, "5678001").await);
    // No identity at all.
    let r = call(&h, check(&host, TERMINAL_PATH, &[], ""), &[]).await;
    denied_bare(r, 403, Code::Unauthenticated);
    // A wrong token.
    let r = call(
        &h,
        check(&host, TERMINAL_PATH, &[], ""),
        &[("authorization", "Bearer not-a-caller-token-at-all-0000")],
    )
    .await;
    denied_bare(r, 403, Code::Unauthenticated);
    // The application's own `authorization` header is not the caller's.
    let r = call(
        &h,
        check(&host, TERMINAL_PATH, &[("authorization", &ops)], ""),
        &[],
    )
    .await;
    denied_bare(r, 403, Code::Unauthenticated);
}

#[tokio::test]
async fn ext_authz_must_be_in_the_callers_rpcs() {
    let h = harness(CALLERS).await;
    let r = call(
        &h,
        check(&api_host(&h), TERMINAL_PATH, &[], ""),
        &[("authorization", &format!("Bearer {CALLER_WEB}"))],
    )
    .await;
    let d = denied_bare(r, 403, Code::PermissionDenied);
    assert!(d.body.contains("ExtAuthz"), "{d:?}");
}

#[tokio::test]
async fn a_terminal_outside_the_allow_list_is_a_403() {
    let h = harness(CALLERS).await;
    let r = call(
        &h,
        check(
            &api_host(&h),
            "/v1/payments",
            &[(TERMINAL_HEADER, "5678001")],
            SPIFFE_WEB,
        ),
        &[],
    )
    .await;
    let d = denied_bare(r, 403, Code::PermissionDenied);
    assert!(d.body.contains("5678001"), "{d:?}");
}

#[tokio::test]
async fn an_unknown_terminal_is_a_404() {
    let h = harness(CALLERS).await;
    let r = call(
        &h,
        check(
            &api_host(&h),
            "/v1/processing-terminals/9999001/refunds",
            &[],
            "",
        ),
        &[("authorization", &format!("Bearer {CALLER_OPS}"))],
    )
    .await;
    denied_bare(r, 404, Code::NotFound);
}

#[tokio::test]
async fn an_identity_outage_is_a_503_with_retry_after() {
    let h = Harness::with(Options {
        ext_authz: true,
        cold: true,
        ..Options::default()
    })
    .await;
    h.sim.faults().always(
        SimEndpoint::Identity,
        Some(Fault::status(503).with_retry_after("30")),
    );
    let retry_after = |d: &DeniedHttpResponse| -> u64 {
        let h = d.headers.first().expect("a retry-after header");
        assert_eq!(
            h.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        h.header.as_ref().unwrap().value.parse().unwrap()
    };
    let req = || check(&h.sim.addr().to_string(), TERMINAL_PATH, &[], "");
    // Payroc's Retry-After, passed on.
    let d = denied(call(&h, req(), &[]).await, 503, Code::Unavailable);
    assert_eq!(retry_after(&d), 30, "{d:?}");
    // Then answered from the negative cache, still with a time to come back.
    let d = denied(call(&h, req(), &[]).await, 503, Code::Unavailable);
    assert!(retry_after(&d) >= 1, "{d:?}");
}

#[tokio::test]
async fn a_revoked_key_is_a_503_without_retry_after() {
    let h = harness("").await;
    let r = call(
        &h,
        check(
            &api_host(&h),
            "/v1/processing-terminals/7777001/refunds",
            &[],
            "",
        ),
        &[],
    )
    .await;
    denied_bare(r, 503, Code::Unavailable);
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_is_a_429_with_retry_after() {
    let h = harness(
        r#"
        [[callers]]
        name = "checkout-web"
        spiffe_id = "spiffe://cluster.local/ns/shop/sa/checkout-web"
        terminals = ["1234001"]
        rpcs = ["ExtAuthz"]
        rate_limit = "1/m"
        burst = 1
        "#,
    )
    .await;
    let req = || check(&api_host(&h), TERMINAL_PATH, &[], SPIFFE_WEB);
    allowed(call(&h, req(), &[]).await);
    let d = denied(call(&h, req(), &[]).await, 429, Code::ResourceExhausted);
    let wait: u64 = d.headers[0].header.as_ref().unwrap().value.parse().unwrap();
    assert!((1..=60).contains(&wait), "{d:?}");
}

#[tokio::test]
async fn without_ext_authz_enabled_there_is_no_check() {
    let h = Harness::start().await;
    let status = AuthorizationClient::new(h.channel.clone())
        .check(check(&api_host(&h), TERMINAL_PATH, &[], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

/// GetBearerToken as `ops`, for comparing tokens.
async fn bearer_as_ops(h: &Harness, terminal: &str) -> String {
    let mut r = Request::new(payroc_broker::proto::GetBearerTokenRequest {
        processing_terminal_id: terminal.into(),
        min_validity: None,
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {CALLER_OPS}").parse().unwrap(),
    );
    h.client
        .clone()
        .get_bearer_token(r)
        .await
        .unwrap()
        .into_inner()
        .access_token
}

/// Reflection describes the Authorization service and every type a Check
/// needs, so grpcurl can send one with a JSON body (as the sandbox shows).
#[tokio::test]
async fn reflection_describes_the_check_when_enabled() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    async fn ask(h: &Harness, request: MessageRequest) -> MessageResponse {
        let mut c = ServerReflectionClient::new(h.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut stream = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        stream
            .next()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap()
    }
    let h = harness("").await;
    let MessageResponse::ListServicesResponse(list) =
        ask(&h, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"envoy.service.auth.v3.Authorization"),
        "{names:?}"
    );
    assert!(names.contains(&"payroc.broker.v1.TokenBroker"), "{names:?}");

    let MessageResponse::FileDescriptorResponse(files) = ask(
        &h,
        MessageRequest::FileContainingSymbol("envoy.service.auth.v3.Authorization".into()),
    )
    .await
    else {
        panic!("no file for the service")
    };
    let decode = |b: &Vec<u8>| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap();
    let mut files: Vec<prost_types::FileDescriptorProto> =
        files.file_descriptor_proto.iter().map(decode).collect();
    // Every import resolves, as a client fetches them: file by file.
    let mut i = 0;
    while i < files.len() {
        for dep in files[i].dependency.clone() {
            if files.iter().any(|f| f.name() == dep) {
                continue;
            }
            let MessageResponse::FileDescriptorResponse(more) =
                ask(&h, MessageRequest::FileByFilename(dep.clone())).await
            else {
                panic!(
                    "{} imports {dep}, which reflection does not know",
                    files[i].name()
                )
            };
            files.extend(more.file_descriptor_proto.iter().map(decode));
        }
        i += 1;
    }
    assert!(files.len() > 10, "{}", files.len());
    let check_request = files
        .iter()
        .filter(|f| f.package() == "envoy.service.auth.v3")
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "CheckRequest")
        .expect("CheckRequest is described");
    assert_eq!(check_request.field[0].name(), "attributes");
    assert_eq!(check_request.field[0].number(), 1);

    // Off: not listed.
    let off = Harness::start().await;
    let MessageResponse::ListServicesResponse(list) =
        ask(&off, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list")
    };
    assert!(
        list.service
            .iter()
            .all(|s| s.name != "envoy.service.auth.v3.Authorization")
    );
}

/// The Check the sandbox prints is one the sandbox allows.
#[cfg(feature = "sandbox")]
#[tokio::test]
async fn the_sandbox_prints_a_check_that_works() {
    use std::sync::Arc;

    use payroc_broker::{
        app::sandbox::Sandbox,
        app::server,
        clock::{Clock, OsEntropy, SharedEntropy},
    };
    let entropy: SharedEntropy = Arc::new(OsEntropy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sandbox = Sandbox::start(addr, Clock::system(), Arc::clone(&entropy))
        .await
        .unwrap();
    assert!(sandbox.config.ext_authz.enabled);
    let printed = sandbox.instructions(addr, addr);
    let line = printed
        .lines()
        .find(|l| l.contains("envoy.service.auth.v3.Authorization/Check"))
        .expect("a Check line")
        .trim();
    assert_eq!(line, sandbox.check_example(addr));
    assert!(line.ends_with(&format!("{addr} envoy.service.auth.v3.Authorization/Check")));
    // grpcurl's JSON body, read as grpcurl maps it onto CheckRequest.
    let json = line
        .split_once("-d '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(body, _)| body)
        .expect("a -d '...' body");
    let body: serde_json::Value = serde_json::from_str(json).unwrap();
    let http = &body["attributes"]["request"]["http"];
    let text = |k: &str| http[k].as_str().unwrap_or_default().to_owned();
    let headers: HashMap<String, String> = http["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(text("host"), sandbox.sim.addr().to_string());
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: text("method"),
                    host: text("host"),
                    path: text("path"),
                    headers,
                    ..HttpRequest::default()
                }),
                ..AttrRequest::default()
            }),
            ..AttributeContext::default()
        }),
    };

    let config = sandbox.config.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server::serve(
            listener,
            &config,
            Clock::system(),
            entropy,
            async {
                let _ = stopped.await;
            },
            futures_util::stream::pending(),
        )
        .await
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = AuthorizationClient::new(channel)
        .check(req)
        .await
        .unwrap()
        .into_inner();
    allowed(r);
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
