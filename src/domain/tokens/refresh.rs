//! The background refresher: the warm start, renewal ahead of expiry, retries
//! after failures, and health when nothing can be fetched.

use std::{sync::Arc, time::Duration};

use super::{TokenHealth, TokenSource, cache::Inner};

/// How a credential's first fetch is scheduled at start-up.
#[derive(Clone, Default)]
pub struct WarmStart {
    /// Waited before the first fetch (spreads credentials out).
    pub delay: Duration,
    /// Bounds how many first fetches run at once.
    pub gate: Option<Arc<tokio::sync::Semaphore>>,
}

/// The background refresher: warm start, then renew at each token's
/// `refresh_at`, backing off after failures; also reports the moment a token
/// stops being usable, so health follows even when nothing can be fetched.
pub(super) async fn refresh_forever<S: TokenSource>(inner: Arc<Inner<S>>, warm: WarmStart) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::Clock,
        domain::tokens::{testing::*, *},
    };
    use secrecy::SecretString;
    use std::time::SystemTime;

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
    async fn callers_are_served_the_old_token_while_the_renewal_is_slow() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        c.bearer(FLOOR, None).await.unwrap();
        script.set_latency(Duration::from_secs(20));
        advance(3300).await; // the renewal starts and takes 20 s
        assert_eq!(script.calls(), 2);
        let during = tokio::time::timeout(Duration::ZERO, c.bearer(FLOOR, None)).await;
        assert_eq!(secret(&during.expect("no waiting").unwrap()), "token-0");
        advance(20).await;
        assert_eq!(secret(&c.bearer(FLOOR, None).await.unwrap()), "token-1");
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
    async fn dropping_the_cache_stops_its_refresher() {
        let script = Script::answers(&[Ok(120)]);
        let c = creds(&script, 300);
        settle().await;
        drop(c);
        advance(3600).await;
        assert_eq!(script.calls(), 1);
    }
}
