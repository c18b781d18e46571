//! The cache's timing policy: when a token is renewed, which `min_validity`
//! a token can meet, and the bounds put on what the identity service says.

use std::time::Duration;

use tokio::time::Instant;

use secrecy::ExposeSecret;

use crate::{
    clock::Clock,
    domain::fingerprint::Fingerprint,
    payroc::{Endpoint, IdentityToken, UpstreamError},
};

use super::{BearerToken, Encoded};

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

/// Whether a fresh token of `lifetime` can have `min_validity` left when it
/// arrives: the fetch itself takes time, so asking for (nearly) the whole
/// lifetime can never be met, and must not make every call refetch.
///
/// It also leaves [`refetch_spacing`] between the moment a fresh token
/// arrives and the moment it no longer meets `min_validity`, so that a
/// caller asking nearly the whole lifetime is refused rather than served
/// by a fetch about every second.
pub(super) fn satisfiable(min_validity: Duration, lifetime: Duration) -> bool {
    min_validity.saturating_add(FETCH_ALLOWANCE.max(refetch_spacing(lifetime))) <= lifetime
}

/// A token younger than this is never replaced for a caller's (or
/// watcher's) `min_validity`: such requests get OUT_OF_RANGE instead, so
/// forced re-fetches of one credential come at most this often. Capped at
/// half the lifetime, so short-lived tokens (tests) still serve ordinary
/// requests.
pub(super) fn refetch_spacing(lifetime: Duration) -> Duration {
    MIN_REFETCH_SPACING.min(lifetime / 2)
}

/// The longest `expires_in` accepted from the identity service.
const MAX_EXPIRES_IN: Duration = Duration::from_secs(24 * 3600);

/// See [`refetch_spacing`].
const MIN_REFETCH_SPACING: Duration = Duration::from_secs(10);

/// The part of a token's lifetime that a fetch may use up.
pub(super) const FETCH_ALLOWANCE: Duration = Duration::from_secs(1);

/// The longest `Retry-After` from the identity service the refresher honours.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);

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
pub(super) fn cache_entry(
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
        fingerprint: Fingerprint::of(t.access_token.expose_secret()),
        access_token: t.access_token,
        token_type: t.token_type,
        scopes: t.scopes,
        expires_at,
        expires_at_wall,
        lifetime: t.expires_in,
        refresh_at,
        fetched_at: t.requested_at,
        upstream_status: t.status,
        encoded: Encoded::default(),
    })
}

/// `at + wait`, for waits that come from configuration or upstream: past
/// what an `Instant` can hold, a year from `at` (or `at` itself).
pub(super) fn later(at: Instant, wait: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    at.checked_add(wait.min(YEAR)).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::{testing::*, *};

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
}
