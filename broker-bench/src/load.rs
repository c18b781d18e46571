//! Load generation over loopback gRPC: closed loops (a fixed number of calls
//! in flight, for throughput), a paced open loop (a fixed arrival rate, for
//! latency below saturation), and one burst (every call at once).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use payroc_broker::proto::{
    CreateSessionRequest, GetBearerTokenRequest, Scenario,
    envoy::service::auth::v3::{
        AttributeContext, CheckRequest,
        attribute_context::{HttpRequest, Request as AttrRequest},
        authorization_client::AuthorizationClient,
    },
    token_broker_client::TokenBrokerClient,
};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::stats::Sample;

/// Which RPC a load phase sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `grpc.health.v1.Health/Check` on the same server: the ceiling.
    Noop,
    /// `GetBearerToken`, answered from the cache.
    Bearer,
    /// `CreateSession`, answered by the simulator after its latency.
    Session,
    /// `POST /credentials/{credential}/authorize` on the identity endpoint,
    /// over HTTP/2 with `x-api-key`, answered from the same cache.
    Authorize,
    /// `envoy.service.auth.v3.Authorization/Check` for a request to Payroc's
    /// API, allowed with the cached token.
    ExtAuthz,
}

/// Where calls go and what they carry.
#[derive(Clone)]
pub struct Target {
    channels: Vec<Channel>,
    /// One HTTP/2 client per connection, for [`Rpc::Authorize`].
    http: Vec<reqwest::Client>,
    /// `http://<identity endpoint>/credentials/<name>/authorize`.
    authorize_url: Option<Arc<str>>,
    /// The authority of `payroc.api_url`, for [`Rpc::ExtAuthz`].
    api_host: Option<Arc<str>>,
    caller_token: Arc<str>,
    auth: MetadataValue<Ascii>,
    terminals: Arc<[String]>,
    /// Sent as `grpc-timeout`, as production clients do.
    timeout: Duration,
}

impl Target {
    /// `connections` HTTP/2 connections to `addr` (TCP_NODELAY, as the server).
    pub async fn connect(
        addr: SocketAddr,
        connections: usize,
        caller_token: &str,
        terminals: Vec<String>,
    ) -> Target {
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .expect("URL")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("the broker accepts connections");
            channels.push(channel);
        }
        let http = (0..connections.max(1))
            .map(|_| {
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .tcp_nodelay(true)
                    .build()
                    .expect("HTTP client")
            })
            .collect();
        Target {
            channels,
            http,
            authorize_url: None,
            api_host: None,
            caller_token: caller_token.into(),
            auth: format!("Bearer {caller_token}")
                .parse()
                .expect("header value"),
            terminals: terminals.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sends [`Rpc::Authorize`] to the identity endpoint at `addr`, for
    /// credential `name`.
    pub fn with_identity(mut self, addr: SocketAddr, name: &str) -> Target {
        self.authorize_url = Some(format!("http://{addr}/credentials/{name}/authorize").into());
        self
    }

    /// Sends [`Rpc::ExtAuthz`] checks for requests to `api_host` (the
    /// authority of the broker's `payroc.api_url`).
    pub fn with_ext_authz(mut self, api_host: &str) -> Target {
        self.api_host = Some(api_host.into());
        self
    }

    /// A caller bound to connection `i % connections`.
    pub fn caller(&self, i: usize) -> Caller {
        let channel = self.channels[i % self.channels.len()].clone();
        Caller {
            http: self.http[i % self.http.len()].clone(),
            target: self.clone(),
            health: HealthClient::new(channel.clone()),
            ext_authz: AuthorizationClient::new(channel.clone()),
            broker: TokenBrokerClient::new(channel),
        }
    }
}

/// One client stub per task: stubs are cheap, the connection is shared.
#[derive(Clone)]
pub struct Caller {
    target: Target,
    http: reqwest::Client,
    health: HealthClient<Channel>,
    ext_authz: AuthorizationClient<Channel>,
    broker: TokenBrokerClient<Channel>,
}

impl Caller {
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        // The same metadata on every RPC, the health check included, so both
        // sides of a comparison carry the same bytes.
        req.metadata_mut()
            .insert("authorization", self.target.auth.clone());
        req.set_timeout(self.target.timeout);
        req
    }

