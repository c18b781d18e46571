//! The audit trail through the real server: exactly one
//! `payroc_broker::audit` event per call, for every outcome class, with every
//! field right; the same events as the JSON and text formats print them; and
//! no secret in any line at any level.
//!
//! Each test installs its capture as the thread's default subscriber and
//! runs on a current-thread runtime, so the server's tasks (spawned on that
//! runtime) report to it and tests running in parallel do not mix.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use payroc_broker::{
    config::LogFormat,
    obs::logging,
    proto::{CreateSessionRequest, Scenario},
};
use payroc_sim::{Fault, SimEndpoint};
use serde_json::Value;
use tonic::{Code, Request, metadata::MetadataValue};
use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, layer::Context, layer::SubscriberExt};

/// One captured event: target, level and fields (strings, or numbers as
/// JSON numbers).
#[derive(Clone, Debug)]
struct Captured {
    target: String,
    level: Level,
    fields: BTreeMap<String, Value>,
}

impl Captured {
    fn str(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields<'a>(&'a mut BTreeMap<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Captured {
            target: event.metadata().target().into(),
            level: *event.metadata().level(),
            fields,
        });
    }
}

impl Capture {
    fn audits(&self) -> Vec<Captured> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target == "payroc_broker::audit")
            .cloned()
            .collect()
    }
}

/// Captured events, and every line as the JSON and text formats print it,
/// at TRACE for every crate.
struct Logs {
    events: Capture,
    json: LogBuffer,
    text: LogBuffer,
    _guard: tracing::subscriber::DefaultGuard,
}

