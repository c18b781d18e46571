//! Test harness: a real broker on an ephemeral loopback port, in front of the
//! simulated Payroc on another, called through generated tonic stubs.

#![allow(dead_code)] // each test binary uses a different part

pub mod pki;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use payroc_broker::{
    app::server::{self, ServeError},
    clock::{Clock, OsEntropy, SharedEntropy},
    config::Config,
    proto::{
        CreateSessionRequest, GetBearerTokenRequest, Scenario,
        token_broker_client::TokenBrokerClient,
    },
};
use payroc_sim::{SimAccount, SimConfig, SimEndpoint, SimPayroc};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::{ErrorDetails, StatusExt};

pub const KEY_ACME: &str = "acme-api-key-0f3b9c2e71";
pub const KEY_GLOBEX: &str = "globex-api-key-8d1e4a55c0";
pub const CALLER_WEB: &str = "caller-web-token-4c1d2e9a";
pub const CALLER_OPS: &str = "caller-ops-token-77b0e1f3";
pub const CALLER_ALL_ACME: &str = "caller-all-acme-token-5e0c71";

/// `[[callers]]` TOML for [`Options::callers`]: `web` (token [`CALLER_WEB`]),
/// allowed every RPC on every terminal, then the file's own callers. A macro
/// because `Options::callers` is a `&'static str` and `concat!` takes only
/// literals.
#[allow(unused_macros)] // not every test file uses it
macro_rules! callers_with_web {
    ($($more:literal)?) => {
        concat!(
            r#"
    [[callers]]
    name = "web"
    token_env = "CALLER_WEB"
    terminals = ["*"]
    rpcs = ["*"]
"#,
            $($more)?
        )
    };
}
#[allow(unused_imports)]
pub(crate) use callers_with_web;

/// Where a test's log subscriber writes: every line, kept for reading.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[allow(dead_code)] // not every test file reads its logs back
impl LogBuffer {
    /// What was written so far (lossy where a line is not UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// What a test changes about the standard setup.
#[derive(Default, Clone)]
pub struct Options {
    /// Extra lines in `[payroc]`.
    pub payroc: &'static str,
    /// `[[callers]]` tables (empty: open mode).
    pub callers: &'static str,
    /// Extra `[[credentials]]` tables.
    pub credentials: &'static str,
    /// No warm start: first tokens are fetched on demand (the first fetches
    /// are put off by up to a day), for tests of the on-demand path.
    pub cold: bool,
    /// Extra lines in `[server]`.
    pub server: &'static str,
    /// `expires_in` of the simulator's tokens in seconds (0: Payroc's 3600).
    pub token_lifetime: u64,
    /// Serve `globex` with its rotated key (KEY_GLOBEX_NEW).
    pub rotate_globex: bool,
    /// Leave out the `revoked` credential.
    pub drop_revoked: bool,
    /// Latency of the simulator's identity service from the start, in ms.
    pub identity_latency_ms: u64,
    /// `[ext_authz] enabled = true`.
    pub ext_authz: bool,
    /// `payroc.api_url` (empty: the simulator's). Bearer tokens come from
    /// the simulator's identity service either way.
    pub api_url: &'static str,
    /// Serve `/metrics` on an ephemeral port ([`Harness::scrape`]).
    pub metrics: bool,
    /// `[identity_endpoint]` on an ephemeral port ([`Harness::identity_addr`]).
    pub identity_endpoint: bool,
    /// Lines of a `[telemetry]` section (empty: none).
    pub telemetry: String,
}

pub const KEY_REVOKED: &str = "revoked-api-key-000000";
/// globex's rotated key; Payroc accepts both.
pub const KEY_GLOBEX_NEW: &str = "globex-api-key-rotated-77e1";

/// Standard setup:
/// - Payroc account A (KEY_ACME) covers 1234001, 1234002.
/// - Payroc account B (KEY_GLOBEX) covers 5678001, 5678002.
/// - Broker credential `acme` (KEY_ACME): 1234001, 1234002, plus 5678002
///   (Payroc answers 403: B's terminal) and 4444001 (Payroc answers 404).
/// - Broker credential `globex` (KEY_GLOBEX): 5678001.
/// - Broker credential `revoked` (a key Payroc does not know): 7777001.
pub struct Harness {
    pub sim: SimPayroc,
    pub addr: SocketAddr,
    pub client: TokenBrokerClient<Channel>,
    pub channel: Channel,
    /// Where `/metrics` is served, with [`Options::metrics`].
    pub metrics_addr: Option<SocketAddr>,
    /// Where the identity endpoint is served, with [`Options::identity_endpoint`].
    pub identity_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServeError>>>,
    reload: mpsc::Sender<Config>,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with(Options::default()).await
    }

