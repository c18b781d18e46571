//! Bearer tokens, cached per credential and shared by every caller.
//!
//! Policy on top of [`SingleFlight`]:
//!
//! - A token is served while it has at least the requested validity left. The
//!   hit path is one atomic load and a comparison: no lock, no allocation.
//! - Each credential has a background refresher. It fetches the first token at
//!   start-up (warm start: spread out, bounded concurrency) and renews it a
//!   random moment before `refresh_before_expiry` is left (see
//!   `cache_entry`), so credentials and replicas started together do not
//!   refresh in the same second, and no caller waits on an identity request
//!   while a valid token is cached.
//! - A failed fetch leaves the cached token in place; the refresher retries
//!   with exponential backoff and jitter until it succeeds.
//! - With no usable token after a failure, callers fail fast with the last
//!   error and the time of the next attempt (negative caching): the identity
//!   service sees one fetch per credential per backoff step, however many
//!   callers there are.
//! - Only the miss path waits, and then on the one shared identity request.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use secrecy::{ExposeSecret, SecretString};
use tokio::{sync::watch, task::AbortHandle, time::Instant};

use crate::{
    clock::{Clock, SharedEntropy},
    config::CredentialConfig,
    domain::cell::{Flight, FlightError, SingleFlight},
    payroc::{Endpoint, IdentityToken, PayrocClient, UpstreamError},
    sync::lock,
};

/// A cached Bearer token.
pub struct BearerToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub scopes: Vec<String>,
    pub expires_at: Instant,
    /// `expires_at` on the wall clock, for responses.
    pub expires_at_wall: SystemTime,
    /// The full lifetime Payroc granted (`expires_in`).
    pub lifetime: Duration,
    /// When the background refresher renews it (jittered).
    pub refresh_at: Instant,
    /// When the identity request that got it was sent.
    pub fetched_at: Instant,
    /// The HTTP status of the identity answer that issued it.
    pub upstream_status: u16,
}

impl BearerToken {
    /// The time left at `now`, zero once expired.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// Whether a caller's `min_validity` may no longer have this token
    /// replaced: it is too young (see [`refetch_spacing`]).
    fn too_young_to_refetch(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.fetched_at) < refetch_spacing(self.lifetime)
    }
}

/// Why no token could be had.
#[derive(Debug, Clone)]
pub enum TokenError {
    /// The identity request failed.
    Upstream(UpstreamError),
    /// A recent identity request failed and the next is not due yet: the
    /// caller gets that failure at once, and when to try again.
    BackingOff {
        error: UpstreamError,
        retry_in: Duration,
    },
    /// No token Payroc issues lives as long as the caller asked.
    OutOfRange {
        requested: Duration,
        lifetime: Duration,
    },
    /// The caller's deadline ran out while waiting for the token.
    DeadlineExceeded,
    /// The refresh task died (a bug, or shutdown).
    Aborted,
}

/// Whether a credential holds a usable token (one above the floor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenHealth {
    /// The first fetch has not finished yet.
    Starting,
    Usable,
    Unusable,
}

/// Where tokens come from: Payroc's identity service in production, a
/// scripted source in tests.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch(
        &self,
        api_key: SecretString,
    ) -> impl Future<Output = Result<IdentityToken, UpstreamError>> + Send + 'static;
}

impl TokenSource for Arc<PayrocClient> {
    fn fetch(
        &self,
        api_key: SecretString,
    ) -> impl Future<Output = Result<IdentityToken, UpstreamError>> + Send + 'static {
        let client = Arc::clone(self);
        // Read now, in the task of the RPC that starts the fetch: the fetch
        // runs in a task of its own.
        let trace = crate::trace::current();
        // No deadline: the fetch is shared, so no one caller's deadline may cut
        // it short. Attempts and request_timeout bound it; callers stop
        // waiting at their own deadlines.
        async move { client.fetch_bearer(&api_key, None, trace).await }
    }
}

/// Timing policy of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPolicy {
    pub refresh_before_expiry: Duration,
    /// A token with less than this left is not usable (health, refresher).
    pub floor: Duration,
    /// Wait after the first failed fetch; doubles per consecutive failure.
    pub failure_backoff: Duration,
    pub max_failure_backoff: Duration,
}

impl TokenPolicy {
    #[cfg(test)]
    pub fn new(refresh_before_expiry: Duration, floor: Duration) -> Self {
        Self {
            refresh_before_expiry,
            floor,
            failure_backoff: Duration::from_secs(1),
            max_failure_backoff: Duration::from_secs(30),
        }
    }
}

/// How a credential's first fetch is scheduled at start-up.
#[derive(Clone, Default)]
pub struct WarmStart {
    /// Waited before the first fetch (spreads credentials out).
    pub delay: Duration,
    /// Bounds how many first fetches run at once.
    pub gate: Option<Arc<tokio::sync::Semaphore>>,
}

/// The last failed fetch.
struct Failure {
    error: UpstreamError,
    retry_at: Instant,
    consecutive: u32,
}

struct Inner<S> {
    name: Arc<str>,
    api_key: SecretString,
    source: S,
    policy: TokenPolicy,
    clock: Clock,
    entropy: SharedEntropy,
    cell: Arc<SingleFlight<BearerToken, UpstreamError>>,
    /// Locked only off the hit path (misses, fetch outcomes, the refresher).
    failure: Mutex<Option<Failure>>,
    health: watch::Sender<TokenHealth>,
    /// Wakes the refresher when its plan changed: the token was dropped, or a
    /// fetch failed and set a new retry time.
    replan: tokio::sync::Notify,
}

/// One credential's token cache and its background refresher (stopped when
/// this is dropped).
pub struct CredentialTokens<S> {
    pub name: Arc<str>,
    inner: Arc<Inner<S>>,
    refresher: AbortHandle,
}

impl<S> Drop for CredentialTokens<S> {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl<S: TokenSource> CredentialTokens<S> {
    /// Creates the cache and starts its refresher (which makes the first fetch).
    pub fn spawn(
        name: &str,
        api_key: SecretString,
        source: S,
        policy: TokenPolicy,
        clock: Clock,
        entropy: SharedEntropy,
        warm: WarmStart,
    ) -> Self {
        let inner = Arc::new(Inner {
            name: name.into(),
            api_key,
            source,
            policy,
            clock,
            entropy,
            cell: SingleFlight::new(),
            failure: Mutex::new(None),
            health: watch::Sender::new(TokenHealth::Starting),
            replan: tokio::sync::Notify::new(),
        });
        let refresher = tokio::spawn(refresh_forever(Arc::clone(&inner), warm)).abort_handle();
        Self {
            name: Arc::clone(&inner.name),
            inner,
            refresher,
        }
    }