fn capture() -> Logs {
    let (events, json, text) = (
        Capture::default(),
        LogBuffer::default(),
        LogBuffer::default(),
    );
    let (j, t) = (json.clone(), text.clone());
    let subscriber = tracing_subscriber::registry()
        .with(events.clone())
        .with(logging::fmt_layer(
            LogFormat::Json,
            move || j.clone(),
            false,
        ))
        .with(logging::fmt_layer(
            LogFormat::Text,
            move || t.clone(),
            false,
        ))
        .with(tracing_subscriber::filter::LevelFilter::TRACE);
    Logs {
        events,
        json,
        text,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

const CALLERS: &str = callers_with_web!(
    r#"
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["1234001"]
    rpcs = ["GetBearerToken"]
    rate_limit = "2/m"
    burst = 2
"#
);

/// `token_fp` as the contract defines it: the first 8 hex digits of the
/// token's SHA-256 (computed here, not by the broker's own code).
fn fingerprint(secret: &str) -> String {
    payroc_broker::config::sha256(secret.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const IDEM: &str = "5f0c6a8e-3b7d-4c2a-9e1f-2a4b6c8d0e1f";

fn traced<T>(mut r: Request<T>) -> Request<T> {
    r.metadata_mut()
        .insert("traceparent", MetadataValue::from_static(TRACEPARENT));
    r
}

/// Checks the fields every audit event has, and that the others are
/// exactly `expected` (absent where not listed).
#[track_caller]
fn assert_audit(e: &Captured, expected: &[(&str, Value)]) {
    assert_eq!(e.level, Level::INFO, "{e:?}");
    assert_eq!(e.str("message"), Some("rpc"), "{e:?}");
    let peer: std::net::SocketAddr = e.str("peer").expect("peer").parse().expect("peer");
    assert!(peer.ip().is_loopback() && peer.port() != 0, "{e:?}");
    let ms = e.fields["duration_ms"].as_f64().expect("duration_ms");
    assert!((0.0..10_000.0).contains(&ms), "{e:?}");
    let mut rest: BTreeMap<String, Value> = e.fields.clone();
    for k in ["message", "peer", "duration_ms"] {
        rest.remove(k);
    }
    let want: BTreeMap<String, Value> = expected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    assert_eq!(rest, want, "audit event fields");
}

fn s(v: &str) -> Value {
    Value::from(v)
}

#[tokio::test]
async fn every_outcome_is_audited_once_with_every_field() {
    let logs = capture();
    // Cold: the first call waits for the identity answer (upstream_status).
    let h = Harness::with(Options {
        callers: CALLERS,
        cold: true,
        ..Options::default()
    })
    .await;
    let mut c = h.client.clone();
    let mut calls = 0;
    let mut secrets: Vec<String> = vec![
        KEY_ACME.into(),
        KEY_GLOBEX.into(),
        KEY_REVOKED.into(),
        CALLER_WEB.into(),
        CALLER_OPS.into(),
    ];

    // OK, GetBearerToken, after an identity fetch, with a traceparent.
    let first = c
        .get_bearer_token(traced(authed(bearer_request("1234001"), CALLER_WEB)))
        .await
        .unwrap()
        .into_inner();
    calls += 1;
    // OK again, from the cache: no upstream response, no trace.
    let cached = c
        .get_bearer_token(authed(bearer_request("1234002"), CALLER_WEB))
        .await
        .unwrap()
        .into_inner();
    calls += 1;
    // OK, CreateSession with the caller's Idempotency-Key.
    let session = c
        .create_session(traced(authed(
            CreateSessionRequest {
                processing_terminal_id: "1234001".into(),
                scenario: Scenario::Payment as i32,
                idempotency_key: IDEM.into(),
                ..Default::default()
            },
            CALLER_WEB,
        )))
        .await
        .unwrap()
        .into_inner();
    calls += 1;
    // UNAUTHENTICATED: refused on the headers, before the body is read.
    let e = c
        .get_bearer_token(authed(
            bearer_request("1234001"),
            "not-a-caller-token-xyz-0123",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    calls += 1;
    // INVALID_ARGUMENT, with a terminal that tries to forge a log line.
    let forged = "12\n2025-01-01T00:00:00Z INFO rpc caller=admin\u{1b}[31m";
    let e = c
        .get_bearer_token(authed(bearer_request(forged), CALLER_WEB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    calls += 1;
    // PERMISSION_DENIED: ops may not have 1234002.
    let e = c
        .get_bearer_token(authed(bearer_request("1234002"), CALLER_OPS))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    calls += 1;
    // NOT_FOUND: nobody serves 9999001.
    let e = c
        .get_bearer_token(authed(bearer_request("9999001"), CALLER_WEB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    calls += 1;
    // Upstream refusals: the API key is rejected (identity 401), and
    // Payroc's 403 for another account's terminal (sessions).
    let e = c
        .get_bearer_token(authed(bearer_request("7777001"), CALLER_WEB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    calls += 1;
    let e = c
        .create_session(authed(payment("5678002"), CALLER_WEB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    calls += 1;
    // RESOURCE_EXHAUSTED: ops' bucket (2) is spent by its allowed call
    // and the denied one above; the next is refused before the body.
    c.get_bearer_token(authed(bearer_request("1234001"), CALLER_OPS))
        .await
        .unwrap();
    calls += 1;
    let e = c
        .get_bearer_token(authed(bearer_request("1234001"), CALLER_OPS))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    calls += 1;
    // A call the client abandons while Payroc is slow: CANCELLED.
    h.sim.faults().push(
        SimEndpoint::Sessions,
        Fault::status(0).with_delay(Duration::from_secs(3)),
        1,
    );
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        c.create_session(authed(payment("1234002"), CALLER_WEB)),
    )
    .await;
    assert!(abandoned.is_err(), "the call is still waiting");
    calls += 1;
    eventually("the abandoned call's audit event", || {
        let n = logs.events.audits().len();
        async move { n == calls }
    })
    .await;
    secrets.extend([
        first.access_token.clone(),
        cached.access_token.clone(),
        session.session_token.clone(),
        "not-a-caller-token-xyz-0123".into(),
    ]);

    let audits = logs.events.audits();
    assert_eq!(audits.len(), calls, "one event per call: {audits:#?}");
    let ok = || s("OK");
    assert_audit(
        &audits[0],
        &[
            ("caller", s("web")),
            ("rpc", s("GetBearerToken")),
            ("terminal", s("1234001")),
            ("credential", s("acme")),
            ("code", ok()),
            ("upstream_status", 200.into()),
            ("token_fp", s(&fingerprint(&first.access_token))),
            ("trace_id", s(TRACE_ID)),
        ],
    );
    assert_eq!(
        first.access_token, cached.access_token,
        "one token per credential"
    );
    assert_audit(
        &audits[1],
        &[
            ("caller", s("web")),
            ("rpc", s("GetBearerToken")),
            ("terminal", s("1234002")),
            ("credential", s("acme")),
            ("code", ok()),
            ("token_fp", s(&fingerprint(&cached.access_token))),
        ],
    );
    assert_audit(
        &audits[2],
        &[
            ("caller", s("web")),
            ("rpc", s("CreateSession")),
            ("terminal", s("1234001")),
            ("credential", s("acme")),
            ("code", ok()),
            ("upstream_status", 201.into()),
            ("token_fp", s(&fingerprint(&session.session_token))),
            ("idempotency_key", s(IDEM)),
            ("trace_id", s(TRACE_ID)),
        ],
    );
    assert_audit(
        &audits[3],
        &[("rpc", s("GetBearerToken")), ("code", s("UNAUTHENTICATED"))],
    );
    assert_audit(
        &audits[4],
        &[
            ("caller", s("web")),
            ("rpc", s("GetBearerToken")),
            ("terminal", s(forged)),
            ("code", s("INVALID_ARGUMENT")),
        ],
    );
    assert_audit(
        &audits[5],
        &[
            ("caller", s("ops")),
            ("rpc", s("GetBearerToken")),
            ("terminal", s("1234002")),
            ("code", s("PERMISSION_DENIED")),
        ],
    );
    assert_audit(
        &audits[6],
        &[
            ("caller", s("web")),
            ("rpc", s("GetBearerToken")),
            ("terminal", s("9999001")),
            ("code", s("NOT_FOUND")),
        ],
    );
    assert_audit(
        &audits[7],
        &[
            ("caller", s("web")),
            ("rpc", s("GetBearerToken")),
            ("terminal", s("7777001")),
            ("credential", s("revoked")),
            ("code", s("FAILED_PRECONDITION")),
            ("upstream_status", 401.into()),
        ],
    );
    assert_audit(
        &audits[8],
        &[
            ("caller", s("web")),
            ("rpc", s("CreateSession")),
            ("terminal", s("5678002")),
            ("credential", s("acme")),
            ("code", s("PERMISSION_DENIED")),
            ("upstream_status", 403.into()),
            (
                "idempotency_key",
                audits[8].fields["idempotency_key"].clone(),
            ),
        ],
    );
    let generated = audits[8].str("idempotency_key").unwrap();
    assert!(uuid::Uuid::try_parse(generated).is_ok(), "{generated}");
    assert_eq!(audits[9].str("code"), Some("OK"));
    assert_audit(
        &audits[10],
        &[
            ("caller", s("ops")),
            ("rpc", s("GetBearerToken")),
            ("code", s("RESOURCE_EXHAUSTED")),
        ],
    );
    assert_eq!(
        audits[11].str("code"),
        Some("CANCELLED"),
        "{:?}",
        audits[11]
    );
    assert_eq!(audits[11].str("rpc"), Some("CreateSession"));
    assert_eq!(audits[11].str("terminal"), Some("1234002"));

    // No other INFO line per call.
    let events = logs.events.0.lock().unwrap().clone();
    let service_info: Vec<_> = events
        .iter()
        .filter(|e| e.level <= Level::INFO && e.target.starts_with("payroc_broker::api"))
        .collect();
    assert!(service_info.is_empty(), "{service_info:#?}");

    // As printed: JSON lines with the fields at the top level; the forged
    // terminal stays inside its line in both formats.
    let json = logs.json.text();
    let audit_lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every line is one JSON object"))
        .filter(|v| v["target"] == "payroc_broker::audit")
        .collect();
    assert_eq!(audit_lines.len(), calls);
    let line = &audit_lines[0];
    for key in [
        "timestamp",
        "level",
        "target",
        "message",
        "caller",
        "rpc",
        "terminal",
    ] {
        assert!(line.get(key).is_some(), "{key} missing in {line}");
    }
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["message"], "rpc");
    assert_eq!(line["upstream_status"], 200);
    assert_eq!(line["trace_id"], TRACE_ID);
    assert_eq!(audit_lines[4]["terminal"], forged);
    let text = logs.text.text();
    assert!(
        !text.lines().any(|l| l.starts_with("2025-01-01T00:00:00Z")),
        "a caller forged a text line"
    );
    assert!(
        text.contains(r#"terminal="12\n2025-01-01T00:00:00Z"#),
        "escaped in text"
    );
    assert!(!text.contains('\u{1b}'), "no raw escape sequence");
    assert!(!json.contains('\u{1b}'), "no raw escape sequence");

    for secret in &secrets {
        for (format, out) in [("json", &json), ("text", &text)] {
            if let Some(l) = out.lines().find(|l| l.contains(secret.as_str())) {
                panic!("a secret reached the {format} logs: {l}");
            }
        }
    }
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_idempotency_key_is_logged_only_in_the_audit_event() {
    let logs = capture();
    let h = Harness::start().await;
    let key = "0d7a1c9e-55b2-4f0e-8a3c-6e2b1f9d4c07";
    h.session(CreateSessionRequest {
        idempotency_key: key.into(),
        ..payment("1234001")
    })
    .await
    .unwrap();
    // A refused one, too: the key is not logged when invalid either.
    h.session(CreateSessionRequest {
        idempotency_key: format!("{key}\nforged"),
        ..payment("1234001")
    })
    .await
    .unwrap_err();
    h.shutdown().await.unwrap();
    let events = logs.events.0.lock().unwrap().clone();
    let with_key: Vec<_> = events
        .iter()
        .filter(|e| e.fields.values().any(|v| v.to_string().contains(key)))
        .collect();
    assert_eq!(with_key.len(), 1, "{with_key:#?}");
    assert_eq!(with_key[0].target, "payroc_broker::audit");
}

#[tokio::test]
async fn every_identity_endpoint_request_is_audited_once_and_no_secret_is_logged() {
    let logs = capture();
    // Cold: the first request waits for the identity answer.
    let h = Harness::with(Options {
        callers: CALLERS,
        cold: true,
        identity_endpoint: true,
        ..Options::default()
    })
    .await;
    let base = format!("http://{}", h.identity_addr.unwrap());
    let client = reqwest::Client::new();
    let post = |path: &str, key: &str| {
        client
            .post(format!("{base}{path}"))
            .header("x-api-key", key)
            .header("traceparent", TRACEPARENT)
            .send()
    };
    let ok: Value = post("/credentials/acme/authorize", CALLER_WEB)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = ok["access_token"].as_str().unwrap().to_owned();
    let statuses = [
        post("/credentials/acme/authorize", "not-a-caller-token-xyz-0123").await,
        post("/credentials/acme/authorize", CALLER_OPS).await,
        post("/credentials/nope/authorize", CALLER_WEB).await,
        post("/credentials/revoked/authorize", CALLER_WEB).await,
    ]
    .map(|r| r.unwrap().status().as_u16());
    assert_eq!(statuses, [401, 403, 404, 502]);
    h.shutdown().await.unwrap();

    let audits = logs.events.audits();
    assert_eq!(audits.len(), 5, "one event per request: {audits:#?}");
    let authorize = |rest: &[(&'static str, Value)]| -> Vec<(&'static str, Value)> {
        let mut all = vec![
            ("rpc", s("Authorize")),
            ("terminal", s("")),
            ("trace_id", s(TRACE_ID)),
        ];
        all.extend_from_slice(rest);
        all
    };
    assert_audit(
        &audits[0],
        &authorize(&[
            ("caller", s("web")),
            ("credential", s("acme")),
            ("code", s("OK")),
            ("upstream_status", 200.into()),
            ("token_fp", s(&fingerprint(&token))),
        ]),
    );
    // A refused caller's event still names the configured credential.
    assert_audit(
        &audits[1],
        &authorize(&[("credential", s("acme")), ("code", s("UNAUTHENTICATED"))]),
    );
    assert_audit(
        &audits[2],
        &authorize(&[
            ("caller", s("ops")),
            ("credential", s("acme")),
            ("code", s("PERMISSION_DENIED")),
        ]),
    );
    assert_audit(
        &audits[3],
        &authorize(&[("caller", s("web")), ("code", s("NOT_FOUND"))]),
    );
    assert_audit(
        &audits[4],
        &authorize(&[
            ("caller", s("web")),
            ("credential", s("revoked")),
            ("code", s("FAILED_PRECONDITION")),
            ("upstream_status", 401.into()),
        ]),
    );
    let (json, text) = (logs.json.text(), logs.text.text());
    for secret in [
        KEY_ACME,
        KEY_GLOBEX,
        KEY_REVOKED,
        CALLER_WEB,
        CALLER_OPS,
        "not-a-caller-token-xyz-0123",
        token.as_str(),
    ] {
        for (format, out) in [("json", &json), ("text", &text)] {
            if let Some(l) = out.lines().find(|l| l.contains(secret)) {
                panic!("a secret reached the {format} logs: {l}");
            }
        }
    }
}
