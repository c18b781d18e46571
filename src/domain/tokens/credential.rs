//! The handle on one credential's tokens: the hit path every call takes,
//! the shared miss, invalidation when Payroc rejects a token, and what
//! health checks and reloads read.

use std::{sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use tokio::{sync::watch, task::AbortHandle, time::Instant};

use crate::{
    clock::{Clock, SharedEntropy},
    domain::cell::FlightError,
};

use super::{
    BearerToken, TokenError, TokenHealth, TokenSource,
    cache::Inner,
    policy::{TokenPolicy, satisfiable},
    refresh::{WarmStart, refresh_forever},
};

/// One credential's token cache and its background refresher (stopped when
/// this is dropped).
pub struct CredentialTokens<S> {
    pub name: Arc<str>,
    pub(super) inner: Arc<Inner<S>>,
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
        let inner = Arc::new(Inner::new(name, api_key, source, policy, clock, entropy));
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
        // Boxed: the wait (a timer and the flight's waiter, a few hundred
        // bytes) would otherwise be carried and copied by every call's
        // future, hit or miss, up through every handler; a miss goes on to
        // wait for an HTTP exchange anyway.
        Box::pin(self.loaded(min_validity, deadline)).await
    }

    /// The miss path of [`Self::bearer_observed`]: the token of the fetch in
    /// flight (started if none is), by `deadline`.
    async fn loaded(
        &self,
        min_validity: Duration,
        deadline: Option<Instant>,
    ) -> Result<(Arc<BearerToken>, Option<u16>), TokenError> {
        let inner = &*self.inner;
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
        self.inner.consecutive_failures()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::{testing::*, *};

    /// The hit path allocates nothing: an atomic load, a comparison and an
    /// `Arc` clone (the handler's response strings are the RPC's own).
    #[tokio::test(start_paused = true)]
    async fn a_cache_hit_allocates_nothing() {
        use std::future::Future;
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        let first = c.bearer(FLOOR, None).await.unwrap();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let (hits, n) = allocations(|| {
            (0..100)
                .map(|_| {
                    let mut hit = std::pin::pin!(c.bearer(FLOOR, None));
                    match hit.as_mut().poll(&mut cx) {
                        std::task::Poll::Ready(Ok(t)) => Arc::ptr_eq(&t, &first),
                        std::task::Poll::Ready(Err(e)) => panic!("a hit failed: {e:?}"),
                        std::task::Poll::Pending => panic!("a hit is ready at once"),
                    }
                })
                .filter(|same| *same)
                .count()
        });
        assert_eq!(hits, 100, "every call is served the cached token");
        assert_eq!(n, 0, "allocations on 100 cache hits");
        // The counter does see allocations: a miss (40 minutes left, 50
        // asked for) starts a fetch, which makes some.
        advance(1200).await;
        let (_, n) = allocations(|| {
            let mut miss = std::pin::pin!(c.bearer(Duration::from_secs(3000), None));
            let _ = miss.as_mut().poll(&mut cx);
        });
        assert!(n > 0, "a miss starts a fetch, which allocates");
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
}
