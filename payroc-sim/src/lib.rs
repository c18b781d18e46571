//! A faithful fake of Payroc's two endpoints, served over real loopback HTTP.
//!
//! Sandbox mode and the integration tests point the broker at this server
//! instead of Payroc. It is not a mock that answers whatever it is told: it
//! enforces the contract in `payroc-api.md` the way Payroc does, so a broker
//! bug shows up here rather than in UAT:
//!
//! - `POST /authorize` wants a configured `x-api-key` and issues Bearer tokens
//!   that expire on the injected [`Clock`] and can be revoked early.
//! - `POST /v1/processing-terminals/{id}/hosted-fields-sessions` checks, in
//!   order: the Bearer token, `Accept`, `Content-Type`, body size,
//!   `Idempotency-Key` (a UUID v4), the body (`libVersion` pattern, `scenario`,
//!   `secureTokenId`, terminal id length), that the token's account covers the
//!   terminal, then idempotency (same key + URI + body replays the original
//!   201; a reused key with another request is a 409).
//! - Every error is RFC 7807 `application/problem+json` with Payroc's `type`
//!   anchors, and never echoes a token or a key.
//!
//! [`Faults`] injects what the real upstream does on a bad day (error
//! statuses, `Retry-After`, latency, malformed JSON, a connection reset
//! mid-body, a missing `expiresAt`), and [`SimPayroc::sessions`] records what
//! the broker actually sent.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
    serve::ListenerExt,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, time::Instant};

use broker_clock::{Clock, SharedEntropy, civil_from_days};

/// Payroc's documented limit on the sessions request body.
const MAX_BODY: usize = 16 * 1024;
/// How much of an oversized body is still read, so it can be recorded.
const READ_LIMIT: usize = 1024 * 1024;
/// Session tokens live 10 minutes (Payroc's documentation).
const SESSION_LIFETIME: Duration = Duration::from_secs(600);
/// A non-UTC offset for `expiresAt`, so the client must really parse offsets.
const EXPIRES_AT_OFFSET_SECS: i64 = 2 * 3600;
const ERRORS_URI: &str = "https://docs.payroc.com/api/errors#";

/// How the simulator is set up.
#[derive(Clone)]
pub struct SimConfig {
    pub clock: Clock,
    pub entropy: SharedEntropy,
    /// API key -> terminals it covers.
    pub accounts: Vec<SimAccount>,
    /// expires_in of issued Bearer tokens (Payroc: 3600 s).
    pub token_lifetime: Duration,
    /// `scope` of issued tokens, e.g. "hosted_fields payments".
    pub scope: String,
    /// What the simulator remembers, so that a sandbox can run for days.
    pub limits: SimLimits,
    /// Waits out injected latency instead of tokio's timer, which rounds up
    /// to its millisecond tick: benchmarks plug in a finer one so that
    /// "latency minus L" measures the broker, not the simulator's clock.
    pub pause: Option<Pause>,
}

/// A wait of the given length (see [`SimConfig::pause`]).
pub type Pause = Arc<
    dyn Fn(Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

impl SimConfig {
    pub fn new(clock: Clock, entropy: SharedEntropy, accounts: Vec<SimAccount>) -> Self {
        Self {
            clock,
            entropy,
            accounts,
            token_lifetime: Duration::from_secs(3600),
            scope: "hosted_fields payments".to_owned(),
            limits: SimLimits::default(),
            pause: None,
        }
    }
}

/// Bounds on what the simulator keeps. Without them a sandbox that created
/// 60,000 sessions grew from 10 MB to 355 MB: every record and idempotency
/// entry was kept for ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimLimits {
    /// Recent sessions requests kept for [`SimPayroc::sessions`] (a ring:
    /// the oldest goes first).
    pub session_records: usize,
    /// How long an Idempotency-Key is remembered, on the simulator's clock.
    pub idempotency_ttl: Duration,
    /// Idempotency entries kept at most; past it the oldest is forgotten
    /// early (only a sandbox under sustained load gets there).
    pub idempotency_entries: usize,
    /// Distinct presented API keys counted for
    /// [`SimPayroc::identity_requests`]; the accounts' own keys always are.
    pub counted_keys: usize,
}

impl Default for SimLimits {
    fn default() -> Self {
        Self {
            session_records: 1024,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_entries: 50_000,
            counted_keys: 1024,
        }
    }
}

/// One Payroc API key and the processing terminals it covers.
#[derive(Clone, Debug)]
pub struct SimAccount {
    pub api_key: String,
    pub terminals: Vec<String>,
}

impl SimAccount {
    pub fn new(api_key: &str, terminals: &[&str]) -> Self {
        Self {
            api_key: api_key.to_owned(),
            terminals: terminals.iter().map(|t| (*t).to_owned()).collect(),
        }
    }
}

/// Which of the two upstream endpoints a fault or latency applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimEndpoint {
    Identity,
    Sessions,
}

/// One injected answer that replaces the real one.
#[derive(Clone, Debug)]
pub struct Fault {
    /// HTTP status; 0 stands for the endpoint's own success status (200 for
    /// identity, 201 for sessions), so one fault fits either endpoint.
    pub status: u16,
    pub retry_after: Option<String>,
    pub delay: Duration,
    pub body: FaultBody,
}

#[derive(Clone, Debug)]
pub enum FaultBody {
    /// problem+json with the `type` anchor matching the status.
    Problem,
    /// `{not json` labelled `application/json`.
    Malformed,
    Empty,
    /// Headers, a first chunk, then a broken connection.
    Reset,
}

impl Fault {
    pub fn status(code: u16) -> Self {
        Self {
            status: code,
            retry_after: None,
            delay: Duration::ZERO,
            body: FaultBody::Problem,
        }
    }

