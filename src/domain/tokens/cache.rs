//! One credential's cache state: the single-flight cell holding its token,
//! the last failure (the negative cache), health, and the booking of every
//! fetch's outcome. The handle ([`super::CredentialTokens`]), the refresher
//! and watchers all work through it.

use std::{future::Future, sync::Arc, sync::Mutex, time::Duration};

use secrecy::SecretString;
use tokio::{sync::watch, time::Instant};

use crate::{
    clock::{Clock, SharedEntropy},
    domain::cell::{Flight, SingleFlight},
    payroc::{IdentityToken, UpstreamError},
    sync::lock,
};

use super::{
    BearerToken, TokenError, TokenHealth, TokenSource,
    policy::{MAX_RETRY_AFTER, TokenPolicy, cache_entry, later},
};

/// The last failed fetch.
struct Failure {
    error: UpstreamError,
    retry_at: Instant,
    consecutive: u32,
}

pub(super) struct Inner<S> {
    pub(super) name: Arc<str>,
    pub(super) api_key: SecretString,
    pub(super) source: S,
    pub(super) policy: TokenPolicy,
    pub(super) clock: Clock,
    pub(super) entropy: SharedEntropy,
    pub(super) cell: Arc<SingleFlight<BearerToken, UpstreamError>>,
    /// Locked only off the hit path (misses, fetch outcomes, the refresher).
    failure: Mutex<Option<Failure>>,
    pub(super) health: watch::Sender<TokenHealth>,
    /// Wakes the refresher when its plan changed: the token was dropped, or a
    /// fetch failed and set a new retry time.
    pub(super) replan: tokio::sync::Notify,
}

impl<S: TokenSource> Inner<S> {
    pub(super) fn new(
        name: &str,
        api_key: SecretString,
        source: S,
        policy: TokenPolicy,
        clock: Clock,
        entropy: SharedEntropy,
    ) -> Self {
        Self {
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
        }
    }

    pub(super) fn load(self: &Arc<Self>) -> Flight<BearerToken, UpstreamError> {
        self.cell.load(self.fetcher())
    }

    /// A load, unless the cached token is no longer `seen`.
    pub(super) fn load_unless_replaced(
        self: &Arc<Self>,
        seen: &Option<Arc<BearerToken>>,
    ) -> Option<Flight<BearerToken, UpstreamError>> {
        self.cell.load_unless_replaced(Some(seen), self.fetcher())
    }

    pub(super) fn fetcher(
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
    pub(super) fn record(
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
    pub(super) fn backoff(&self, consecutive: u32) -> Duration {
        let step = self
            .policy
            .failure_backoff
            .saturating_mul(1 << (consecutive - 1).min(16))
            .min(self.policy.max_failure_backoff);
        step / 2 + self.entropy.jitter(step / 2)
    }

    pub(super) fn backing_off(&self) -> Option<TokenError> {
        let now = self.clock.now();
        let failure = lock(&self.failure);
        let f = failure.as_ref()?;
        (now < f.retry_at).then(|| TokenError::BackingOff {
            error: f.error.clone(),
            retry_in: f.retry_at - now,
        })
    }

    pub(super) fn consecutive_failures(&self) -> u32 {
        lock(&self.failure).as_ref().map_or(0, |f| f.consecutive)
    }

    pub(super) fn retry_at(&self) -> Option<Instant> {
        lock(&self.failure).as_ref().map(|f| f.retry_at)
    }

    pub(super) fn usable_now(&self) -> bool {
        self.cell
            .current()
            .is_some_and(|t| t.remaining(self.clock.now()) >= self.policy.floor)
    }

    pub(super) fn set_health(&self, h: TokenHealth) {
        self.health
            .send_if_modified(|cur| std::mem::replace(cur, h) != h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::{testing::*, *};

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
}