    /// A token valid for at least `min_validity`, waiting at most until
    /// `deadline`.
    pub async fn bearer(
        &self,
        min_validity: Duration,
        deadline: Option<Instant>,
    ) -> Result<Arc<BearerToken>, TokenError> {
        self.bearer_observed(min_validity, deadline)
            .await
            .map(|(t, _)| t)
    }

    /// [`Self::bearer`], and the HTTP status of the identity answer it
    /// waited for, if it waited for one (`None` when served from the cache).
    pub async fn bearer_observed(
        &self,
        min_validity: Duration,
        deadline: Option<Instant>,
    ) -> Result<(Arc<BearerToken>, Option<u16>), TokenError> {
        let inner = &*self.inner;
        // Hit path: one atomic load and a comparison.
        if let Some(tok) = inner.cell.current() {
            if tok.remaining(inner.clock.now()) >= min_validity {
                return Ok((tok, None));
            }
            // Not satisfiable at all, or only by re-fetching a token fetched
            // moments ago: a min_validity close to the lifetime must not
            // make the credential fetch about every second.
            if !satisfiable(min_validity, tok.lifetime)
                || tok.too_young_to_refetch(inner.clock.now())
            {
                return Err(TokenError::OutOfRange {
                    requested: min_validity,
                    lifetime: tok.lifetime,
                });
            }
        }
        // Miss. Join a fetch in flight; otherwise fail fast while backing off
        // from a recent failure; otherwise start a fetch.
        if !inner.cell.is_loading()
            && let Some(e) = inner.backing_off()
        {
            return Err(e);
        }
        let flight = self.inner.load();
        let loaded = match deadline {
            Some(d) => tokio::time::timeout_at(d, flight.wait())
                .await
                .map_err(|_| TokenError::DeadlineExceeded)?,
            None => flight.wait().await,
        };
        let tok = loaded.map_err(|e| match e {
            FlightError::Failed(e) => TokenError::Upstream(e),
            FlightError::Aborted => TokenError::Aborted,
        })?;
        if tok.remaining(inner.clock.now()) >= min_validity {
            let status = tok.upstream_status;
            Ok((tok, Some(status)))
        } else {
            Err(TokenError::OutOfRange {
                requested: min_validity,
                lifetime: tok.lifetime,
            })
        }
    }

    /// Follows the cached token (see [`CredentialTokens::replacement`]).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<BearerToken>>> {
        self.inner.cell.subscribe()
    }

    /// Whether a watcher can follow tokens like `token` with `min_validity`:
    /// it needs each replacement fetched before the previous token drops
    /// under `min_validity`, yet no earlier than [`refetch_spacing`] after
    /// it was fetched. A stricter bound than GetBearerToken's.
    pub fn check_watchable(
        &self,
        min_validity: Duration,
        token: &BearerToken,
    ) -> Result<(), TokenError> {
        let needs = min_validity
            .saturating_add(FETCH_ALLOWANCE)
            .saturating_add(refetch_spacing(token.lifetime));
        if needs <= token.lifetime {
            Ok(())
        } else {
            Err(TokenError::OutOfRange {
                requested: min_validity,
                lifetime: token.lifetime,
            })
        }
    }

    /// Waits for the token that replaces `last` in the cache and has
    /// `min_validity` left, for a watcher subscribed with `changes`.
    ///
    /// Normally the background refresher renews `last` in time and this only
    /// waits. When the renewal would come too late for `min_validity` (a
    /// watcher asking more than `refresh_before_expiry`), the watcher asks for
    /// a refresh a little before `last` drops under `min_validity`, through
    /// the same single flight, and only if `last` is still the cached token:
    /// any number of watchers cause one identity request per token. After a
    /// failed fetch it waits for the negative cache's retry time, like a
    /// caller would; but once `last` has fallen under `min_validity` with no
    /// replacement and the last fetch failed, the promise is broken: that
    /// failure is returned, so the stream ends and its client stops relying
    /// on the token it holds instead of hearing nothing.
    pub async fn replacement(
        &self,
        changes: &mut watch::Receiver<Option<Arc<BearerToken>>>,
        last: &Arc<BearerToken>,
        min_validity: Duration,
    ) -> Result<Arc<BearerToken>, TokenError> {
        let inner = &self.inner;
        loop {
            let now = inner.clock.now();
            let cached = changes.borrow_and_update().clone();
            let due = match &cached {
                Some(t) if !Arc::ptr_eq(t, last) => {
                    if t.remaining(now) >= min_validity {
                        return Ok(Arc::clone(t));
                    }
                    if !satisfiable(min_validity, t.lifetime) {
                        return Err(TokenError::OutOfRange {
                            requested: min_validity,
                            lifetime: t.lifetime,
                        });
                    }
                    // A replacement already too old for this watcher.
                    now
                }
                // `last` is still cached, or was dropped (the refresher is
                // already fetching its successor): a refresh is due before
                // `last` drops under `min_validity`, the fetch included.
                _ => last
                    .expires_at
                    .checked_sub(min_validity.saturating_add(FETCH_ALLOWANCE))
                    .unwrap_or(now),
            };
            if last.remaining(now) < min_validity
                && let Some(broken) = inner.backing_off()
            {
                return Err(broken);
            }
            let due = inner.retry_at().map_or(due, |r| due.max(r));
            if due <= now {
                // The token a refresh would replace (if still cached) may
                // not be re-fetched yet: this min_validity needs fetches
                // closer together than a credential allows.
                if let Some(t) = &cached
                    && t.too_young_to_refetch(now)
                {
                    return Err(TokenError::OutOfRange {
                        requested: min_validity,
                        lifetime: t.lifetime,
                    });
                }
                let flight = inner.load_unless_replaced(&cached);
                if let Some(flight) = flight {
                    // A failure is recorded (retry time) and taken into
                    // account on the next round.
                    let _ = flight.wait().await;
                }
                continue;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(TokenError::Aborted);
                    }
                }
                () = tokio::time::sleep_until(due) => {}
            }
        }
    }

    /// Forgets `used` if it is still the cached token (Payroc rejected it).
    pub fn invalidate(&self, used: &Arc<BearerToken>) -> bool {
        let dropped = self.inner.cell.invalidate(used);
        if dropped {
            self.inner.replan.notify_one();
            tracing::info!(credential = %self.name, "Payroc rejected the cached Bearer token; fetching a new one");
        }
        dropped
    }

    /// Failed identity fetches in a row (0 after a success).
    pub fn consecutive_failures(&self) -> u32 {
        lock(&self.inner.failure)
            .as_ref()
            .map_or(0, |f| f.consecutive)
    }

    /// Identity requests started so far.
    #[cfg(test)]
    pub fn loads_started(&self) -> u64 {
        self.inner.cell.loads_started()
    }

    /// The cached token, whatever its state.
    pub fn cached(&self) -> Option<Arc<BearerToken>> {
        self.inner.cell.current()
    }

    /// Follows whether the credential holds a usable token.
    pub fn health(&self) -> watch::Receiver<TokenHealth> {
        self.inner.health.subscribe()
    }

    /// Whether this cache was built for `api_key` (reload keeps it if so).
    pub fn has_api_key(&self, api_key: &SecretString) -> bool {
        self.inner.api_key.expose_secret() == api_key.expose_secret()
    }
}