    pub fn with_retry_after(mut self, value: &str) -> Self {
        self.retry_after = Some(value.to_owned());
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn with_body(mut self, body: FaultBody) -> Self {
        self.body = body;
        self
    }

    /// The endpoint's success status with a body that is not JSON.
    pub fn malformed() -> Self {
        Self::status(0).with_body(FaultBody::Malformed)
    }

    /// The endpoint's success status, then the connection breaks mid-body.
    pub fn reset() -> Self {
        Self::status(0).with_body(FaultBody::Reset)
    }

    fn respond(&self, success: StatusCode) -> Response {
        let status = match self.status {
            0 => success,
            code => StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        let mut response = match self.body {
            FaultBody::Problem => {
                Problem::new(status.as_u16(), anchor_for(status), "injected fault").into_response()
            }
            FaultBody::Malformed => {
                ([(header::CONTENT_TYPE, "application/json")], "{not json").into_response()
            }
            FaultBody::Empty => Body::empty().into_response(),
            FaultBody::Reset => {
                let chunks: [Result<Bytes, std::io::Error>; 2] = [
                    Ok(Bytes::from_static(b"{\"partial\":")),
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "sim: injected reset",
                    )),
                ];
                let body = Body::from_stream(futures_util::stream::iter(chunks));
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
        };
        *response.status_mut() = status;
        if let Some(value) = self
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// The fault switches of a running simulator.
#[derive(Default)]
pub struct Faults {
    table: Mutex<FaultTable>,
}

#[derive(Default)]
struct FaultTable {
    endpoints: [EndpointFaults; 2],
    omit_expires_at: bool,
    expires_in: Option<u64>,
}

#[derive(Default)]
struct EndpointFaults {
    queue: VecDeque<Fault>,
    always: Option<Fault>,
    latency: Duration,
}

impl FaultTable {
    fn endpoint(&mut self, endpoint: SimEndpoint) -> &mut EndpointFaults {
        &mut self.endpoints[endpoint as usize]
    }
}

impl Faults {
    /// The next `times` requests to `endpoint` get `fault` (FIFO with earlier pushes).
    pub fn push(&self, endpoint: SimEndpoint, fault: Fault, times: usize) {
        let mut table = lock(&self.table);
        let queue = &mut table.endpoint(endpoint).queue;
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Every request once the queue is empty gets `fault`, until cleared.
    pub fn always(&self, endpoint: SimEndpoint, fault: Option<Fault>) {
        lock(&self.table).endpoint(endpoint).always = fault;
    }

    /// Added before every answer of `endpoint`, faulted or not.
    pub fn set_latency(&self, endpoint: SimEndpoint, latency: Duration) {
        lock(&self.table).endpoint(endpoint).latency = latency;
    }

    /// Sessions 201s leave out `expiresAt` (the SDKs treat it as optional).
    pub fn omit_expires_at(&self, yes: bool) {
        lock(&self.table).omit_expires_at = yes;
    }

    /// Identity answers claim this `expires_in` (e.g. `u64::MAX`), whatever
    /// the token really lives; `None` tells the truth again.
    pub fn announce_expires_in(&self, seconds: Option<u64>) {
        lock(&self.table).expires_in = seconds;
    }

    pub fn clear(&self) {
        *lock(&self.table) = FaultTable::default();
    }

    /// The fault for the next request, and how long to wait before answering.
    fn take(&self, endpoint: SimEndpoint) -> (Option<Fault>, Duration) {
        let mut table = lock(&self.table);
        let faults = table.endpoint(endpoint);
        let fault = faults.queue.pop_front().or_else(|| faults.always.clone());
        let delay = faults.latency + fault.as_ref().map_or(Duration::ZERO, |f| f.delay);
        (fault, delay)
    }
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Every request that reached the identity handler, faulted ones included.
    pub identity_requests: u64,
    /// Every request that reached the sessions handler, faulted ones included.
    pub session_requests: u64,
    /// Sessions actually created (idempotent replays excluded).
    pub sessions_created: u64,
    /// When the last Bearer token was issued (benchmarks time deliveries
    /// from it).
    pub last_token_issued_at: Option<Instant>,
}

/// One sessions request as received, and what it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub terminal: String,
    pub idempotency_key: Option<String>,
    /// The Bearer token (the raw header value if the scheme is not Bearer).
    pub authorization_token: Option<String>,
    pub body: String,
    /// 0 while unanswered (or if the client went away first).
    pub status: u16,
    /// When it arrived, on the simulator's clock.
    pub received_at: Instant,
}

/// How much the simulator holds right now (see [`SimLimits`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimHeld {
    pub session_records: usize,
    pub idempotency_entries: usize,
    pub issued_tokens: usize,
    pub counted_keys: usize,
}

/// A running simulator. Cloning is cheap; the server stops on
/// [`SimPayroc::shutdown`] or when the last clone is dropped.
#[derive(Clone)]
pub struct SimPayroc {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    sim: Arc<Sim>,
    // Dropping the sender (with the last handle) also fires the shutdown.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl SimPayroc {
    /// Serves on an ephemeral loopback port.
    pub async fn start(config: SimConfig) -> std::io::Result<SimPayroc> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(listener, config).await
    }

    pub async fn start_on(listener: TcpListener, config: SimConfig) -> std::io::Result<SimPayroc> {
        let addr = listener.local_addr()?;
        let sim = Arc::new(Sim::new(config));
        // Counted so benchmarks can show the broker pools and reuses its
        // upstream connections; no delay on small writes, as a real server.
        let listener = listener.tap_io({
            let sim = Arc::clone(&sim);
            move |tcp| {
                sim.connections.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
            }
        });
        let router = Router::new()
            .route("/authorize", post(authorize))
            .route(
                "/v1/processing-terminals/{processingTerminalId}/hosted-fields-sessions",
                post(create_session),
            )
            .fallback(|| async { Problem::new(404, "not-found", "no such resource") })
            .with_state(Arc::clone(&sim));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // Graceful: the listener closes at once, idle keep-alive
            // connections are closed, in-flight requests finish.
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "simulated Payroc stopped");
            }
        });
        Ok(SimPayroc {
            inner: Arc::new(Inner {
                addr,
                sim,
                stop: Mutex::new(Some(stop)),
            }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn identity_url(&self) -> String {
        format!("http://{}/authorize", self.inner.addr)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/v1", self.inner.addr)
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.sim.faults
    }

    pub fn stats(&self) -> SimStats {
        lock(&self.inner.sim.books).stats
    }

    /// TCP connections accepted since start, on either endpoint.
    pub fn connections_accepted(&self) -> u64 {
        self.inner.sim.connections.load(Ordering::Relaxed)
    }

    /// Identity requests that presented `api_key`, faulted ones included.
    pub fn identity_requests(&self, api_key: &str) -> u64 {
        lock(&self.inner.sim.books)
            .identity_by_key
            .get(api_key)
            .copied()
            .unwrap_or(0)
    }

    /// The `traceparent` headers received (the latest [`MAX_TRACEPARENTS`]),
    /// oldest first, with the endpoint each came to.
    pub fn traceparents(&self) -> Vec<(SimEndpoint, String)> {
        lock(&self.inner.sim.books)
            .traceparents
            .iter()
            .cloned()
            .collect()
    }

    /// The most recent sessions requests (at most
    /// [`SimLimits::session_records`]), oldest first.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        let books = lock(&self.inner.sim.books);
        books.sessions.iter().map(|(_, r)| r.clone()).collect()
    }

    /// How much the simulator holds now.
    pub fn held(&self) -> SimHeld {
        self.inner.sim.held()
    }

    /// Every Bearer token issued so far is refused from now on (401).
    pub fn revoke_tokens(&self) {
        for token in lock(&self.inner.sim.books).tokens.values_mut() {
            token.revoked = true;
        }
    }

    /// Applies to tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *lock(&self.inner.sim.token_lifetime) = lifetime;
    }

    pub fn shutdown(&self) {
        if let Some(stop) = lock(&self.inner.stop).take() {
            let _ = stop.send(());
        }
    }
}

