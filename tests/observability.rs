//! What an operator sees: Prometheus metrics after real traffic (values,
//! not just names), `traceparent` carried to Payroc, and the binary's logs:
//! JSON lines, and RPCs that keep completing while stderr is blocked.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::*;
use payroc_broker::{
    clock::{Clock, OsEntropy},
    proto::token_broker_client::TokenBrokerClient,
};
use payroc_sim::{Fault, SimAccount, SimConfig, SimEndpoint, SimPayroc};
use serde_json::Value;
use tonic::{Code, Request};

const CALLERS: &str = callers_with_web!(
    r#"
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["1234001"]
    rpcs = ["GetBearerToken"]
    rate_limit = "1/m"
"#
);

/// The value of one series (`name{labels}` exactly as exposed).
#[track_caller]
fn value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{page}"))
        .parse()
        .unwrap()
}

/// The sum of every series of `name` whose labels contain `with`.
fn sum(page: &str, name: &str, with: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(with))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let h = Harness::with(Options {
        callers: CALLERS,
        cold: true,
        metrics: true,
        ..Options::default()
    })
    .await;
    let mut c = h.client.clone();
    for _ in 0..3 {
        c.get_bearer_token(authed(bearer_request("1234001"), CALLER_WEB))
            .await
            .unwrap();
    }
    c.create_session(authed(payment("1234001"), CALLER_WEB))
        .await
        .unwrap();
    // One 503, retried: the RPC succeeds, both attempts are counted.
    h.sim
        .faults()
        .push(SimEndpoint::Sessions, Fault::status(503), 1);
    c.create_session(authed(payment("1234002"), CALLER_WEB))
        .await
        .unwrap();
    // The key is rejected, then the broker backs off without asking again.
    for _ in 0..2 {
        let e = c
            .get_bearer_token(authed(bearer_request("7777001"), CALLER_WEB))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }
    let e = c
        .create_session(authed(payment("5678002"), CALLER_WEB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .get_bearer_token(authed(
            bearer_request("1234001"),
            "not-a-caller-token-xyz-0123",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    c.get_bearer_token(authed(bearer_request("1234001"), CALLER_OPS))
        .await
        .unwrap();
    let e = c
        .get_bearer_token(authed(bearer_request("1234001"), CALLER_OPS))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    let page = h.scrape().await;
    let rpcs = |rpc: &str, code: &str| {
        value(
            &page,
            &format!("payroc_broker_rpcs_total{{rpc=\"{rpc}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(rpcs("GetBearerToken", "OK"), 4.0);
    assert_eq!(rpcs("GetBearerToken", "FAILED_PRECONDITION"), 2.0);
    assert_eq!(rpcs("GetBearerToken", "UNAUTHENTICATED"), 1.0);
    assert_eq!(rpcs("GetBearerToken", "RESOURCE_EXHAUSTED"), 1.0);
    assert_eq!(rpcs("CreateSession", "OK"), 2.0);
    assert_eq!(rpcs("CreateSession", "PERMISSION_DENIED"), 1.0);
    assert_eq!(
        value(
            &page,
            "payroc_broker_rpc_duration_seconds_count{rpc=\"GetBearerToken\"}"
        ),
        8.0
    );
    assert_eq!(
        value(
            &page,
            "payroc_broker_rpc_duration_seconds_bucket{rpc=\"CreateSession\",le=\"+Inf\"}"
        ),
        3.0
    );

    // Upstream: what the simulator saw, by status.
    let stats = h.sim.stats();
    let upstream = |e: &str, s: &str| {
        value(
            &page,
            &format!("payroc_broker_upstream_requests_total{{endpoint=\"{e}\",status=\"{s}\"}}"),
        )
    };
    assert_eq!(
        sum(
            &page,
            "payroc_broker_upstream_requests_total",
            "endpoint=\"identity\""
        ),
        stats.identity_requests as f64
    );
    assert_eq!(stats.identity_requests, 2);
    assert_eq!(upstream("identity", "200"), 1.0);
    assert_eq!(upstream("identity", "401"), 1.0);
    assert_eq!(
        sum(
            &page,
            "payroc_broker_upstream_requests_total",
            "endpoint=\"sessions\""
        ),
        stats.session_requests as f64
    );
    assert_eq!(upstream("sessions", "201"), 2.0);
    assert_eq!(upstream("sessions", "503"), 1.0);
    assert_eq!(upstream("sessions", "403"), 1.0);
    assert_eq!(
        value(
            &page,
            "payroc_broker_upstream_duration_seconds_count{endpoint=\"sessions\"}"
        ),
        4.0
    );

    // Gauges, read at scrape time.
    let expiry = value(
        &page,
        "payroc_broker_token_expiry_seconds{credential=\"acme\"}",
    );
    assert!((3000.0..=3600.0).contains(&expiry), "{expiry}");
    assert_eq!(
        value(
            &page,
            "payroc_broker_token_expiry_seconds{credential=\"globex\"}"
        ),
        0.0,
        "never fetched"
    );
    assert_eq!(
        value(
            &page,
            "payroc_broker_token_refresh_failures{credential=\"revoked\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &page,
            "payroc_broker_token_refresh_failures{credential=\"acme\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &page,
            "payroc_broker_caller_rate_limited_total{caller=\"ops\"}"
        ),
        1.0
    );
    assert_eq!(value(&page, "payroc_broker_sessions_in_flight"), 0.0);
    assert!(value(&page, "payroc_broker_log_lines_dropped_total") >= 0.0);
    assert_eq!(
        value(
            &page,
            &format!(
                "payroc_broker_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // Labels never hold terminal ids or secrets.
    for never in [
        "1234001", "5678002", "7777001", KEY_ACME, CALLER_WEB, CALLER_OPS,
    ] {
        assert!(!page.contains(never), "{never} in\n{page}");
    }

    // A session in flight shows while Payroc takes its time.
    h.sim.faults().push(
        SimEndpoint::Sessions,
        Fault::status(0).with_delay(Duration::from_secs(2)),
        1,
    );
    let slow = tokio::spawn({
        let mut c = c.clone();
        async move {
            c.create_session(authed(payment("1234001"), CALLER_WEB))
                .await
        }
    });
    eventually("a session in flight", || async {
        value(&h.scrape().await, "payroc_broker_sessions_in_flight") == 1.0
    })
    .await;
    slow.await.unwrap().unwrap();
    assert_eq!(
        value(&h.scrape().await, "payroc_broker_sessions_in_flight"),
        0.0
    );

    // Only GET /metrics.
    let addr = h.metrics_addr.unwrap();
    let other = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(other.status(), 404);
    let post = reqwest::Client::new()
        .post(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn traceparent_goes_upstream_with_the_same_trace_id() {
    let h = Harness::cold().await;
    let mut c = h.client.clone();
    fn traced<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        r
    }
    // The bearer call starts the identity fetch; the session call sends.
    c.get_bearer_token(traced(bearer_request("1234001")))
        .await
        .unwrap();
    c.create_session(traced(payment("1234001"))).await.unwrap();
    // Untraced, and an invalid traceparent (uppercase): nothing sent.
    c.create_session(payment("1234001")).await.unwrap();
    let mut bad = Request::new(payment("1234001"));
    bad.metadata_mut().insert(
        "traceparent",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"
            .parse()
            .unwrap(),
    );
    c.create_session(bad).await.unwrap();

    let seen = h.sim.traceparents();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, SimEndpoint::Identity);
    assert_eq!(seen[1].0, SimEndpoint::Sessions);
    for (_, t) in &seen {
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4, "{t}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c", "same trace");
        assert_eq!(parts[2].len(), 16);
        assert_ne!(
            parts[2], "b7ad6b7169203331",
            "a span id of the broker's own"
        );
        assert_ne!(parts[2], "0000000000000000");
        assert_eq!(parts[3], "01", "flags kept");
    }
    assert_ne!(seen[0].1, seen[1].1, "each request its own span id");
    h.shutdown().await.unwrap();
}

// The binary, as an operator runs it.

const BIN: &str = env!("CARGO_BIN_EXE_payroc-broker");

/// Kills the child if a test fails half-way.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("payroc-broker-obs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn simulator() -> SimPayroc {
    SimPayroc::start(SimConfig::new(
        Clock::system(),
        Arc::new(OsEntropy),
        vec![SimAccount::new(KEY_ACME, &["1234001"])],
    ))
    .await
    .unwrap()
}

/// A free loopback port (bound and released: the broker binds it next).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Reads lines of `pipe` until one contains `needle`; returns it and the
/// reader, still open and no longer read.
async fn read_until(
    pipe: impl std::io::Read + Send + 'static,
    needle: &'static str,
) -> (String, BufReader<impl std::io::Read + Send + 'static>) {
    tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!("the broker never printed `{needle}`");
            }
            if line.contains(needle) {
                return (line.trim_end().to_owned(), reader);
            }
        }
    })
    .await
    .unwrap()
}

fn serve(config: &PathBuf, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("PAYROC_BROKER_CONFIG")
        .env("NO_COLOR", "1")
        .env("KEY_ACME", KEY_ACME)
        .args([
            "serve",
            "--allow-unauthenticated",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn serve_config(sim: &SimPayroc, server: &str) -> String {
    format!(
        "[server]\n{server}\n[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n\
         [[credentials]]\nname = \"acme\"\napi_key_env = \"KEY_ACME\"\nterminals = [\"1234001\"]\n",
        sim.identity_url(),
        sim.api_url()
    )
}

/// Waits (at most 10 s) for the child to exit; its exit code.
async fn exit_code(child: Running) -> Option<i32> {
    let pid = child.0.id().to_string();
    let wait = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.0.wait().unwrap().code()
    });
    match tokio::time::timeout(Duration::from_secs(10), wait).await {
        Ok(code) => code.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("the broker did not exit within 10 s of the signal");
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn rpcs_complete_while_stderr_is_blocked_and_dropped_lines_are_counted() {
    let sim = simulator().await;
    let metrics = free_port();
    let path = config_file(
        "blocked.toml",
        &serve_config(&sim, &format!("metrics_listen = \"{metrics}\"")),
    );
    // TRACE for every crate: dozens of lines per RPC, so the pipe (64 KiB)
    // and then the log queue fill after a few hundred calls.
    let mut child = serve(&path, &[]).env("RUST_LOG", "trace").spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Running(child);
    let (line, _unread) = read_until(stderr, "payroc-broker serving").await;
    let addr: SocketAddr = line
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    // From here on nobody reads stderr: the broker's writes to it block.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut c = TokenBrokerClient::new(channel);
    let scrape = || async move {
        let page = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        value(&page, "payroc_broker_log_lines_dropped_total")
    };
    let mut calls = 0;
    while scrape().await == 0.0 {
        assert!(calls < 5000, "no line dropped after {calls} calls");
        for _ in 0..50 {
            let t = c.get_bearer_token(bearer_request("1234001")).await;
            assert_eq!(t.unwrap().into_inner().credential, "acme");
            calls += 1;
        }
    }
    // And calls still complete, promptly, with stderr blocked for good.
    let started = tokio::time::Instant::now();
    for _ in 0..200 {
        c.get_bearer_token(bearer_request("1234001")).await.unwrap();
    }
    // (Each call is bounded by the channel's 5 s timeout: a call held up
    // by logging fails there.)
    let took = started.elapsed();
    let dropped = scrape().await;
    assert!(dropped > 0.0);
    eprintln!("{calls} calls until lines were dropped; {dropped} dropped; 200 more took {took:?}");
    signal(&child.0, "-TERM");
    assert_eq!(
        exit_code(child).await,
        Some(0),
        "exits cleanly, stderr blocked"
    );
}

#[tokio::test]
async fn json_lines_from_the_config_and_from_the_flag() {
    let sim = simulator().await;
    // `[server] log_format = "json"`: every line one JSON object.
    let path = config_file("json.toml", &serve_config(&sim, "log_format = \"json\""));
    let mut child = serve(&path, &[]).env("RUST_LOG", "info").spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Running(child);
    let (line, reader) = read_until(stderr, "payroc-broker serving").await;
    let v: Value = serde_json::from_str(&line).expect("a JSON line");
    let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "payroc_broker::app::server");
    assert_eq!(v["message"], "payroc-broker serving");
    assert!(v["timestamp"].is_string());
    let mut c = TokenBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut r = Request::new(bearer_request("1234001"));
    r.metadata_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    c.get_bearer_token(r).await.unwrap();
    let (audit, _) = read_until(reader, "payroc_broker::audit").await;
    let v: Value = serde_json::from_str(&audit).expect("a JSON line");
    for (k, want) in [
        ("message", "rpc"),
        ("level", "INFO"),
        ("caller", "anonymous"),
        ("rpc", "GetBearerToken"),
        ("terminal", "1234001"),
        ("credential", "acme"),
        ("code", "OK"),
        ("trace_id", "0af7651916cd43dd8448eb211c80319c"),
    ] {
        assert_eq!(v[k], want, "{k} in {audit}");
    }
    assert!(v["duration_ms"].is_number(), "{audit}");
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(v["token_fp"].as_str().unwrap().len(), 8);
    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));

    // `--log-format text` overrides the file.
    let mut child = serve(&path, &["--log-format", "text"]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Running(child);
    let (line, _) = read_until(stderr, "payroc-broker serving").await;
    assert!(serde_json::from_str::<Value>(&line).is_err(), "{line}");
    assert!(line.contains(" INFO "), "{line}");
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    // Served (so the signal handlers are installed too).
    let mut c = TokenBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.get_bearer_token(bearer_request("1234001")).await.unwrap();
    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
}

#[cfg(feature = "sandbox")]
#[tokio::test]
async fn the_sandbox_takes_log_format_json() {
    let mut child = Command::new(BIN)
        .args(["sandbox", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Running(child);
    let (line, _) = read_until(stderr, "payroc-broker serving").await;
    let v: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["message"], "payroc-broker serving");
    let mut c = TokenBrokerClient::connect(format!("http://{}", v["addr"].as_str().unwrap()))
        .await
        .unwrap();
    c.get_bearer_token(bearer_request("1234001")).await.unwrap();
    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
}
