//! Bearer tokens, cached per credential and shared by every caller.
//!
//! Policy on top of [`SingleFlight`]: a token is served while it has at least
//! the requested validity left; inside the refresh window
//! (`refresh_before_expiry`, clamped to half the token's lifetime) it is still
//! served while one background refresh runs; a failed refresh leaves it in
//! place. Only when no cached token is good enough does a caller wait, and
//! then on the one shared identity request.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use secrecy::SecretString;
use tokio::time::Instant;

use crate::{
    cell::{FlightError, SingleFlight},
    clock::Clock,
    config::CredentialConfig,
    payroc::{IdentityToken, PayrocClient, UpstreamError},
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
    /// From here on, a background refresh is started on use.
    pub refresh_at: Instant,
}

impl BearerToken {
    /// The time left at `now`, zero once expired.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }
}

/// Why no token could be had.
#[derive(Debug, Clone)]
pub enum TokenError {
    /// The identity request failed.
    Upstream(UpstreamError),
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
        // No deadline: the load is shared, so no one caller's deadline may cut
        // it short. Attempts and request_timeout bound it; callers stop
        // waiting at their own deadlines.
        async move { client.fetch_bearer(&api_key, None).await }
    }
}

/// Timing policy of the cache.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    pub refresh_before_expiry: Duration,
}

/// One credential's token cache.
pub struct CredentialTokens<S> {
    pub name: Arc<str>,
    api_key: SecretString,
    cell: Arc<SingleFlight<BearerToken, UpstreamError>>,
    source: S,
    policy: TokenPolicy,
    clock: Clock,
}

impl<S: TokenSource + Clone> CredentialTokens<S> {
    pub fn new(
        name: &str,
        api_key: SecretString,
        source: S,
        policy: TokenPolicy,
        clock: Clock,
    ) -> Self {
        Self {
            name: name.into(),
            api_key,
            cell: SingleFlight::new(),
            source,
            policy,
            clock,
        }
    }

    /// A token valid for at least `min_validity`, waiting at most until
    /// `deadline`.
    pub async fn bearer(
        &self,
        min_validity: Duration,
        deadline: Option<Instant>,
    ) -> Result<Arc<BearerToken>, TokenError> {
        // Fast path: one atomic load and a comparison.
        if let Some(tok) = self.cell.current() {
            let now = self.clock.now();
            if tok.remaining(now) >= min_validity {
                if now >= tok.refresh_at {
                    self.refresh_in_background();
                }
                return Ok(tok);
            }
            if min_validity > tok.lifetime {
                return Err(TokenError::OutOfRange {
                    requested: min_validity,
                    lifetime: tok.lifetime,
                });
            }
        }
        let flight = self.start_load();
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
        if tok.remaining(self.clock.now()) >= min_validity {
            Ok(tok)
        } else {
            Err(TokenError::OutOfRange {
                requested: min_validity,
                lifetime: tok.lifetime,
            })
        }
    }

    /// Forgets `used` if it is still the cached token (Payroc rejected it).
    pub fn invalidate(&self, used: &Arc<BearerToken>) -> bool {
        let dropped = self.cell.invalidate(used);
        if dropped {
            tracing::info!(credential = %self.name, "Payroc rejected the cached Bearer token; fetching a new one");
        }
        dropped
    }

    /// Identity requests started so far.
    pub fn loads_started(&self) -> u64 {
        self.cell.loads_started()
    }

    /// The cached token, whatever its state.
    pub fn cached(&self) -> Option<Arc<BearerToken>> {
        self.cell.current()
    }

    fn refresh_in_background(&self) {
        if !self.cell.is_loading() {
            drop(self.start_load());
        }
    }

    fn start_load(&self) -> crate::cell::Flight<BearerToken, UpstreamError> {
        self.cell.load(|| {
            let fetch = self.source.fetch(self.api_key.clone());
            let clock = self.clock.clone();
            let policy = self.policy;
            let name = Arc::clone(&self.name);
            async move {
                match fetch.await {
                    Ok(t) => {
                        let tok = cache_entry(t, policy, &clock);
                        tracing::info!(credential = %name, lifetime = ?tok.lifetime, "fetched a Bearer token");
                        Ok(tok)
                    }
                    Err(e) => {
                        tracing::warn!(credential = %name, error = %e, "fetching a Bearer token failed");
                        Err(e)
                    }
                }
            }
        })
    }
}

/// Turns an identity answer into a cache entry. Expiry counts from when the
/// request was sent; the refresh lead is clamped to half the lifetime so a
/// short-lived token is not refreshed on every use.
fn cache_entry(t: IdentityToken, policy: TokenPolicy, clock: &Clock) -> BearerToken {
    let expires_at = t.requested_at + t.expires_in;
    let lead = policy.refresh_before_expiry.min(t.expires_in / 2);
    BearerToken {
        access_token: t.access_token,
        token_type: t.token_type,
        scopes: t.scopes,
        expires_at,
        expires_at_wall: clock.wall(expires_at),
        lifetime: t.expires_in,
        refresh_at: expires_at - lead,
    }
}