struct Sim {
    config: SimConfig,
    token_lifetime: Mutex<Duration>,
    faults: Faults,
    books: Mutex<Books>,
    /// TCP connections accepted.
    connections: AtomicU64,
}

impl Sim {
    fn new(config: SimConfig) -> Self {
        Sim {
            token_lifetime: Mutex::new(config.token_lifetime),
            config,
            faults: Faults::default(),
            books: Mutex::default(),
            connections: AtomicU64::new(0),
        }
    }

    fn held(&self) -> SimHeld {
        let books = lock(&self.books);
        SimHeld {
            session_records: books.sessions.len(),
            idempotency_entries: books.idempotency.len(),
            issued_tokens: books.tokens.len(),
            counted_keys: books.identity_by_key.len(),
        }
    }
}

#[derive(Default)]
struct Books {
    stats: SimStats,
    /// Identity requests per presented `x-api-key` (absent header: ""), for
    /// the accounts' keys and the first `counted_keys` others.
    identity_by_key: HashMap<String, u64>,
    /// The recent sessions requests, each with its sequence number.
    sessions: VecDeque<(u64, SessionRecord)>,
    next_session: u64,
    tokens: HashMap<String, IssuedToken>,
    /// Issued tokens are swept for expired ones when there are this many.
    tokens_sweep_at: usize,
    /// (account, Idempotency-Key) -> the request it was first used with.
    idempotency: HashMap<IdempotencyKey, StoredSession>,
    /// The same keys, oldest first, to expire them in order.
    idempotency_order: VecDeque<(Instant, IdempotencyKey)>,
    /// `traceparent` headers received, the latest only.
    traceparents: VecDeque<(SimEndpoint, String)>,
}

/// How many `traceparent` headers the simulator remembers.
pub const MAX_TRACEPARENTS: usize = 1000;

impl Books {
    fn traceparent(&mut self, endpoint: SimEndpoint, headers: &HeaderMap) {
        if let Some(t) = header_lossy(headers, "traceparent") {
            if self.traceparents.len() == MAX_TRACEPARENTS {
                self.traceparents.pop_front();
            }
            self.traceparents.push_back((endpoint, t));
        }
    }
}

type IdempotencyKey = (usize, String);

impl Books {
    /// Forgets Idempotency-Keys older than the TTL. Each entry is queued
    /// once, in the order stored, so this is amortised O(1) per session.
    fn expire_idempotency(&mut self, now: Instant, ttl: Duration) {
        while let Some((stored_at, _)) = self.idempotency_order.front() {
            if now.saturating_duration_since(*stored_at) < ttl {
                break;
            }
            self.forget_oldest_idempotency_key();
        }
    }

    /// Stores a first use of an Idempotency-Key, forgetting the oldest
    /// first when the cap is reached.
    fn remember_idempotency_key(
        &mut self,
        key: IdempotencyKey,
        stored: StoredSession,
        now: Instant,
        cap: usize,
    ) {
        while self.idempotency.len() >= cap.max(1) && self.forget_oldest_idempotency_key() {}
        self.idempotency.insert(key.clone(), stored);
        self.idempotency_order.push_back((now, key));
    }

    fn forget_oldest_idempotency_key(&mut self) -> bool {
        match self.idempotency_order.pop_front() {
            Some((_, key)) => self.idempotency.remove(&key).is_some(),
            None => false,
        }
    }

    /// Drops expired tokens once there are `tokens_sweep_at` of them, then
    /// waits for twice as many as remain: amortised O(1) per issue.
    fn sweep_tokens(&mut self, now: Instant) {
        if self.tokens.len() < self.tokens_sweep_at.max(MIN_TOKEN_SWEEP) {
            return;
        }
        self.tokens
            .retain(|_, t| t.expires_at.is_none_or(|at| at > now));
        self.tokens_sweep_at = self.tokens.len().saturating_mul(2);
    }

    fn record_session(&mut self, record: SessionRecord, limits: &SimLimits) -> u64 {
        let seq = self.next_session;
        self.next_session += 1;
        if limits.session_records == 0 {
            return seq;
        }
        while self.sessions.len() >= limits.session_records {
            self.sessions.pop_front();
        }
        self.sessions.push_back((seq, record));
        seq
    }

    fn session_answered(&mut self, seq: u64, status: u16) {
        // The record is among the most recent, unless it already left the ring.
        if let Some((_, record)) = self.sessions.iter_mut().rev().find(|(s, _)| *s == seq) {
            record.status = status;
        }
    }
}

/// Below this many issued tokens, none are swept.
const MIN_TOKEN_SWEEP: usize = 1024;

struct IssuedToken {
    account: usize,
    /// `None`: later than the clock can represent, i.e. never.
    expires_at: Option<Instant>,
    revoked: bool,
}

struct StoredSession {
    path: String,
    body: Bytes,
    location: String,
    response: String,
}

impl StoredSession {
    fn respond(&self) -> Response {
        let headers = [
            (header::LOCATION, self.location.clone()),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ];
        (StatusCode::CREATED, headers, self.response.clone()).into_response()
    }
}

async fn authorize(State(sim): State<Arc<Sim>>, headers: HeaderMap) -> Response {
    {
        let mut books = lock(&sim.books);
        books.stats.identity_requests += 1;
        let key = header_lossy(&headers, "x-api-key").unwrap_or_default();
        // Keys nobody configured are counted only up to a limit: a client
        // presenting random keys must not grow the books without end.
        let counted = books.identity_by_key.contains_key(&key)
            || books.identity_by_key.len() < sim.config.limits.counted_keys
            || sim.config.accounts.iter().any(|a| a.api_key == key);
        if counted {
            *books.identity_by_key.entry(key).or_default() += 1;
        }
        books.traceparent(SimEndpoint::Identity, &headers);
    }
    let (fault, delay) = sim.faults.take(SimEndpoint::Identity);
    sim.pause(delay).await;
    match fault {
        Some(fault) => fault.respond(StatusCode::OK),
        None => sim
            .issue_token(&headers)
            .unwrap_or_else(IntoResponse::into_response),
    }
}

async fn create_session(
    State(sim): State<Arc<Sim>>,
    Path(terminal): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = axum::body::to_bytes(body, READ_LIMIT).await.ok();
    let seq = {
        let mut books = lock(&sim.books);
        books.stats.session_requests += 1;
        books.traceparent(SimEndpoint::Sessions, &headers);
        let authorization = header_lossy(&headers, header::AUTHORIZATION.as_str());
        let record = SessionRecord {
            terminal: terminal.clone(),
            idempotency_key: header_lossy(&headers, "idempotency-key"),
            authorization_token: authorization.map(|v| bearer(&v).map_or(v.clone(), str::to_owned)),
            body: body
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
            status: 0,
            received_at: sim.config.clock.now(),
        };
        books.record_session(record, &sim.config.limits)
    };
    let (fault, delay) = sim.faults.take(SimEndpoint::Sessions);
    sim.pause(delay).await;
    let response = match fault {
        Some(fault) => fault.respond(StatusCode::CREATED),
        None => sim
            .session(&terminal, uri.path(), &headers, body)
            .unwrap_or_else(IntoResponse::into_response),
    };
    lock(&sim.books).session_answered(seq, response.status().as_u16());
    response
}

