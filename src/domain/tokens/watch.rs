//! Following a credential's token: WatchBearerToken's subscription, the
//! check that a watcher's `min_validity` can be kept, and the wait for each
//! replacement.

use std::{pin::Pin, sync::Arc, time::Duration};

use tokio::{sync::watch, time::Sleep};

use super::{
    BearerToken, TokenError, TokenSource,
    credential::CredentialTokens,
    policy::{FETCH_ALLOWANCE, refetch_spacing, satisfiable},
};

/// A watcher's timer for [`CredentialTokens::replacement`], kept by the
/// watcher from one token to the next (`None` until the first). A timer
/// made and dropped per token cost every watcher two trips through the
/// timer wheel's lock each time a token was replaced, all watchers at once;
/// one kept is moved to a later deadline each time, which tokio does
/// without the lock (BENCHMARKS.md has the measured effect).
pub type WatchTimer = Option<Pin<Box<Sleep>>>;

impl<S: TokenSource> CredentialTokens<S> {
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
    ///
    /// `timer` is the watcher's own (see [`WatchTimer`]).
    pub async fn replacement(
        &self,
        changes: &mut watch::Receiver<Option<Arc<BearerToken>>>,
        last: &Arc<BearerToken>,
        min_validity: Duration,
        timer: &mut WatchTimer,
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
            let timer = match timer {
                Some(t) => {
                    t.as_mut().reset(due);
                    t
                }
                None => timer.insert(Box::pin(tokio::time::sleep_until(due))),
            };
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(TokenError::Aborted);
                    }
                }
                () = timer.as_mut() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::{testing::*, *};

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
                let mut timer = None;
                let mut last = first;
                let mut seen = Vec::new();
                for _ in 0..3 {
                    let next = c
                        .replacement(&mut changes, &last, min_validity, &mut timer)
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
            c.replacement(&mut changes, &first, min, &mut None)
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
            .replacement(&mut changes, &young, Duration::from_secs(3595), &mut None)
            .await
            .err();
        assert!(matches!(e, Some(TokenError::OutOfRange { .. })), "{e:?}");
        assert_eq!(script.calls(), 1);
    }
}