    /// One call; `n` picks the terminal. Err: the gRPC code's name.
    pub async fn call(&mut self, rpc: Rpc, n: usize) -> Result<(), String> {
        let terminals = &self.target.terminals;
        let terminal = || terminals[n % terminals.len()].clone();
        let outcome = match rpc {
            Rpc::Noop => {
                let req = self.request(HealthCheckRequest {
                    service: String::new(),
                });
                self.health.check(req).await.map(drop)
            }
            Rpc::Bearer => {
                let req = self.request(GetBearerTokenRequest {
                    processing_terminal_id: terminal(),
                    min_validity: None,
                });
                self.broker.get_bearer_token(req).await.map(drop)
            }
            Rpc::Session => {
                let req = self.request(CreateSessionRequest {
                    processing_terminal_id: terminal(),
                    scenario: Scenario::Payment as i32,
                    ..Default::default()
                });
                self.broker.create_session(req).await.map(drop)
            }
            Rpc::Authorize => return self.authorize().await,
            Rpc::ExtAuthz => {
                let host = self.target.api_host.as_deref().expect("with_ext_authz");
                let req = self.request(CheckRequest {
                    attributes: Some(AttributeContext {
                        request: Some(AttrRequest {
                            http: Some(HttpRequest {
                                method: "POST".into(),
                                host: host.into(),
                                path: format!("/v1/processing-terminals/{}/payments", terminal()),
                                scheme: "https".into(),
                                ..HttpRequest::default()
                            }),
                            ..AttrRequest::default()
                        }),
                        ..AttributeContext::default()
                    }),
                });
                let answer = self
                    .ext_authz
                    .check(req)
                    .await
                    .map_err(|s| format!("{:?}", s.code()))?;
                // A decision is an answer; only OK (code 0) counts as served.
                return match answer.get_ref().status.as_ref().map(|s| s.code) {
                    Some(0) => Ok(()),
                    other => Err(format!("denied {other:?}")),
                };
            }
        };
        outcome.map_err(|s| format!("{:?}", s.code()))
    }

    /// One `/authorize`, as an SDK sends it; the body is read in full, as
    /// an SDK reads the token. Err: the HTTP status (or `transport`).
    async fn authorize(&self) -> Result<(), String> {
        let url = self.target.authorize_url.as_deref().expect("with_identity");
        let answer = self
            .http
            .post(url)
            .header("x-api-key", &*self.target.caller_token)
            .timeout(self.target.timeout)
            .send()
            .await
            .map_err(|_| "transport".to_owned())?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(|_| "transport".to_owned())?;
        if status == reqwest::StatusCode::OK && !body.is_empty() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

/// `concurrency` tasks call back to back for `warmup` (not counted), then
/// `window`; only calls that start and finish inside the window count.
pub async fn closed_loop(
    target: &Target,
    rpc: Rpc,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
) -> Sample {
    let phase = Arc::new(AtomicU8::new(WARMING));
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut caller = target.caller(i);
        let phase = Arc::clone(&phase);
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            let mut n = i;
            loop {
                let at_start = phase.load(Ordering::Relaxed);
                if at_start == STOPPED {
                    break;
                }
                let t0 = Instant::now();
                let outcome = caller.call(rpc, n).await;
                let elapsed = t0.elapsed();
                n += concurrency;
                if at_start == MEASURING && phase.load(Ordering::Relaxed) == MEASURING {
                    match outcome {
                        Ok(()) => sample.latencies_ns.push(elapsed.as_nanos() as u64),
                        Err(code) => *sample.errors.entry(code).or_default() += 1,
                    }
                }
            }
            sample
        }));
    }
    tokio::time::sleep(warmup).await;
    phase.store(MEASURING, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    phase.store(STOPPED, Ordering::Relaxed);
    let measured = t0.elapsed().as_secs_f64();
    let mut total = Sample::default();
    for t in tasks {
        total.merge(t.await.expect("load task"));
    }
    total.window = measured;
    total
}