    /// No warm start: first tokens are fetched on demand.
    pub async fn cold() -> Harness {
        Self::with(Options {
            cold: true,
            ..Options::default()
        })
        .await
    }

    pub async fn with(opts: Options) -> Harness {
        let sim = start_sim(&opts).await;
        let config = config_for(&sim, &opts);
        let clock = Clock::system();
        let entropy: SharedEntropy = Arc::new(OsEntropy);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = match opts.metrics {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
        let identity = match opts.identity_endpoint {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let identity_addr = identity.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let (reload, reloads) = mpsc::channel::<Config>(1);
        let server = tokio::spawn(async move {
            server::serve_on(
                server::Listeners {
                    grpc: listener,
                    metrics,
                    identity,
                },
                &config,
                clock,
                entropy,
                async {
                    let _ = stopped.await;
                },
                ReceiverStream::new(reloads),
            )
            .await
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("broker accepts connections");
        if !opts.cold {
            // Ready once warm: every credential's first fetch is done.
            wait_for_health(&channel, "", ServingStatus::Serving).await;
        }
        Harness {
            sim,
            addr,
            client: TokenBrokerClient::new(channel.clone()),
            channel,
            metrics_addr,
            identity_addr,
            stop: Some(stop),
            server: Some(server),
            reload,
        }
    }

    /// Applies a new configuration (the standard one with `opts`), as SIGHUP
    /// would after validating the file.
    pub async fn reload(&self, opts: &Options) {
        self.reload.send(config_for(&self.sim, opts)).await.unwrap();
    }

    /// The `/metrics` page (needs [`Options::metrics`]).
    pub async fn scrape(&self) -> String {
        let addr = self.metrics_addr.expect("Options::metrics is set");
        let resp = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("metrics are served");
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// Begins graceful shutdown, as SIGTERM would.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        let server = self.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops within the grace period")
            .unwrap()
    }

    pub async fn bearer(
        &self,
        terminal: &str,
    ) -> Result<payroc_broker::proto::GetBearerTokenResponse, Status> {
        self.client
            .clone()
            .get_bearer_token(GetBearerTokenRequest {
                processing_terminal_id: terminal.into(),
                min_validity: None,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// GetBearerToken with `min_validity` in whole seconds.
    pub async fn bearer_min(
        &self,
        terminal: &str,
        seconds: i64,
    ) -> Result<payroc_broker::proto::GetBearerTokenResponse, Status> {
        self.client
            .clone()
            .get_bearer_token(GetBearerTokenRequest {
                processing_terminal_id: terminal.into(),
                min_validity: Some(prost_types::Duration { seconds, nanos: 0 }),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn session(
        &self,
        req: CreateSessionRequest,
    ) -> Result<payroc_broker::proto::CreateSessionResponse, Status> {
        self.client
            .clone()
            .create_session(req)
            .await
            .map(tonic::Response::into_inner)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// The simulated Payroc of the standard setup (see [`Harness`]).
pub async fn start_sim(opts: &Options) -> SimPayroc {
    let clock = Clock::system();
    let entropy: SharedEntropy = Arc::new(OsEntropy);
    let mut sim_config = SimConfig::new(
        clock,
        entropy,
        vec![
            SimAccount::new(KEY_ACME, &["1234001", "1234002"]),
            SimAccount::new(KEY_GLOBEX, &["5678001", "5678002"]),
            SimAccount::new(KEY_GLOBEX_NEW, &["5678001", "5678002"]),
        ],
    );
    if opts.token_lifetime > 0 {
        sim_config.token_lifetime = Duration::from_secs(opts.token_lifetime);
    }
    let sim = SimPayroc::start(sim_config)
        .await
        .expect("simulator starts");
    sim.faults().set_latency(
        SimEndpoint::Identity,
        Duration::from_millis(opts.identity_latency_ms),
    );
    sim
}

/// A broker serving `config` on an ephemeral loopback port, no client yet
/// (for tests that connect their own way: TLS, raw sockets).
pub struct Served {
    pub addr: SocketAddr,
    /// The identity endpoint, when the configuration has `[identity_endpoint]`
    /// (served on an ephemeral loopback port, whatever its `listen`).
    pub identity_addr: Option<SocketAddr>,
    pub stop: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<Result<(), ServeError>>>,
    /// Sends a configuration as SIGHUP would after validating it.
    pub reload: mpsc::Sender<Config>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn serve(config: Config) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = match config.identity_endpoint {
        Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        None => None,
    };
    let identity_addr = identity.as_ref().map(|l| l.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let (reload, reloads) = mpsc::channel::<Config>(1);
    let server = tokio::spawn(async move {
        server::serve_on(
            server::Listeners {
                grpc: listener,
                metrics: None,
                identity,
            },
            &config,
            Clock::system(),
            Arc::new(OsEntropy),
            async {
                let _ = stopped.await;
            },
            ReceiverStream::new(reloads),
        )
        .await
    });
    Served {
        addr,
        identity_addr,
        stop: Some(stop),
        server: Some(server),
        reload,
    }
}

/// The standard configuration (see [`Harness`]) pointing at `sim`.
pub fn config_for(sim: &SimPayroc, opts: &Options) -> Config {
    let text = format!(
        r#"
        [server]
        shutdown_grace = "5s"
        {warm_start_timeout}
        {server}
        [payroc]
        identity_url = "{identity}"
        api_url = "{api}"
        request_timeout = "2s"
        warm_start_spread = "{spread}"
        {extra}
        [ext_authz]
        enabled = {ext_authz}
        {identity_endpoint}
        {telemetry}
        [[credentials]]
        name = "acme"
        api_key_env = "KEY_ACME"
        terminals = ["1234001", "1234002", "5678002", "4444001"]
        [[credentials]]
        name = "globex"
        api_key_env = "{globex_key}"
        terminals = ["5678001"]
        {revoked}
        {credentials}
        {callers}
        "#,
        identity = sim.identity_url(),
        api = if opts.api_url.is_empty() {
            sim.api_url()
        } else {
            opts.api_url.to_owned()
        },
        ext_authz = opts.ext_authz,
        identity_endpoint = if opts.identity_endpoint {
            "[identity_endpoint]\nlisten = \"127.0.0.1:0\""
        } else {
            ""
        },
        telemetry = if opts.telemetry.is_empty() {
            String::new()
        } else {
            format!("[telemetry]\n{}", opts.telemetry)
        },
        extra = opts.payroc,
        callers = opts.callers,
        credentials = opts.credentials,
        server = opts.server,
        globex_key = if opts.rotate_globex {
            "KEY_GLOBEX_NEW"
        } else {
            "KEY_GLOBEX"
        },
        revoked = if opts.drop_revoked {
            ""
        } else {
            "[[credentials]]\nname = \"revoked\"\napi_key_env = \"KEY_REVOKED\"\nterminals = [\"7777001\"]"
        },
        spread = if opts.cold { "24h" } else { "0s" },
        warm_start_timeout = if opts.server.contains("warm_start_timeout") {
            ""
        } else if opts.cold {
            "warm_start_timeout = \"0s\""
        } else {
            "warm_start_timeout = \"10s\""
        },
    );
    let env = |name: &str| {
        Some(
            match name {
                "KEY_ACME" => KEY_ACME,
                "KEY_GLOBEX" => KEY_GLOBEX,
                "KEY_GLOBEX_NEW" => KEY_GLOBEX_NEW,
                "KEY_REVOKED" => KEY_REVOKED,
                "CALLER_WEB" => CALLER_WEB,
                "CALLER_OPS" => CALLER_OPS,
                "CALLER_ALL_ACME" => CALLER_ALL_ACME,
                _ => return None,
            }
            .to_owned(),
        )
    };
    Config::parse(&text, Path::new("test.toml"), Path::new("."), &env)
        .unwrap_or_else(|e| panic!("test config is valid:\n{e}"))
}

/// Waits (at most 10 s) until the health service reports `status` for `service`.
pub async fn wait_for_health(channel: &Channel, service: &str, status: ServingStatus) {
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(r)) = watch.next().await {
            if r.status() == status {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "health of {service:?} never became {status:?}"
    );
}

/// A CreateSession request for a terminal with the payment scenario.
/// `msg` carrying the caller token as `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// GetBearerToken for `terminal`, with no `min_validity`.
pub fn bearer_request(terminal: &str) -> GetBearerTokenRequest {
    GetBearerTokenRequest {
        processing_terminal_id: terminal.into(),
        min_validity: None,
    }
}

pub fn payment(terminal: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        processing_terminal_id: terminal.into(),
        scenario: Scenario::Payment as i32,
        ..Default::default()
    }
}

/// Asserts the status code and returns the rich details.
#[track_caller]
pub fn expect_code(status: Status, code: Code) -> (Status, ErrorDetails) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let details = status.get_error_details();
    (status, details)
}

/// The fields named by a BadRequest detail.
pub fn violated_fields(details: &ErrorDetails) -> Vec<String> {
    details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Polls `check` until it holds, failing after 10 s. Each check is a real
/// exchange with the server, which paces the loop.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}

/// The health status of `service`, or the gRPC code when there is none.
pub async fn health_of(channel: &Channel, service: &str) -> Result<ServingStatus, Code> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .map_err(|s| s.code())
}