impl<S: TokenSource> Inner<S> {
    fn load(self: &Arc<Self>) -> Flight<BearerToken, UpstreamError> {
        self.cell.load(self.fetcher())
    }

    /// A load, unless the cached token is no longer `seen`.
    fn load_unless_replaced(
        self: &Arc<Self>,
        seen: &Option<Arc<BearerToken>>,
    ) -> Option<Flight<BearerToken, UpstreamError>> {
        self.cell.load_unless_replaced(Some(seen), self.fetcher())
    }

    fn fetcher(
        self: &Arc<Self>,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<dyn Future<Output = Result<BearerToken, UpstreamError>> + Send + 'static>,
    > + '_ {
        move || {
            let fetch = self.source.fetch(self.api_key.clone());
            let this = Arc::clone(self);
            Box::pin(async move {
                let outcome = fetch.await;
                this.record(outcome)
            })
        }
    }

    /// Books a fetch's outcome: the failure state, health, and a log line.
    fn record(
        &self,
        outcome: Result<IdentityToken, UpstreamError>,
    ) -> Result<BearerToken, UpstreamError> {
        // A malformed answer (an absurd lifetime) is a failed fetch like any
        // other. Computed before the lock: nothing that can fail runs under it.
        let outcome =
            outcome.and_then(|t| cache_entry(t, &self.policy, &self.clock, &*self.entropy));
        match outcome {
            Ok(tok) => {
                *lock(&self.failure) = None;
                tracing::info!(credential = %self.name, lifetime = ?tok.lifetime, "fetched a Bearer token");
                let usable = tok.remaining(self.clock.now()) >= self.policy.floor;
                self.set_health(if usable {
                    TokenHealth::Usable
                } else {
                    TokenHealth::Unusable
                });
                Ok(tok)
            }
            Err(error) => {
                // Payroc's Retry-After, when it gave one, is a floor: coming
                // back sooner only earns another 429.
                let retry_after = match &error {
                    UpstreamError::Status { retry_after, .. } => *retry_after,
                    _ => None,
                };
                let now = self.clock.now();
                // The lock covers reading and replacing the failure, nothing
                // else (no logging, no health update).
                let (consecutive, wait) = {
                    let mut failure = lock(&self.failure);
                    let consecutive = failure
                        .as_ref()
                        .map_or(0, |f| f.consecutive)
                        .saturating_add(1);
                    let wait = self
                        .backoff(consecutive)
                        .max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
                    *failure = Some(Failure {
                        error: error.clone(),
                        retry_at: later(now, wait),
                        consecutive,
                    });
                    (consecutive, wait)
                };
                tracing::warn!(credential = %self.name, %error, consecutive, next_attempt_in = ?wait, "fetching a Bearer token failed");
                self.set_health(if self.usable_now() {
                    TokenHealth::Usable
                } else {
                    TokenHealth::Unusable
                });
                self.replan.notify_one();
                Err(error)
            }
        }
    }

    /// "Equal jitter": half the exponential step, plus up to as much again
    /// at random. Never near zero, so a failing service is not hammered;
    /// never in lockstep with other credentials or replicas.
    fn backoff(&self, consecutive: u32) -> Duration {
        let step = self
            .policy
            .failure_backoff
            .saturating_mul(1 << (consecutive - 1).min(16))
            .min(self.policy.max_failure_backoff);
        step / 2 + self.entropy.jitter(step / 2)
    }

    fn backing_off(&self) -> Option<TokenError> {
        let now = self.clock.now();
        let failure = lock(&self.failure);
        let f = failure.as_ref()?;
        (now < f.retry_at).then(|| TokenError::BackingOff {
            error: f.error.clone(),
            retry_in: f.retry_at - now,
        })
    }

    fn retry_at(&self) -> Option<Instant> {
        lock(&self.failure).as_ref().map(|f| f.retry_at)
    }

    fn usable_now(&self) -> bool {
        self.cell
            .current()
            .is_some_and(|t| t.remaining(self.clock.now()) >= self.policy.floor)
    }

    fn set_health(&self, h: TokenHealth) {
        self.health
            .send_if_modified(|cur| std::mem::replace(cur, h) != h);
    }
}

/// The background refresher: warm start, then renew at each token's
/// `refresh_at`, backing off after failures; also reports the moment a token
/// stops being usable, so health follows even when nothing can be fetched.
async fn refresh_forever<S: TokenSource>(inner: Arc<Inner<S>>, warm: WarmStart) {
    tokio::time::sleep(warm.delay).await;
    // A caller may have fetched the first token on demand meanwhile.
    if inner.cell.current().is_none() {
        let _permit = match warm.gate {
            Some(g) => g.acquire_owned().await.ok(),
            None => None,
        };
        if inner.cell.current().is_none() {
            let _ = inner.load().wait().await;
        }
    }
    loop {
        let now = inner.clock.now();
        let current = inner
            .cell
            .current()
            .filter(|t| t.remaining(now) > Duration::ZERO);
        if current.is_none() || !inner.usable_now() {
            inner.set_health(TokenHealth::Unusable);
        }
        let mut due = current.as_ref().map_or(now, |t| t.refresh_at);
        if let Some(retry_at) = inner.retry_at() {
            due = due.max(retry_at);
        }
        // Wake early, without fetching, when the token drops under the floor.
        let unusable_at = current
            .as_ref()
            .and_then(|t| t.expires_at.checked_sub(inner.policy.floor))
            .filter(|&at| at > now);
        let wake = unusable_at.map_or(due, |at| at.min(due));
        if wake > now {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = inner.replan.notified() => {}
            }
            continue;
        }
        match inner.load().wait().await {
            Ok(tok) if tok.refresh_at > inner.clock.now() => {}
            // A panicked fetch records no failure, and a token with no time to
            // spare would be renewed at once: pause instead of spinning.
            _ if inner.retry_at().is_none_or(|r| r <= inner.clock.now()) => {
                tokio::time::sleep(inner.policy.failure_backoff).await;
            }
            _ => {}
        }
    }
}