/// Calls arrive at `rate` per second for `warmup` + `window`, whatever the
/// answers do (an open loop); each call's latency is measured from its start.
/// A thread paces arrivals every 100 µs: tokio's timer ticks in whole
/// milliseconds and would send them in bursts.
pub async fn paced(
    target: &Target,
    rpc: Rpc,
    rate: f64,
    warmup: Duration,
    window: Duration,
) -> Sample {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let total = warmup + window;
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= total {
                break;
            }
            let due = (elapsed.as_secs_f64() * rate) as u64;
            let counted = elapsed >= warmup;
            while sent < due {
                if tx.send(counted).is_err() {
                    return;
                }
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    });
    let results = Arc::new(Mutex::new(Sample::default()));
    let callers: Vec<Caller> = (0..target.channels.len())
        .map(|i| target.caller(i))
        .collect();
    let mut measured_from = None;
    let mut n = 0usize;
    let mut tasks = Vec::new();
    while let Some(counted) = rx.recv().await {
        if counted && measured_from.is_none() {
            measured_from = Some(Instant::now());
        }
        n += 1;
        // Stubs are cheap to clone and clones share the connection.
        let mut caller = callers[n % callers.len()].clone();
        let results = Arc::clone(&results);
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let outcome = caller.call(rpc, n).await;
            let elapsed = t0.elapsed();
            if counted {
                let mut r = results.lock().unwrap();
                match outcome {
                    Ok(()) => r.latencies_ns.push(elapsed.as_nanos() as u64),
                    Err(code) => *r.errors.entry(code).or_default() += 1,
                }
            }
        }));
    }
    let window = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    pacer.join().expect("pacer");
    for t in tasks {
        t.await.expect("call task");
    }
    let mut sample = std::mem::take(&mut *results.lock().unwrap());
    sample.window = window;
    sample
}

/// `calls` calls, all started at once (each waits on one gate), over the
/// target's connections; returns the sample and how long until the last answer.
pub async fn burst(target: &Target, rpc: Rpc, calls: usize) -> (Sample, Duration) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        let mut caller = target.caller(i);
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            gate.acquire().await.expect("gate").forget();
            let t0 = Instant::now();
            let outcome = caller.call(rpc, i).await;
            (outcome, t0.elapsed())
        }));
    }
    // Let every task reach the gate before it opens.
    tokio::task::yield_now().await;
    let start = Instant::now();
    gate.add_permits(calls);
    let mut sample = Sample::default();
    for t in tasks {
        match t.await.expect("burst task") {
            (Ok(()), elapsed) => sample.latencies_ns.push(elapsed.as_nanos() as u64),
            (Err(code), _) => *sample.errors.entry(code).or_default() += 1,
        }
    }
    let took = start.elapsed();
    sample.window = took.as_secs_f64();
    (sample, took)
}

/// Every terminal once per pass, `concurrency` calls in flight.
pub async fn sweep(target: &Target, rpc: Rpc, calls: usize, concurrency: usize) -> Sample {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut caller = target.caller(i);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= calls {
                    break;
                }
                let t0 = Instant::now();
                match caller.call(rpc, n).await {
                    Ok(()) => sample.latencies_ns.push(t0.elapsed().as_nanos() as u64),
                    Err(code) => *sample.errors.entry(code).or_default() += 1,
                }
            }
            sample
        }));
    }
    let mut total = Sample::default();
    for t in tasks {
        total.merge(t.await.expect("sweep task"));
    }
    total.window = start.elapsed().as_secs_f64();
    total
}