/// Every credential's cache, and which credential serves which terminal.
pub struct Tokens<S> {
    credentials: Vec<Arc<CredentialTokens<S>>>,
    by_terminal: HashMap<String, usize>,
}

impl<S: TokenSource + Clone> Tokens<S> {
    pub fn new(
        credentials: &[CredentialConfig],
        source: S,
        policy: TokenPolicy,
        clock: &Clock,
    ) -> Self {
        let mut by_terminal = HashMap::new();
        let credentials = credentials
            .iter()
            .enumerate()
            .map(|(i, c)| {
                for t in &c.terminals {
                    by_terminal.insert(t.clone(), i);
                }
                Arc::new(CredentialTokens::new(
                    &c.name,
                    c.api_key.clone(),
                    source.clone(),
                    policy,
                    clock.clone(),
                ))
            })
            .collect();
        Self {
            credentials,
            by_terminal,
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    };

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
                    }),
                    Err(status) => Err(UpstreamError::Status {
                        endpoint: crate::payroc::Endpoint::Identity,
                        status,
                        problem: None,
                        retry_after: None,
                    }),
                }
            }
        }
    }

    fn creds(script: &Script, refresh: u64) -> CredentialTokens<Script> {
        CredentialTokens::new(
            "acme",
            SecretString::from("key"),
            script.clone(),
            TokenPolicy {
                refresh_before_expiry: Duration::from_secs(refresh),
            },
            Clock::starting_at(SystemTime::UNIX_EPOCH),
        )
    }

    fn secret(t: &BearerToken) -> String {
        use secrecy::ExposeSecret;
        t.access_token.expose_secret().to_owned()
    }

    const FLOOR: Duration = Duration::from_secs(30);

    /// Lets spawned refresh tasks run to completion (the paused clock
    /// auto-advances only when every task is idle).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_token_is_shared_until_the_refresh_window() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        let t0 = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&t0), "token-0");
        assert_eq!(t0.scopes, ["a", "b"]);
        tokio::time::advance(Duration::from_secs(3000)).await;
        let again = c.bearer(FLOOR, None).await.unwrap();
        assert!(Arc::ptr_eq(&t0, &again));
        assert_eq!(script.calls(), 1);
        assert_eq!(
            t0.expires_at_wall,
            SystemTime::UNIX_EPOCH + Duration::from_secs(3600)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_ahead_serves_the_old_token_while_fetching_a_new_one() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        tokio::time::advance(Duration::from_secs(3301)).await; // inside the 5 min window
        let during = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(
            secret(&during),
            "token-0",
            "no caller waits while a valid token is cached"
        );
        settle().await;
        assert_eq!(script.calls(), 2);
        let after = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&after), "token-1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_never_undercut() {
        let script = Script::answers(&[Ok(3600)]);
        // refresh lead shorter than the floor: the floor still wins.
        let c = creds(&script, 10);
        c.bearer(FLOOR, None).await.unwrap();
        tokio::time::advance(Duration::from_secs(3600 - 29)).await;
        let t = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&t), "token-1", "29 s left is under the 30 s floor");
        assert!(t.remaining(Instant::now()) >= FLOOR);
    }

    #[tokio::test(start_paused = true)]
    async fn min_validity_forces_a_refresh_or_is_out_of_range() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        tokio::time::advance(Duration::from_secs(1200)).await;
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
        tokio::time::advance(Duration::from_secs(30)).await;
        c.bearer(Duration::ZERO, None).await.unwrap();
        settle().await;
        assert_eq!(script.calls(), 1, "not refreshed on every use");
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_waiters_cause_one_identity_request() {
        let script = Script::answers(&[Ok(3600)]);
        *script.0.latency.lock().unwrap() = Duration::from_millis(200);
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
    async fn a_failed_refresh_keeps_serving_the_valid_token() {
        let script = Script::answers(&[Ok(3600), Err(503)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        tokio::time::advance(Duration::from_secs(3400)).await;
        let t = c.bearer(FLOOR, None).await.unwrap();
        settle().await;
        assert_eq!(script.calls(), 2, "the refresh was attempted");
        let still = c.bearer(FLOOR, None).await.unwrap();
        assert!(
            Arc::ptr_eq(&t, &still),
            "the failure did not evict the valid token"
        );
        // Past the floor the token is no longer served, and the failure shows.
        tokio::time::advance(Duration::from_secs(180)).await;
        let e = c.bearer(FLOOR, None).await.err().unwrap();
        assert!(
            matches!(
                e,
                TokenError::Upstream(UpstreamError::Status { status: 503, .. })
            ),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_give_up_at_their_deadline_but_the_load_goes_on() {
        let script = Script::answers(&[Ok(3600)]);
        *script.0.latency.lock().unwrap() = Duration::from_secs(5);
        let c = creds(&script, 300);
        let e = c
            .bearer(FLOOR, Some(Instant::now() + Duration::from_secs(1)))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, TokenError::DeadlineExceeded), "{e:?}");
        let t = c.bearer(FLOOR, None).await.unwrap();
        assert_eq!(secret(&t), "token-0");
        assert_eq!(script.calls(), 1, "the second caller joined the first load");
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
}