/// Waits `delay`, and not at all when it is zero: a zero sleep still waits
/// for the timer wheel's next tick (about a millisecond), which would be
/// most of the cost of an answer.
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

impl Sim {
    /// [`pause`], or the configured [`SimConfig::pause`] for a nonzero delay.
    async fn pause(&self, delay: Duration) {
        match &self.config.pause {
            Some(wait) if !delay.is_zero() => wait(delay).await,
            _ => pause(delay).await,
        }
    }
}

impl Sim {
    fn issue_token(&self, headers: &HeaderMap) -> Result<Response, Problem> {
        let key = (headers.get("x-api-key"))
            .ok_or_else(|| Problem::unauthorized("the x-api-key header is missing"))?;
        let account = (self.config.accounts.iter())
            .position(|a| a.api_key.as_bytes() == key.as_bytes())
            .ok_or_else(|| Problem::unauthorized("the API key is not recognised"))?;
        let lifetime = *lock(&self.token_lifetime);
        let access_token = format!("sim-at-{}", self.config.entropy.uuid_v4().simple());
        let expires_at = self.config.clock.now().checked_add(lifetime);
        let issued = IssuedToken {
            account,
            expires_at,
            revoked: false,
        };
        let mut books = lock(&self.books);
        books.sweep_tokens(self.config.clock.now());
        books.tokens.insert(access_token.clone(), issued);
        books.stats.last_token_issued_at = Some(self.config.clock.now());
        drop(books);
        // The unknown field proves the client ignores fields it does not know.
        Ok(axum::Json(json!({
            "access_token": access_token,
            "expires_in": lock(&self.faults.table).expires_in.unwrap_or(lifetime.as_secs()),
            "token_type": "Bearer",
            "scope": self.config.scope,
            "extra_unknown_field": true,
        }))
        .into_response())
    }

    fn session(
        &self,
        terminal: &str,
        path: &str,
        headers: &HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Response, Problem> {
        let account = self.authenticate(headers)?;
        check_accept(headers)?;
        check_content_type(headers)?;
        let body = body.filter(|b| b.len() <= MAX_BODY).ok_or_else(|| {
            let detail = format!("the request body exceeds {MAX_BODY} bytes");
            Problem::new(413, "payload-too-large", detail)
        })?;
        let key = idempotency_key(headers)?;
        validate(terminal, &body)?;
        self.check_terminal(account, terminal)?;

        // Check and store under one lock so concurrent retries with one key
        // cannot both create a session.
        let mut books = lock(&self.books);
        let now = self.config.clock.now();
        books.expire_idempotency(now, self.config.limits.idempotency_ttl);
        if let Some(stored) = books.idempotency.get(&(account, key.clone())) {
            if stored.path == path && stored.body == body {
                return Ok(stored.respond());
            }
            let detail = "the Idempotency-Key was already used with a different request";
            return Err(Problem::new(409, "idempotency-key-in-use", detail));
        }
        let token = format!("sim-st-{}", self.config.entropy.uuid_v4().simple());
        let mut response = json!({"processingTerminalId": terminal, "token": token});
        if !lock(&self.faults.table).omit_expires_at {
            let expires_at = self
                .config
                .clock
                .wall(self.config.clock.now() + SESSION_LIFETIME);
            response["expiresAt"] = iso8601(expires_at, EXPIRES_AT_OFFSET_SECS).into();
        }
        let stored = StoredSession {
            path: path.to_owned(),
            body,
            location: format!("{path}/{}", self.config.entropy.uuid_v4()),
            response: response.to_string(),
        };
        let answer = stored.respond();
        let cap = self.config.limits.idempotency_entries;
        books.remember_idempotency_key((account, key), stored, now, cap);
        books.stats.sessions_created += 1;
        Ok(answer)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<usize, Problem> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = (value.and_then(bearer))
            .ok_or_else(|| Problem::unauthorized("a Bearer token is required"))?;
        let books = lock(&self.books);
        let issued = (books.tokens.get(token))
            .ok_or_else(|| Problem::unauthorized("the Bearer token is not recognised"))?;
        if issued.revoked {
            return Err(Problem::unauthorized("the Bearer token was revoked"));
        }
        if issued
            .expires_at
            .is_some_and(|at| at <= self.config.clock.now())
        {
            return Err(Problem::unauthorized("the Bearer token expired"));
        }
        Ok(issued.account)
    }

    fn check_terminal(&self, account: usize, terminal: &str) -> Result<(), Problem> {
        let covers = |a: &SimAccount| a.terminals.iter().any(|t| t == terminal);
        if covers(&self.config.accounts[account]) {
            Ok(())
        } else if self.config.accounts.iter().any(covers) {
            let detail = format!("the API key does not cover processing terminal {terminal}");
            Err(Problem::new(403, "forbidden", detail))
        } else {
            let detail = format!("processing terminal {terminal} does not exist");
            Err(Problem::new(404, "not-found", detail))
        }
    }
}

fn check_accept(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(());
    };
    const JSON: [&str; 4] = [
        "application/json",
        "application/*",
        "*/*",
        "application/problem+json",
    ];
    let acceptable = accept.to_str().is_ok_and(|v| {
        (v.split(',').map(media_type)).any(|m| JSON.iter().any(|ok| m.eq_ignore_ascii_case(ok)))
    });
    if acceptable {
        return Ok(());
    }
    let detail = "the Accept header does not allow application/json";
    Err(Problem::new(406, "not-acceptable", detail))
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type.is_some_and(|v| media_type(v).eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    let detail = "the Content-Type must be application/json";
    Err(Problem::new(415, "unsupported-media-type", detail))
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        let detail = "the Idempotency-Key header is required";
        return Err(Problem::new(400, "idempotency-key-missing", detail));
    };
    let key = value.to_str().unwrap_or("");
    // Only the hyphenated form: `Uuid::try_parse` would also take braces,
    // `urn:uuid:` and the bare hex form.
    let v4 = key.len() == 36
        && uuid::Uuid::try_parse(key)
            .is_ok_and(|u| u.get_version_num() == 4 && u.get_variant() == uuid::Variant::RFC4122);
    match v4 {
        true => Ok(key.to_owned()),
        false => Err(Problem::bad_request().error("Idempotency-Key", "must be a UUID v4")),
    }
}