/// Whether a fresh token of `lifetime` can have `min_validity` left when it
/// arrives: the fetch itself takes time, so asking for (nearly) the whole
/// lifetime can never be met, and must not make every call refetch.
///
/// It also leaves [`refetch_spacing`] between the moment a fresh token
/// arrives and the moment it no longer meets `min_validity`, so that a
/// caller asking nearly the whole lifetime is refused rather than served
/// by a fetch about every second.
fn satisfiable(min_validity: Duration, lifetime: Duration) -> bool {
    min_validity.saturating_add(FETCH_ALLOWANCE.max(refetch_spacing(lifetime))) <= lifetime
}

/// A token younger than this is never replaced for a caller's (or
/// watcher's) `min_validity`: such requests get OUT_OF_RANGE instead, so
/// forced re-fetches of one credential come at most this often. Capped at
/// half the lifetime, so short-lived tokens (tests) still serve ordinary
/// requests.
fn refetch_spacing(lifetime: Duration) -> Duration {
    MIN_REFETCH_SPACING.min(lifetime / 2)
}

/// The longest `expires_in` accepted from the identity service.
const MAX_EXPIRES_IN: Duration = Duration::from_secs(24 * 3600);

/// See [`refetch_spacing`].
const MIN_REFETCH_SPACING: Duration = Duration::from_secs(10);

/// The part of a token's lifetime that a fetch may use up.
const FETCH_ALLOWANCE: Duration = Duration::from_secs(1);

/// The longest `Retry-After` from the identity service the refresher honours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);

/// Turns an identity answer into a cache entry. Expiry counts from when the
/// request was sent.
///
/// Renewal: the lead is `refresh_before_expiry`, or half the lifetime when the
/// configured lead is not shorter than the lifetime (the contract's clamp).
/// The renewal point is drawn uniformly from `[expires - lead - spread,
/// expires - lead]`, so renewals never come later than configured yet
/// credentials and replicas do not renew in lockstep; the spread is a quarter
/// of the lead or of the time before it, whichever is shorter. It is also
/// never later than the moment the token drops under the floor, so callers
/// never wait for a renewal.
fn cache_entry(
    t: IdentityToken,
    policy: &TokenPolicy,
    clock: &Clock,
    entropy: &dyn crate::clock::Entropy,
) -> Result<BearerToken, UpstreamError> {
    let malformed = |reason: &str| UpstreamError::Malformed {
        endpoint: Endpoint::Identity,
        reason: reason.to_owned(),
    };
    // Payroc's tokens live an hour. A lifetime past a day is a broken answer,
    // not a token to keep for years (and `u64::MAX` seconds would overflow
    // every instant computed from it). Checked here, once, for every source.
    if t.expires_in > MAX_EXPIRES_IN {
        return Err(malformed("expires_in is longer than 24 h"));
    }
    let expires_at = t
        .requested_at
        .checked_add(t.expires_in)
        .ok_or_else(|| malformed("expires_in is out of range"))?;
    let expires_at_wall = clock
        .checked_wall(expires_at)
        .ok_or_else(|| malformed("expires_in is out of range"))?;
    let lead = if policy.refresh_before_expiry >= t.expires_in {
        t.expires_in / 2
    } else {
        policy.refresh_before_expiry
    };
    // Checked even where it cannot underflow: no instant arithmetic on an
    // upstream duration panics.
    let before = |d: Duration| expires_at.checked_sub(d).unwrap_or(t.requested_at);
    let latest = before(lead).min(before(policy.floor)).max(t.requested_at);
    let spread = lead.min(latest.saturating_duration_since(t.requested_at)) / 4;
    let refresh_at = latest
        .checked_sub(entropy.jitter(spread))
        .unwrap_or(t.requested_at)
        .max(t.requested_at);
    Ok(BearerToken {
        access_token: t.access_token,
        token_type: t.token_type,
        scopes: t.scopes,
        expires_at,
        expires_at_wall,
        lifetime: t.expires_in,
        refresh_at,
        fetched_at: t.requested_at,
        upstream_status: t.status,
    })
}

/// `at + wait`, for waits that come from configuration or upstream: past
/// what an `Instant` can hold, a year from `at` (or `at` itself).
fn later(at: Instant, wait: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    at.checked_add(wait.min(YEAR)).unwrap_or(at)
}

/// Every credential's cache, and which credential serves which terminal.
pub struct Tokens<S> {
    credentials: Vec<Arc<CredentialTokens<S>>>,
    /// Each credential's terminals, by the same index.
    terminals: Vec<Box<[String]>>,
    by_terminal: HashMap<String, usize>,
}

/// What building a [`Tokens`] needs besides the credentials.
pub struct TokensSetup<'a, S> {
    pub source: S,
    pub policy: TokenPolicy,
    pub clock: &'a Clock,
    pub entropy: &'a SharedEntropy,
    /// How many first fetches run at once at start-up.
    pub warm_start_concurrency: usize,
    /// First fetches are spread at random over this long.
    pub warm_start_spread: Duration,
}