fn validate(terminal: &str, body: &[u8]) -> Result<(), Problem> {
    let mut problem = Problem::bad_request();
    if !(4..=50).contains(&terminal.chars().count()) {
        problem = problem.error("processingTerminalId", "must be 4 to 50 characters");
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => {
            let text = |name: &str| fields.get(name).map(Value::as_str);
            if !matches!(text("libVersion"), Some(Some(v)) if lib_version_ok(v)) {
                problem = problem.error(
                    "libVersion",
                    r"is required and must match ^\d{1,2}\.\d{1,2}\.\d{1,2}(-beta)?\.\d+$",
                );
            }
            if !matches!(text("scenario"), Some(Some("payment" | "tokenization"))) {
                problem = problem.error(
                    "scenario",
                    "is required and must be payment or tokenization",
                );
            }
            // Strict on purpose: an explicit null is a client bug worth seeing.
            if matches!(text("secureTokenId"), Some(v) if !v.is_some_and(|v| (1..=200).contains(&v.chars().count())))
            {
                problem = problem.error("secureTokenId", "must be 1 to 200 characters");
            }
        }
        _ => problem
            .errors
            .push(json!({"message": "the request body must be a JSON object"})),
    }
    match problem.errors.is_empty() {
        true => Ok(()),
        false => Err(problem),
    }
}

/// `^\d{1,2}\.\d{1,2}\.\d{1,2}(-beta)?\.\d+$`, by hand (no regex dependency).
/// Written independently of the broker's `payroc::is_valid_lib_version` on
/// purpose: a fake that shared the code under test could not catch its bugs.
fn lib_version_ok(version: &str) -> bool {
    let digits =
        |s: &str, max: usize| (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let Some((head, build)) = version.rsplit_once('.') else {
        return false;
    };
    let head = head.strip_suffix("-beta").unwrap_or(head);
    let parts: Vec<&str> = head.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| digits(p, 2)) && digits(build, usize::MAX)
}

/// `2025-07-02T15:30:00.000+02:00`: `at` shown at a fixed UTC offset.
fn iso8601(at: SystemTime, offset_secs: i64) -> String {
    let millis = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    };
    let local = millis.div_euclid(1000) + offset_secs;
    let millis = millis.rem_euclid(1000);
    let (days, day_secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (sign, off) = if offset_secs < 0 {
        ('-', -offset_secs)
    } else {
        ('+', offset_secs)
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}{sign}{:02}:{:02}",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        off / 3600,
        off / 60 % 60,
    )
}

/// An RFC 7807 answer.
struct Problem {
    status: StatusCode,
    anchor: &'static str,
    detail: String,
    errors: Vec<Value>,
}

impl Problem {
    fn new(status: u16, anchor: &'static str, detail: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (detail, errors) = (detail.into(), Vec::new());
        Self {
            status,
            anchor,
            detail,
            errors,
        }
    }

    fn unauthorized(detail: &str) -> Self {
        Self::new(401, "not-authorized", detail)
    }

    fn bad_request() -> Self {
        Self::new(400, "bad-request", "the request is invalid")
    }

    fn error(mut self, parameter: &str, message: &str) -> Self {
        self.errors
            .push(json!({"parameter": parameter, "message": message}));
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": format!("{ERRORS_URI}{}", self.anchor),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] = Value::Array(self.errors);
        }
        let content_type = [(header::CONTENT_TYPE, "application/problem+json")];
        (self.status, content_type, body.to_string()).into_response()
    }
}

fn anchor_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "not-authorized",
        403 => "forbidden",
        404 => "not-found",
        406 => "not-acceptable",
        409 => "attribute-conflict",
        413 => "payload-too-large",
        415 => "unsupported-media-type",
        429 => "rate-limited",
        400..=499 => "bad-request",
        _ => "api-error",
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The media type of a header value, without parameters.
fn media_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