impl<S: TokenSource + Clone> Tokens<S> {
    /// Builds every credential's cache, reusing those in `keep` whose name and
    /// API key are unchanged (their tokens survive a reload); new ones start
    /// their first fetch spread out over `warm_start_spread`.
    pub fn new(
        credentials: &[CredentialConfig],
        setup: TokensSetup<'_, S>,
        keep: Option<&Tokens<S>>,
    ) -> Self {
        let gate = Arc::new(tokio::sync::Semaphore::new(
            setup.warm_start_concurrency.max(1),
        ));
        let mut by_terminal = HashMap::new();
        let terminals = credentials
            .iter()
            .map(|c| c.terminals.clone().into_boxed_slice())
            .collect();
        let credentials = credentials
            .iter()
            .enumerate()
            .map(|(i, c)| {
                for t in &c.terminals {
                    by_terminal.insert(t.clone(), i);
                }
                let kept = keep.and_then(|k| {
                    k.credentials
                        .iter()
                        .find(|old| *old.name == *c.name && old.has_api_key(&c.api_key))
                });
                match kept {
                    Some(old) => Arc::clone(old),
                    None => Arc::new(CredentialTokens::spawn(
                        &c.name,
                        c.api_key.clone(),
                        setup.source.clone(),
                        setup.policy,
                        setup.clock.clone(),
                        Arc::clone(setup.entropy),
                        WarmStart {
                            delay: setup.entropy.jitter(setup.warm_start_spread),
                            gate: Some(Arc::clone(&gate)),
                        },
                    )),
                }
            })
            .collect();
        Self {
            credentials,
            terminals,
            by_terminal,
        }
    }

    /// The credential configured as `name`, and its terminals.
    pub fn named(&self, name: &str) -> Option<(&Arc<CredentialTokens<S>>, &[String])> {
        let i = self.credentials.iter().position(|c| *c.name == *name)?;
        Some((&self.credentials[i], &self.terminals[i]))
    }

    /// The credential serving `terminal`.
    pub fn for_terminal(&self, terminal: &str) -> Option<&Arc<CredentialTokens<S>>> {
        self.by_terminal
            .get(terminal)
            .map(|&i| &self.credentials[i])
    }

    pub fn credentials(&self) -> &[Arc<CredentialTokens<S>>] {
        &self.credentials
    }

    /// Completes once every credential's first fetch has finished (either way).
    pub async fn warmed(&self) {
        for c in &self.credentials {
            let mut h = c.health();
            let _ = h.wait_for(|h| *h != TokenHealth::Starting).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A scripted identity service: each fetch pops the next answer (or
    /// repeats the last), after an optional latency, counting calls.
    #[derive(Clone, Default)]
    struct Script(Arc<ScriptInner>);

    #[derive(Default)]
    struct ScriptInner {
        answers: Mutex<Vec<Result<Duration, u16>>>,
        calls: AtomicU32,
        latency: Mutex<Duration>,
    }

    impl Script {
        fn answers(list: &[Result<u64, u16>]) -> Self {
            let s = Script::default();
            *s.0.answers.lock().unwrap() = list
                .iter()
                .rev()
                .map(|a| a.map(Duration::from_secs))
                .collect();
            s
        }
        fn then(&self, list: &[Result<u64, u16>]) {
            *self.0.answers.lock().unwrap() = list
                .iter()
                .rev()
                .map(|a| a.map(Duration::from_secs))
                .collect();
        }
        fn latency(self, d: Duration) -> Self {
            *self.0.latency.lock().unwrap() = d;
            self
        }
        fn calls(&self) -> u32 {
            self.0.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Script {
        fn fetch(
            &self,
            _key: SecretString,
        ) -> impl Future<Output = Result<IdentityToken, UpstreamError>> + Send + 'static {
            let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
            let answer = {
                let mut a = self.0.answers.lock().unwrap();
                if a.len() > 1 { a.pop().unwrap() } else { a[0] }
            };
            let latency = *self.0.latency.lock().unwrap();
            async move {
                let requested_at = Instant::now();
                tokio::time::sleep(latency).await;
                match answer {
                    Ok(lifetime) => Ok(IdentityToken {
                        access_token: SecretString::from(format!("token-{n}")),
                        token_type: "Bearer".into(),
                        expires_in: lifetime,
                        requested_at,
                        scopes: vec!["a".into(), "b".into()],
                        status: 200,
                    }),
                    Err(status) => Err(UpstreamError::Status {
                        endpoint: crate::payroc::Endpoint::Identity,
                        status,
                        problem: None,
                        // The script's 429s say: come back in 30 s.
                        retry_after: (status == 429).then_some(Duration::from_secs(30)),
                    }),
                }
            }
        }
    }

    /// Jitter at a fixed point of its range.
    struct Fixed(f64);
    impl crate::clock::Entropy for Fixed {
        fn uuid_v4(&self) -> uuid::Uuid {
            uuid::Uuid::nil()
        }
        fn fraction(&self) -> f64 {
            self.0
        }
    }

    const FLOOR: Duration = Duration::from_secs(30);

    fn creds_with(script: &Script, refresh: u64, jitter: f64) -> CredentialTokens<Script> {
        CredentialTokens::spawn(
            "acme",
            SecretString::from("key"),
            script.clone(),
            TokenPolicy::new(Duration::from_secs(refresh), FLOOR),
            Clock::starting_at(SystemTime::UNIX_EPOCH),
            Arc::new(Fixed(jitter)),
            WarmStart::default(),
        )
    }

    fn creds(script: &Script, refresh: u64) -> CredentialTokens<Script> {
        creds_with(script, refresh, 0.0)
    }

    fn secret(t: &BearerToken) -> String {
        t.access_token.expose_secret().to_owned()
    }

    /// Lets spawned tasks run until they block (the paused clock only
    /// auto-advances when every task is idle, so this does not move time).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// Moves the paused clock forward, letting due timers and tasks run.
    async fn advance(secs: u64) {
        tokio::time::advance(Duration::from_secs(secs)).await;
        settle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn warm_start_fetches_before_anyone_asks() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        settle().await;
        assert_eq!(script.calls(), 1);
        assert_eq!(*c.health().borrow(), TokenHealth::Usable);
        let t = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&t), "token-0");
        assert_eq!(t.scopes, ["a", "b"]);
        assert_eq!(
            t.expires_at_wall,
            SystemTime::UNIX_EPOCH + Duration::from_secs(3600)
        );
        assert_eq!(script.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_before_the_warm_start_makes_its_fetch_unneeded() {
        let script = Script::answers(&[Ok(3600)]);
        let c = CredentialTokens::spawn(
            "acme",
            SecretString::from("key"),
            script.clone(),
            TokenPolicy::new(Duration::from_secs(300), FLOOR),
            Clock::starting_at(SystemTime::UNIX_EPOCH),
            Arc::new(Fixed(0.0)),
            WarmStart {
                delay: Duration::from_secs(2),
                gate: None,
            },
        );
        c.bearer(FLOOR, None).await.unwrap();
        advance(3).await;
        assert_eq!(script.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_is_renewed_in_the_background_inside_the_window() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds_with(&script, 300, 1.0);
        let t0 = c.bearer(FLOOR, None).await.unwrap();
        // jitter 1.0: renewal at expires - lead - lead/4 = 3225 s.
        assert_eq!(t0.refresh_at, t0.expires_at - Duration::from_secs(375));
        advance(3224).await;
        assert_eq!(script.calls(), 1);
        assert!(Arc::ptr_eq(&t0, &c.bearer(FLOOR, None).await.unwrap()));
        advance(1).await;
        assert_eq!(script.calls(), 2, "renewed with nobody asking");
        assert_eq!(secret(&c.bearer(FLOOR, None).await.unwrap()), "token-1");
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_points_are_spread_out_before_the_configured_lead() {
        // Never later than the configured lead (300 s), spread over a quarter
        // of it before.
        for (jitter, expect) in [(0.0, 300), (0.5, 337), (0.999, 375)] {
            let script = Script::answers(&[Ok(3600)]);
            let c = creds_with(&script, 300, jitter);
            let t = c.bearer(FLOOR, None).await.unwrap();
            let lead = t.expires_at - t.refresh_at;
            assert!(
                lead.as_secs().abs_diff(expect) <= 1,
                "jitter {jitter}: {lead:?}"
            );
            assert!(lead >= Duration::from_secs(300));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn callers_are_served_the_old_token_while_the_renewal_is_slow() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        *script.0.latency.lock().unwrap() = Duration::from_secs(20);
        advance(3300).await; // the renewal starts and takes 20 s
        assert_eq!(script.calls(), 2);
        let during = tokio::time::timeout(Duration::ZERO, c.bearer(FLOOR, None)).await;
        assert_eq!(secret(&during.expect("no waiting").unwrap()), "token-0");
        advance(20).await;
        assert_eq!(secret(&c.bearer(FLOOR, None).await.unwrap()), "token-1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_never_undercut() {
        let script = Script::answers(&[Ok(3600)]);
        // A refresh lead shorter than the floor: the floor still wins.
        let c = creds(&script, 10);
        c.bearer(FLOOR, None).await.unwrap();
        script.then(&[Err(503)]); // and renewal keeps failing
        tokio::time::advance(Duration::from_secs(3600 - 29)).await;
        let e = c.bearer(FLOOR, None).await.err().unwrap();
        assert!(
            matches!(e, TokenError::Upstream(_) | TokenError::BackingOff { .. }),
            "{e:?}"
        );
        assert_eq!(*c.health().borrow(), TokenHealth::Unusable);
    }

    #[tokio::test(start_paused = true)]
    async fn min_validity_forces_a_refresh_or_is_out_of_range() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        advance(1200).await;
        // 40 min left; asking for 50 min fetches a fresh one.
        let t = c.bearer(Duration::from_secs(3000), None).await.unwrap();
        assert_eq!(secret(&t), "token-1");
        // Longer than any token lives: refused without a fetch.
        let e = c
            .bearer(Duration::from_secs(3601), None)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, TokenError::OutOfRange { .. }), "{e:?}");
        assert_eq!(script.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_lead_is_clamped_to_half_the_lifetime() {
        let script = Script::answers(&[Ok(120)]);
        let c = creds(&script, 300); // 5 min lead on a 2 min token
        let t = c.bearer(Duration::ZERO, None).await.unwrap();
        assert_eq!(t.refresh_at, t.expires_at - Duration::from_secs(60));
        advance(59).await;
        assert_eq!(script.calls(), 1, "not renewed before its time");
        advance(1).await;
        assert_eq!(script.calls(), 2);

        // A lead shorter than the lifetime is taken as configured, even when
        // it is more than half.
        let script = Script::answers(&[Ok(120)]);
        let c = creds(&script, 100);
        let t = c.bearer(Duration::ZERO, None).await.unwrap();
        assert_eq!(t.refresh_at, t.expires_at - Duration::from_secs(100));
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_happens_before_the_token_drops_under_the_floor() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 10); // lead 10 s, floor 30 s
        let t = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(t.refresh_at, t.expires_at - FLOOR);
    }

    #[tokio::test(start_paused = true)]
    async fn a_min_validity_no_fresh_token_can_meet_is_refused_without_fetching() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        advance(1).await; // 3599 s left: not enough for any of these
        for secs in [3600.0, 3599.5, 7200.0] {
            let e = c
                .bearer(Duration::from_secs_f64(secs), None)
                .await
                .err()
                .unwrap();
            assert!(matches!(e, TokenError::OutOfRange { .. }), "{secs}: {e:?}");
        }
        assert_eq!(
            script.calls(),
            1,
            "no fetch for a request that cannot be met"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_token_is_refetched_in_the_background_with_backoff() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        let t = c.bearer(FLOOR, None).await.unwrap();
        script.then(&[Err(503)]);
        assert!(c.invalidate(&t));
        for _ in 0..10 {
            advance(1).await;
        }
        let calls = script.calls();
        assert!(
            (3..=10).contains(&calls),
            "retried in the background, backing off: {calls}"
        );
        assert_eq!(*c.health().borrow(), TokenHealth::Unusable);
        script.then(&[Ok(3600)]);
        for _ in 0..20 {
            advance(1).await;
        }
        assert_eq!(*c.health().borrow(), TokenHealth::Usable);
        assert!(c.cached().is_some(), "recovered with no caller asking");
    }

    #[tokio::test(start_paused = true)]
    async fn identity_retry_after_is_honoured_by_the_negative_cache() {
        let script = Script::answers(&[Err(429)]);
        let c = creds(&script, 300);
        settle().await;
        assert_eq!(script.calls(), 1);
        match c.bearer(FLOOR, None).await {
            Err(TokenError::BackingOff { error, retry_in }) => {
                assert_eq!(error.status(), Some(429));
                assert_eq!(
                    retry_in,
                    Duration::from_secs(30),
                    "Payroc's Retry-After, not our 0.5 s"
                );
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        advance(29).await;
        assert_eq!(script.calls(), 1, "not before Retry-After");
        advance(1).await;
        assert_eq!(script.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_lifetime_is_a_malformed_answer_and_the_cache_recovers() {
        for lifetime in [u64::MAX, 24 * 3600 + 1] {
            let script = Script::answers(&[Ok(lifetime)]);
            let c = creds(&script, 300);
            match c.bearer(FLOOR, None).await {
                Err(TokenError::Upstream(UpstreamError::Malformed { .. })) => {}
                other => panic!("{lifetime}: {:?}", other.map(|_| ())),
            }
            assert!(c.cached().is_none(), "nothing cached");
            script.then(&[Ok(3600)]);
            advance(2).await; // past the backoff; the refresher recovers
            let t = c.bearer(FLOOR, None).await.unwrap();
            assert_eq!(t.lifetime, Duration::from_secs(3600));
        }
    }

    /// 1,000 watchers follow three rotations; returns what each saw.
    async fn watch_three_rotations(
        c: &Arc<CredentialTokens<Script>>,
        min_validity: Duration,
    ) -> Vec<Vec<String>> {
        let first = c.bearer(min_validity, None).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let (c, first) = (Arc::clone(c), Arc::clone(&first));
            tasks.push(tokio::spawn(async move {
                let mut changes = c.subscribe();
                let mut last = first;
                let mut seen = Vec::new();
                for _ in 0..3 {
                    let next = c
                        .replacement(&mut changes, &last, min_validity)
                        .await
                        .unwrap();
                    let now = Instant::now();
                    assert!(next.remaining(now) >= min_validity);
                    assert!(
                        last.remaining(now) >= min_validity,
                        "sent before the previous token fell under min_validity"
                    );
                    seen.push(secret(&next));
                    last = next;
                }
                seen
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.unwrap());
        }
        all
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_watchers_follow_the_background_renewals_at_no_extra_cost() {
        let script = Script::answers(&[Ok(3600)]);
        let c = Arc::new(creds(&script, 300));
        let seen = watch_three_rotations(&c, FLOOR).await;
        for s in seen {
            assert_eq!(s, ["token-1", "token-2", "token-3"]);
        }
        assert_eq!(script.calls(), 4, "one identity request per rotation");
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_needing_more_than_the_refresh_lead_share_one_early_refresh() {
        let script = Script::answers(&[Ok(3600)]).latency(Duration::from_millis(300));
        // Renewal 300 s before expiry would be too late for 600 s watchers.
        let c = Arc::new(creds(&script, 300));
        let seen = watch_three_rotations(&c, Duration::from_secs(600)).await;
        for s in seen {
            assert_eq!(s, ["token-1", "token-2", "token-3"]);
        }
        assert_eq!(script.calls(), 4, "one identity request per rotation");
    }

    /// A watcher of `c` with `min`, from `first`, as a task.
    fn spawn_watcher(
        c: &Arc<CredentialTokens<Script>>,
        first: Arc<BearerToken>,
        min: Duration,
    ) -> tokio::task::JoinHandle<Result<String, TokenError>> {
        let c = Arc::clone(c);
        tokio::spawn(async move {
            let mut changes = c.subscribe();
            c.replacement(&mut changes, &first, min)
                .await
                .map(|t| secret(&t))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_retries_a_failed_refresh_while_its_token_still_serves() {
        let script = Script::answers(&[Ok(3600)]);
        let c = Arc::new(creds(&script, 300));
        let min = Duration::from_secs(600);
        let first = c.bearer(min, None).await.unwrap();
        script.then(&[Err(503), Ok(3600)]);
        let watcher = spawn_watcher(&c, first, min);
        // The watcher's refresh point is 3600 - 601 s; its fetch fails, the
        // retry 0.5 s later (the backoff) succeeds with time to spare.
        advance(2999).await;
        assert_eq!(script.calls(), 2);
        advance(1).await;
        assert_eq!(script.calls(), 3);
        assert_eq!(watcher.await.unwrap().unwrap(), "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_whose_token_falls_under_min_validity_unreplaced_gets_the_failure() {
        let script = Script::answers(&[Ok(3600)]);
        let c = Arc::new(creds(&script, 300));
        let min = Duration::from_secs(600);
        let first = c.bearer(min, None).await.unwrap();
        script.then(&[Err(503)]);
        let watcher = spawn_watcher(&c, first, min);
        advance(2999).await;
        assert!(!watcher.is_finished(), "still 601 s left");
        for _ in 0..3 {
            advance(1).await;
        }
        // Silence would leave the client holding a token under its
        // min_validity without knowing why; it hears the failure instead.
        assert!(watcher.is_finished());
        match watcher.await.unwrap() {
            Err(TokenError::BackingOff { error, .. }) => assert_eq!(error.status(), Some(503)),
            other => panic!("{other:?}"),
        }
        let failed = script.calls() - 1;
        assert!((1..=4).contains(&failed), "{failed} attempts");
    }

    #[tokio::test(start_paused = true)]
    async fn min_validity_near_the_lifetime_cannot_make_a_credential_fetch_every_second() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        // 2 s short of the lifetime: a fetch would serve it for about a
        // second. Refused once the token has less left, and no fetch.
        for i in 0..30 {
            advance(1).await;
            match c.bearer(Duration::from_secs(3598), None).await {
                Ok(t) => assert!(i < 2 && secret(&t) == "token-0"),
                Err(TokenError::OutOfRange { .. }) => assert!(i >= 2),
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(script.calls(), 1);
        // 10 s short: served every time, by at most one fetch per 10 s.
        for _ in 0..100 {
            advance(1).await;
            let t = c.bearer(Duration::from_secs(3590), None).await.unwrap();
            assert!(t.remaining(Instant::now()) >= Duration::from_secs(3590));
        }
        let fetched = script.calls() - 1;
        assert!((9..=11).contains(&fetched), "{fetched} fetches in 100 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_min_validity_needing_refetches_closer_than_10_s_is_out_of_range() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        let t = c.bearer(FLOOR, None).await.unwrap();
        assert!(c.check_watchable(Duration::from_secs(3589), &t).is_ok());
        let e = c.check_watchable(Duration::from_secs(3590), &t).err();
        assert!(matches!(e, Some(TokenError::OutOfRange { .. })), "{e:?}");
        // And a watcher that needed one anyway (its replacement came too
        // old) is refused rather than allowed to fetch again at once.
        let mut changes = c.subscribe();
        let young = c.bearer(FLOOR, None).await.unwrap();
        let e = c
            .replacement(&mut changes, &young, Duration::from_secs(3595))
            .await
            .err();
        assert!(matches!(e, Some(TokenError::OutOfRange { .. })), "{e:?}");
        assert_eq!(script.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_waiters_cause_one_identity_request() {
        let script = Script::answers(&[Ok(3600)]).latency(Duration::from_millis(200));
        let c = Arc::new(creds(&script, 300));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let c = Arc::clone(&c);
            tasks.push(tokio::spawn(async move {
                c.bearer(FLOOR, None).await.map(|t| secret(&t))
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "token-0");
        }
        assert_eq!(script.calls(), 1);
        assert_eq!(c.loads_started(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_serving_the_valid_token_and_retries_with_backoff() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds_with(&script, 300, 0.0);
        let t = c.bearer(FLOOR, None).await.unwrap();
        script.then(&[Err(503)]);
        // Identity down from the renewal point (3300 s) for 200 s.
        advance(3300).await;
        let mut attempts = vec![script.calls()];
        for _ in 0..200 {
            advance(1).await;
            let still = c.bearer(FLOOR, None).await.unwrap();
            assert!(
                Arc::ptr_eq(&t, &still),
                "every caller still gets the valid token"
            );
            attempts.push(script.calls());
        }
        assert_eq!(*c.health().borrow(), TokenHealth::Usable);
        // Backoff 0.5, 1, 2, 4, 8, 15, 15, ... s (equal jitter at 0): about
        // 17 attempts in 200 s, not 200.
        let failed = script.calls() - 1;
        assert!(
            (10..=20).contains(&failed),
            "{failed} attempts in 200 s: {attempts:?}"
        );
        script.then(&[Ok(3600)]);
        advance(16).await;
        assert_ne!(
            secret(&c.bearer(FLOOR, None).await.unwrap()),
            "token-0",
            "recovered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_usable_token_callers_fail_fast_and_do_not_storm() {
        let script = Script::answers(&[Err(503)]);
        let c = Arc::new(creds(&script, 300));
        settle().await;
        assert_eq!(script.calls(), 1, "the warm start failed");
        assert_eq!(*c.health().borrow(), TokenHealth::Unusable);
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let c = Arc::clone(&c);
            tasks.push(tokio::spawn(async move { c.bearer(FLOOR, None).await }));
        }
        for t in tasks {
            match t.await.unwrap() {
                Err(TokenError::BackingOff { error, retry_in }) => {
                    assert_eq!(error.status(), Some(503));
                    assert!(retry_in <= Duration::from_secs(1), "{retry_in:?}");
                }
                other => panic!("expected a fast failure, got {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(script.calls(), 1, "100 callers, no extra identity request");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_give_up_at_their_deadline_but_the_fetch_goes_on() {
        let script = Script::answers(&[Ok(3600)]).latency(Duration::from_secs(5));
        let c = creds(&script, 300);
        let e = c
            .bearer(FLOOR, Some(Instant::now() + Duration::from_secs(1)))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, TokenError::DeadlineExceeded), "{e:?}");
        let t = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&t), "token-0");
        assert_eq!(
            script.calls(),
            1,
            "the second caller joined the first fetch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_by_many_callers_causes_one_refresh() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        let used = c.bearer(FLOOR, None).await.unwrap();
        let dropped: Vec<bool> = (0..50).map(|_| c.invalidate(&used)).collect();
        assert_eq!(dropped.iter().filter(|d| **d).count(), 1);
        let fresh = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&fresh), "token-1");
        assert!(
            !c.invalidate(&used),
            "a late 401 on the old token keeps the new one"
        );
        assert_eq!(script.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_cache_stops_its_refresher() {
        let script = Script::answers(&[Ok(120)]);
        let c = creds(&script, 300);
        settle().await;
        drop(c);
        advance(3600).await;
        assert_eq!(script.calls(), 1);
    }

    fn config(name: &str, key: &str, terminals: &[&str]) -> CredentialConfig {
        CredentialConfig {
            name: name.into(),
            api_key: SecretString::from(key.to_owned()),
            terminals: terminals.iter().map(|t| t.to_string()).collect(),
            api_key_file: None,
        }
    }

    fn setup<'a>(
        script: &Script,
        clock: &'a Clock,
        entropy: &'a SharedEntropy,
        spread: u64,
    ) -> TokensSetup<'a, Script> {
        TokensSetup {
            source: script.clone(),
            policy: TokenPolicy::new(Duration::from_secs(300), FLOOR),
            clock,
            entropy,
            warm_start_concurrency: 2,
            warm_start_spread: Duration::from_secs(spread),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn warm_start_is_spread_out_and_reload_keeps_unchanged_credentials() {
        let script = Script::answers(&[Ok(3600)]);
        let clock = Clock::starting_at(SystemTime::UNIX_EPOCH);
        let entropy: SharedEntropy = Arc::new(crate::clock::OsEntropy);
        let creds: Vec<_> = (0..6)
            .map(|i| config(&format!("c{i}"), &format!("k{i}"), &[&format!("100{i}")]))
            .collect();
        let tokens = Tokens::new(&creds, setup(&script, &clock, &entropy, 10), None);
        settle().await;
        assert!(script.calls() < 6, "first fetches are spread over 10 s");
        tokio::time::timeout(Duration::from_secs(11), tokens.warmed())
            .await
            .expect("warm within the spread");
        assert_eq!(script.calls(), 6);

        // Reload: c0 unchanged, c1 with a rotated key, c2..c5 removed, c6 new.
        let next = vec![
            config("c0", "k0", &["1000", "2000"]),
            config("c1", "k1-rotated", &["1001"]),
            config("c6", "k6", &["1006"]),
        ];
        let old_c0 = tokens.for_terminal("1000").unwrap().cached().unwrap();
        let reloaded = Tokens::new(&next, setup(&script, &clock, &entropy, 0), Some(&tokens));
        drop(tokens);
        settle().await;
        assert_eq!(
            script.calls(),
            8,
            "only the rotated and the new credential fetch"
        );
        let kept = reloaded.for_terminal("2000").unwrap().cached().unwrap();
        assert!(
            Arc::ptr_eq(&old_c0, &kept),
            "c0's token survived the reload"
        );
        assert!(reloaded.for_terminal("1002").is_none());
        assert_eq!(&*reloaded.for_terminal("1006").unwrap().name, "c6");
    }
}