fn header_lossy(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The books stay usable even if a handler panicked while holding the lock.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_clock::{Entropy, OsEntropy};

    const KEY: &str = "key-one";
    const TERMINAL: &str = "1234001";
    const IDEM: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    const BODY: &str = r#"{"libVersion":"1.7.0.261471","scenario":"payment"}"#;

    async fn sim() -> SimPayroc {
        let accounts = vec![
            SimAccount::new(KEY, &[TERMINAL, "1234002"]),
            SimAccount::new("key-two", &["9999001"]),
        ];
        let config = SimConfig::new(Clock::system(), Arc::new(OsEntropy), accounts);
        SimPayroc::start(config).await.expect("sim starts")
    }

    /// An HTTP_PROXY in the environment must not capture loopback traffic.
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }

    struct Answer {
        status: u16,
        headers: reqwest::header::HeaderMap,
        text: String,
    }

    impl Answer {
        async fn of(response: reqwest::Response) -> Self {
            let (status, headers) = (response.status().as_u16(), response.headers().clone());
            let text = response.text().await.expect("body");
            Self {
                status,
                headers,
                text,
            }
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.text).expect("JSON body")
        }

        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .map_or("", |v| v.to_str().expect("ascii"))
        }

        /// Asserts a problem+json answer; returns its `errors[].parameter`s.
        fn problem(&self, status: u16, anchor: &str) -> Vec<String> {
            assert_eq!(self.status, status, "{}", self.text);
            assert_eq!(self.header("content-type"), "application/problem+json");
            let body = self.json();
            let type_uri = format!("{ERRORS_URI}{anchor}");
            assert_eq!(body["type"], type_uri, "{}", self.text);
            assert_eq!(body["status"], status);
            assert!(body["title"].is_string() && body["detail"].is_string());
            let errors = body["errors"].as_array().cloned().unwrap_or_default();
            errors
                .iter()
                .map(|e| e["parameter"].as_str().unwrap_or("").to_owned())
                .collect()
        }
    }

    async fn authorize(sim: &SimPayroc, key: Option<&str>) -> Answer {
        let mut request = client().post(sim.identity_url());
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        Answer::of(request.send().await.expect("identity answers")).await
    }

    async fn bearer_token(sim: &SimPayroc) -> String {
        let answer = authorize(sim, Some(KEY)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer.json()["access_token"]
            .as_str()
            .expect("token")
            .to_owned()
    }

    /// A sessions request, well-formed until changed.
    #[derive(Clone)]
    struct Req {
        terminal: String,
        headers: Vec<(&'static str, String)>,
        body: String,
    }

    impl Req {
        fn ok(token: &str) -> Self {
            let headers = [
                ("authorization", format!("Bearer {token}")),
                ("accept", "application/json".to_owned()),
                ("content-type", "application/json".to_owned()),
                ("idempotency-key", IDEM.to_owned()),
            ];
            Self {
                terminal: TERMINAL.to_owned(),
                headers: headers.into(),
                body: BODY.to_owned(),
            }
        }

        /// Replaces (or, with `None`, removes) a header.
        fn with(mut self, name: &'static str, value: Option<&str>) -> Self {
            self.headers.retain(|(n, _)| *n != name);
            self.headers.extend(value.map(|v| (name, v.to_owned())));
            self
        }

        fn terminal(mut self, terminal: &str) -> Self {
            self.terminal = terminal.to_owned();
            self
        }

        fn body(mut self, body: &str) -> Self {
            self.body = body.to_owned();
            self
        }

        fn request(&self, sim: &SimPayroc) -> reqwest::RequestBuilder {
            let (api, terminal) = (sim.api_url(), &self.terminal);
            let url = format!("{api}/processing-terminals/{terminal}/hosted-fields-sessions");
            let request = client().post(url).body(self.body.clone());
            self.headers
                .iter()
                .fold(request, |r, (name, value)| r.header(*name, value))
        }

        async fn send(&self, sim: &SimPayroc) -> Answer {
            Answer::of(self.request(sim).send().await.expect("sessions answers")).await
        }
    }

    /// A simulator without a server, its handlers called directly, so a
    /// paused clock can run it for days in milliseconds.
    fn bare(limits: SimLimits) -> Arc<Sim> {
        let accounts = vec![SimAccount::new(KEY, &[TERMINAL, "1234002"])];
        let mut config = SimConfig::new(Clock::system(), Arc::new(OsEntropy), accounts);
        config.limits = limits;
        config.token_lifetime = Duration::from_secs(1000 * 3600);
        Arc::new(Sim::new(config))
    }

    async fn direct_token(sim: &Arc<Sim>, key: &str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", key.parse().unwrap());
        let response = super::authorize(State(Arc::clone(sim)), headers).await;
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        let json: Value = serde_json::from_slice(&body.unwrap()).unwrap();
        json["access_token"].as_str().map(str::to_owned)
    }

    fn direct_session(
        sim: &Arc<Sim>,
        token: &str,
        key: &str,
        body: &str,
    ) -> impl std::future::Future<Output = Response> + use<> {
        let mut headers = HeaderMap::new();
        let bearer = format!("Bearer {token}");
        headers.insert(header::AUTHORIZATION, bearer.parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.insert("idempotency-key", key.parse().unwrap());
        let path = format!("/v1/processing-terminals/{TERMINAL}/hosted-fields-sessions");
        create_session(
            State(Arc::clone(sim)),
            Path(TERMINAL.to_owned()),
            path.parse().unwrap(),
            headers,
            Body::from(body.to_owned()),
        )
    }

    const BODY_B: &str = r#"{"libVersion":"1.7.0.261471","scenario":"tokenization"}"#;

    #[tokio::test(start_paused = true)]
    async fn records_and_idempotency_keys_stay_bounded_over_days() {
        let limits = SimLimits {
            session_records: 16,
            ..SimLimits::default()
        };
        let sim = bare(limits);
        let token = direct_token(&sim, KEY).await.unwrap();
        // Three days of one session every 10 minutes, each with its own key.
        let mut keys = Vec::new();
        for i in 0..432 {
            let key = OsEntropy.uuid_v4().to_string();
            let status = direct_session(&sim, &token, &key, BODY).await.status();
            assert_eq!(status, 201, "session {i}");
            keys.push(key);
            let held = sim.held();
            assert!(held.session_records <= 16, "{i}: {held:?}");
            assert!(held.idempotency_entries <= 144, "{i}: {held:?}");
            tokio::time::advance(Duration::from_secs(600)).await;
        }
        // A day's worth of keys (144 at one per 10 min), not three days'.
        let held = sim.held();
        assert_eq!((held.session_records, held.idempotency_entries), (16, 144));
        assert_eq!(lock(&sim.books).stats.sessions_created, 432);
        let recent: Vec<_> = lock(&sim.books).sessions.iter().map(|(s, _)| *s).collect();
        assert_eq!(recent, (416..432).collect::<Vec<u64>>(), "the newest 16");

        // Within 24 h a key still replays or conflicts; past 24 h it is
        // forgotten and may be used again.
        let last = keys.last().unwrap();
        assert_eq!(direct_session(&sim, &token, last, BODY).await.status(), 201);
        assert_eq!(
            direct_session(&sim, &token, last, BODY_B).await.status(),
            409
        );
        assert_eq!(lock(&sim.books).stats.sessions_created, 432, "a replay");
        let old = &keys[keys.len() - 145];
        assert_eq!(
            direct_session(&sim, &token, old, BODY_B).await.status(),
            201
        );
        assert_eq!(
            lock(&sim.books).stats.sessions_created,
            433,
            "a new session"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idempotency_entries_are_capped_under_sustained_load() {
        let sim = bare(SimLimits {
            idempotency_entries: 50,
            ..SimLimits::default()
        });
        let token = direct_token(&sim, KEY).await.unwrap();
        let keys: Vec<String> = (0..200).map(|_| OsEntropy.uuid_v4().to_string()).collect();
        for key in &keys {
            assert_eq!(direct_session(&sim, &token, key, BODY).await.status(), 201);
        }
        assert_eq!(sim.held().idempotency_entries, 50);
        // The newest are remembered, the oldest were let go early.
        assert_eq!(
            direct_session(&sim, &token, &keys[199], BODY_B)
                .await
                .status(),
            409
        );
        assert_eq!(
            direct_session(&sim, &token, &keys[0], BODY_B)
                .await
                .status(),
            201
        );
        assert_eq!(sim.held().idempotency_entries, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn issued_tokens_and_counted_keys_stay_bounded() {
        let sim = bare(SimLimits {
            counted_keys: 8,
            ..SimLimits::default()
        });
        *lock(&sim.token_lifetime) = Duration::from_secs(60);
        // A token a second for over an hour: 60 alive at any time.
        for i in 0..5000 {
            direct_token(&sim, KEY).await.unwrap();
            assert!(sim.held().issued_tokens <= MIN_TOKEN_SWEEP, "{i}");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Random keys: refused, and counted only up to the limit.
        for _ in 0..100 {
            let key = OsEntropy.uuid_v4().to_string();
            assert_eq!(direct_token(&sim, &key).await, None);
        }
        let held = sim.held();
        assert!(held.counted_keys <= 8, "{held:?}");
        // The account's own key is always counted.
        direct_token(&sim, KEY).await.unwrap();
        assert_eq!(lock(&sim.books).identity_by_key[KEY], 5001);
    }

    #[tokio::test]
    async fn a_zero_latency_answer_waits_for_no_timer() {
        use futures_util::FutureExt;
        let sim = bare(SimLimits::default());
        let token = direct_token(&sim, KEY).await.unwrap();
        let key = OsEntropy.uuid_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", KEY.parse().unwrap());
        // Complete on the first poll: `sleep(ZERO)` would be pending until
        // the timer wheel's next tick.
        let identity = super::authorize(State(Arc::clone(&sim)), headers.clone()).now_or_never();
        assert!(identity.is_some(), "identity answered at once");
        let session = direct_session(&sim, &token, &key, BODY).now_or_never();
        assert_eq!(session.map(|r| r.status()), Some(StatusCode::CREATED));
        // Any latency at all does wait for the timer.
        sim.faults
            .set_latency(SimEndpoint::Identity, Duration::from_millis(1));
        let slow = super::authorize(State(Arc::clone(&sim)), headers).now_or_never();
        assert!(slow.is_none());
    }

    #[tokio::test]
    async fn a_configured_pause_waits_out_the_latency() {
        let waits = Arc::new(Mutex::new(Vec::new()));
        let accounts = vec![SimAccount::new(KEY, &[TERMINAL])];
        let mut config = SimConfig::new(Clock::system(), Arc::new(OsEntropy), accounts);
        config.pause = Some(Arc::new({
            let waits = Arc::clone(&waits);
            move |d| {
                waits.lock().unwrap().push(d);
                Box::pin(async {})
            }
        }));
        let sim = Arc::new(Sim::new(config));
        direct_token(&sim, KEY).await.unwrap();
        sim.faults
            .set_latency(SimEndpoint::Identity, Duration::from_millis(7));
        direct_token(&sim, KEY).await.unwrap();
        // Zero latency does not call it; the 7 ms it answers at once.
        assert_eq!(*waits.lock().unwrap(), [Duration::from_millis(7)]);
    }

    #[tokio::test]
    async fn identity_issues_bearer_tokens() {
        let sim = sim().await;
        let answer = authorize(&sim, Some(KEY)).await;
        assert_eq!(answer.status, 200);
        let body = answer.json();
        let token = body["access_token"].as_str().expect("access_token");
        assert!(token.starts_with("sim-at-"), "{token}");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "hosted_fields payments");
        assert_eq!(body["extra_unknown_field"], true);
        assert_eq!(sim.stats().identity_requests, 1);
    }

    #[tokio::test]
    async fn identity_refuses_unknown_or_missing_keys() {
        let sim = sim().await;
        let wrong = authorize(&sim, Some("key-wrong")).await;
        wrong.problem(401, "not-authorized");
        assert!(!wrong.text.contains("key-wrong"));
        authorize(&sim, None).await.problem(401, "not-authorized");
        assert_eq!(sim.stats().identity_requests, 2);
    }

    #[tokio::test]
    async fn session_is_created() {
        let sim = sim().await;
        let token = bearer_token(&sim).await;
        let answer = Req::ok(&token).send(&sim).await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        let prefix = format!("/v1/processing-terminals/{TERMINAL}/hosted-fields-sessions/");
        let location = answer.header("location");
        let id = location.strip_prefix(&prefix).expect("Location");
        assert!(uuid::Uuid::try_parse(id).is_ok());
        let body = answer.json();
        assert_eq!(body["processingTerminalId"], TERMINAL);
        let session_token = body["token"].as_str().expect("token");
        assert!(session_token.starts_with("sim-st-"), "{session_token}");
        let expires_at = body["expiresAt"].as_str().expect("expiresAt");
        let offset_shown = expires_at.len() == 29 && expires_at.ends_with("+02:00");
        assert!(offset_shown, "{expires_at}");
        assert_eq!(sim.stats().sessions_created, 1);
        let record = SessionRecord {
            terminal: TERMINAL.to_owned(),
            idempotency_key: Some(IDEM.to_owned()),
            authorization_token: Some(token),
            body: BODY.to_owned(),
            status: 201,
            received_at: sim.sessions()[0].received_at,
        };
        assert_eq!(sim.sessions(), [record]);
    }

    #[tokio::test]
    async fn invalid_requests_get_the_documented_problem() {
        let sim = sim().await;
        let ok = Req::ok(&bearer_token(&sim).await);
        let huge = format!(
            r#"{{"scenario":"payment","pad":"{}"}}"#,
            "x".repeat(MAX_BODY)
        );
        let bad_body = r#"{"libVersion":"1.7","scenario":"refund","secureTokenId":""}"#;
        let long_id = format!(
            r#"{{"libVersion":"1.2.0-beta.135020","scenario":"tokenization","secureTokenId":"{}"}}"#,
            "s".repeat(201)
        );
        let uuid_v1 = "8e03978e-40d5-13e8-bc93-6894a57f9324";
        let unhyphenated = "8e03978e40d543e8bc936894a57f9324";
        let all = [
            "processingTerminalId",
            "libVersion",
            "scenario",
            "secureTokenId",
        ];
        let with = |name, value| ok.clone().with(name, value);
        #[rustfmt::skip] // a table reads better aligned
        let cases: Vec<(Req, u16, &str, &[&str])> = vec![
            (with("authorization", None),                    401, "not-authorized", &[]),
            (with("authorization", Some("Bearer sim-at-x")), 401, "not-authorized", &[]),
            (with("accept", Some("text/html")),              406, "not-acceptable", &[]),
            (with("content-type", Some("text/plain")),       415, "unsupported-media-type", &[]),
            (with("content-type", None),                     415, "unsupported-media-type", &[]),
            (ok.clone().body(&huge),                         413, "payload-too-large", &[]),
            (with("idempotency-key", None),                  400, "idempotency-key-missing", &[]),
            (with("idempotency-key", Some("nope")),          400, "bad-request", &["Idempotency-Key"]),
            (with("idempotency-key", Some(uuid_v1)),         400, "bad-request", &["Idempotency-Key"]),
            (with("idempotency-key", Some(unhyphenated)),    400, "bad-request", &["Idempotency-Key"]),
            (ok.clone().terminal("123").body(bad_body),      400, "bad-request", &all),
            (ok.clone().body("{}"),                          400, "bad-request", &["libVersion", "scenario"]),
            (ok.clone().body("[]"),                          400, "bad-request", &[""]),
            (ok.clone().body(&long_id),                      400, "bad-request", &["secureTokenId"]),
            (ok.clone().terminal("9999001"),                 403, "forbidden", &[]),
            (ok.clone().terminal("5555001"),                 404, "not-found", &[]),
        ];
        for (req, status, anchor, parameters) in &cases {
            let answer = req.send(&sim).await;
            let found = answer.problem(*status, anchor);
            assert_eq!(found, *parameters, "{}", answer.text);
            assert!(!answer.text.contains("sim-at-"), "{}", answer.text);
        }
        let statuses: Vec<u16> = sim.sessions().iter().map(|s| s.status).collect();
        assert_eq!(statuses, cases.iter().map(|c| c.1).collect::<Vec<_>>());
        assert_eq!(sim.stats().sessions_created, 0);
    }

    #[tokio::test]
    async fn media_types_are_parsed_leniently() {
        let sim = sim().await;
        let lenient = Req::ok(&bearer_token(&sim).await)
            .with("accept", Some("text/html, application/*;q=0.5"))
            .with("content-type", Some("Application/JSON; charset=utf-8"));
        assert_eq!(lenient.send(&sim).await.status, 201);
    }

    #[tokio::test]
    async fn expired_and_revoked_tokens_are_refused() {
        let sim = sim().await;
        let token = bearer_token(&sim).await;
        sim.set_token_lifetime(Duration::ZERO);
        let expired = bearer_token(&sim).await;
        Req::ok(&expired)
            .send(&sim)
            .await
            .problem(401, "not-authorized");
        assert_eq!(Req::ok(&token).send(&sim).await.status, 201);
        sim.revoke_tokens();
        let revoked = Req::ok(&token).send(&sim).await;
        revoked.problem(401, "not-authorized");
        assert!(!revoked.text.contains(&token));
    }

    #[tokio::test]
    async fn same_request_replays_and_reused_key_conflicts() {
        let sim = sim().await;
        let ok = Req::ok(&bearer_token(&sim).await);
        let (first, again) = (ok.send(&sim).await, ok.send(&sim).await);
        assert_eq!((first.status, again.status), (201, 201));
        assert_eq!(first.text, again.text);
        assert_eq!(first.header("location"), again.header("location"));
        assert_eq!(sim.stats().sessions_created, 1);

        let other_body = ok
            .clone()
            .body(r#"{"libVersion":"1.7.0.261471","scenario":"tokenization"}"#);
        other_body
            .send(&sim)
            .await
            .problem(409, "idempotency-key-in-use");
        let other_path = ok.clone().terminal("1234002");
        other_path
            .send(&sim)
            .await
            .problem(409, "idempotency-key-in-use");
        let stats = sim.stats();
        assert_eq!((stats.session_requests, stats.sessions_created), (4, 1));
    }

    #[tokio::test]
    async fn queued_faults_come_first_and_store_nothing() {
        let sim = sim().await;
        let ok = Req::ok(&bearer_token(&sim).await);
        sim.faults().push(
            SimEndpoint::Sessions,
            Fault::status(503).with_retry_after("2"),
            2,
        );
        for _ in 0..2 {
            let answer = ok.send(&sim).await;
            answer.problem(503, "api-error");
            assert_eq!(answer.header("retry-after"), "2");
        }
        assert_eq!(ok.send(&sim).await.status, 201);
        let statuses: Vec<u16> = sim.sessions().iter().map(|s| s.status).collect();
        assert_eq!(statuses, [503, 503, 201]);
        let stats = sim.stats();
        assert_eq!((stats.session_requests, stats.sessions_created), (3, 1));
    }

    #[tokio::test]
    async fn accepted_connections_are_counted() {
        let sim = sim().await;
        let pooled = client();
        for _ in 0..3 {
            let answer = Answer::of(
                (pooled.post(sim.identity_url()).header("x-api-key", KEY))
                    .send()
                    .await
                    .expect("identity answers"),
            )
            .await;
            assert_eq!(answer.status, 200);
        }
        // One client reuses its connection; another client opens its own.
        assert_eq!(sim.connections_accepted(), 1);
        assert_eq!(authorize(&sim, Some(KEY)).await.status, 200);
        assert_eq!(sim.connections_accepted(), 2);
    }

    #[tokio::test]
    async fn always_fault_lasts_until_cleared() {
        let sim = sim().await;
        let fault = Fault::status(429).with_retry_after("7");
        sim.faults().always(SimEndpoint::Identity, Some(fault));
        for _ in 0..2 {
            let answer = authorize(&sim, Some(KEY)).await;
            answer.problem(429, "rate-limited");
            assert_eq!(answer.header("retry-after"), "7");
        }
        sim.faults().clear();
        assert_eq!(authorize(&sim, Some(KEY)).await.status, 200);
        assert_eq!(sim.stats().identity_requests, 3);
    }

    #[tokio::test]
    async fn malformed_json_uses_each_endpoints_success_status() {
        let sim = sim().await;
        let ok = Req::ok(&bearer_token(&sim).await);
        sim.faults()
            .push(SimEndpoint::Identity, Fault::malformed(), 1);
        sim.faults()
            .push(SimEndpoint::Sessions, Fault::malformed(), 1);
        let answers = [
            (authorize(&sim, Some(KEY)).await, 200),
            (ok.send(&sim).await, 201),
        ];
        for (answer, status) in answers {
            assert_eq!((answer.status, answer.text.as_str()), (status, "{not json"));
            assert_eq!(answer.header("content-type"), "application/json");
        }
    }

    #[tokio::test]
    async fn reset_breaks_the_connection() {
        let sim = sim().await;
        let ok = Req::ok(&bearer_token(&sim).await);
        sim.faults().push(SimEndpoint::Sessions, Fault::reset(), 1);
        let outcome = match ok.request(&sim).send().await {
            Ok(response) => response.bytes().await.map(drop),
            Err(error) => Err(error),
        };
        assert!(outcome.is_err(), "a reset must surface as a reqwest error");
        assert_eq!(ok.send(&sim).await.status, 201);
    }

    #[tokio::test]
    async fn expires_at_can_be_omitted() {
        let sim = sim().await;
        let ok = Req::ok(&bearer_token(&sim).await);
        sim.faults().omit_expires_at(true);
        let answer = ok.send(&sim).await;
        assert_eq!(answer.status, 201);
        assert!(answer.json().get("expiresAt").is_none() && answer.json()["token"].is_string());
    }

    #[tokio::test]
    async fn unknown_routes_are_problems() {
        let sim = sim().await;
        let response = client()
            .get(format!("{}/nowhere", sim.api_url()))
            .send()
            .await;
        Answer::of(response.expect("answer"))
            .await
            .problem(404, "not-found");
    }

    #[tokio::test]
    async fn shutdown_and_last_drop_stop_the_server() {
        let (stopped, dropped) = (sim().await, sim().await);
        let addrs = [stopped.identity_url(), dropped.identity_url()];
        stopped.shutdown();
        drop(dropped);
        for url in addrs {
            // The server task notices the signal asynchronously: a connection
            // accepted just before is still served, fresh ones then fail.
            let mut refused = false;
            for _ in 0..1000 {
                if client().post(&url).send().await.is_err() {
                    refused = true;
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert!(refused, "{url} still answers");
        }
    }

    #[test]
    fn lib_version_pattern() {
        for ok in [
            "1.2.0-beta.135020",
            "1.3.0.135534",
            "1.7.0.261471",
            "10.20.30.1",
        ] {
            assert!(lib_version_ok(ok), "{ok}");
        }
        let bad = [
            "",
            "1.7.0",
            "1.7.0.",
            "100.0.0.1",
            "1.7.0-alpha.1",
            "1.7.0-beta",
            "1..0.1",
        ];
        for bad in bad
            .into_iter()
            .chain(["1.7.0.1a", "a.b.c.1", "1.7.0-beta-beta.1"])
        {
            assert!(!lib_version_ok(bad), "{bad}");
        }
    }

    #[test]
    fn iso8601_formats_civil_time_at_an_offset() {
        let at =
            |secs: u64, ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms);
        assert_eq!(
            iso8601(at(1_751_463_000, 0), 7200),
            "2025-07-02T15:30:00.000+02:00"
        );
        assert_eq!(
            iso8601(at(1_735_686_000, 42), 7200),
            "2025-01-01T01:00:00.042+02:00"
        );
        assert_eq!(
            iso8601(at(1_709_161_199, 999), 7200),
            "2024-02-29T00:59:59.999+02:00"
        );
        assert_eq!(iso8601(at(0, 0), -5400), "1969-12-31T22:30:00.000-01:30");
    }
}
