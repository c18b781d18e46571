//! Per-caller and per-peer limits: the rate-limit token bucket, the session
//! quota, and the table of peers that keep failing authentication.
//!
//! All three read time from the injected [`Clock`], so tests drive them on a
//! paused tokio clock. The bucket is a few lines of GCRA rather than the
//! `governor` crate: `governor` reads its own clock (a `quanta` or std
//! `Instant`), which a paused tokio runtime cannot move and clippy's clock
//! rule forbids, and it would add a dependency tree for one comparison.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{config::RateLimit, sync::lock, transport::limits::peer_key};

/// A token bucket as GCRA (the "generic cell rate algorithm"): one instant,
/// the theoretical arrival time of the next call, instead of a token count and
/// a refill timer. It admits `burst` calls at once and then one every
/// `per / count`, exactly like a bucket of `burst` tokens refilled at
/// `count / per`.
#[derive(Debug)]
pub struct RateBucket {
    limit: RateLimit,
    /// Time one token takes to come back: `per / count`.
    interval: Duration,
    /// How far ahead of now the next arrival time may run: `(burst - 1) * interval`.
    tolerance: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateBucket {
    pub fn new(limit: RateLimit) -> Self {
        let interval = limit.per / limit.count.max(1);
        Self {
            limit,
            interval,
            tolerance: interval.saturating_mul(limit.burst.max(1) - 1),
            next: Mutex::new(None),
        }
    }

    /// The limit this bucket enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut next = lock(&self.next);
        let arrival = next.map_or(now, |n| n.max(now));
        let ahead = arrival - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        *next = Some(arrival + self.interval);
        Ok(())
    }
}

/// A caller's share of the session bulkhead: at most `limit` session requests
/// in flight. Shed, not queued, like the bulkhead itself.
#[derive(Debug)]
pub struct SessionQuota {
    limit: usize,
    slots: Arc<Semaphore>,
}

impl SessionQuota {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            slots: Arc::new(Semaphore::new(limit)),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot held until the permit drops, or `None` when all are taken.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }
}

/// When a peer counts as failing, and for how long it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Failed token authentications from one peer within `window`...
    pub max_failures: u32,
    pub window: Duration,
    /// ...refuse its token authentications for this long.
    pub cool_down: Duration,
    /// Peers remembered at most (memory bound: about 48 bytes each).
    pub max_peers: usize,
}

impl Default for FailurePolicy {
    /// 20 wrong tokens a minute is far beyond a misconfigured client's
    /// retries and far below a guessing attack's thousands a second.
    fn default() -> Self {
        Self {
            max_failures: 20,
            window: Duration::from_secs(60),
            cool_down: Duration::from_secs(60),
            max_peers: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PeerRecord {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    last_failure: Instant,
}

/// Peers that keep presenting wrong caller tokens. Keyed by the transport's
/// [`peer_key`] (an IPv6 peer by its /64, as the connection caps count it),
/// not port: a new connection does not wipe the slate.
#[derive(Debug)]
pub struct FailedPeers {
    policy: FailurePolicy,
    peers: Mutex<HashMap<IpAddr, PeerRecord>>,
}

impl FailedPeers {
    pub fn new(policy: FailurePolicy) -> Self {
        Self {
            policy,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// How much longer `ip` is refused, if it is.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let peers = lock(&self.peers);
        let until = peers.get(&peer_key(ip))?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let p = self.policy;
        let mut peers = lock(&self.peers);
        let key = peer_key(ip);
        if !peers.contains_key(&key) && peers.len() >= p.max_peers {
            Self::make_room(&mut peers, &p, now);
        }
        let r = peers.entry(key).or_insert(PeerRecord {
            window_start: now,
            failures: 0,
            blocked_until: None,
            last_failure: now,
        });
        if now.duration_since(r.window_start) >= p.window {
            r.window_start = now;
            r.failures = 0;
        }
        r.failures = r.failures.saturating_add(1);
        r.last_failure = now;
        if r.failures >= p.max_failures {
            // Each further failure (there are none while blocked: blocked
            // peers are refused before their token is looked at) would extend it.
            r.blocked_until = Some(now + p.cool_down);
        }
    }

    /// Drops the records that no longer matter; if none, the one that failed
    /// longest ago. Runs only when the table is full.
    fn make_room(peers: &mut HashMap<IpAddr, PeerRecord>, p: &FailurePolicy, now: Instant) {
        peers.retain(|_, r| {
            let counting = now.duration_since(r.window_start) < p.window;
            let blocked = r.blocked_until.is_some_and(|u| u > now);
            counting || blocked
        });
        if peers.len() >= p.max_peers
            && let Some(oldest) = peers
                .iter()
                .min_by_key(|(_, r)| r.last_failure)
                .map(|(k, _)| *k)
        {
            peers.remove(&oldest);
        }
    }

    /// Peers remembered (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.peers).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(count: u32, per_ms: u64, burst: u32) -> RateLimit {
        RateLimit {
            count,
            per: Duration::from_millis(per_ms),
            burst,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_admits_its_burst_then_its_rate() {
        let b = RateBucket::new(limit(10, 1000, 3));
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(t0).unwrap();
        }
        assert_eq!(b.take(t0), Err(Duration::from_millis(100)));
        // The wait told is exact: not a moment earlier...
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(b.take(Instant::now()), Err(Duration::from_millis(1)));
        // ...and at that moment, one call, not more.
        tokio::time::advance(Duration::from_millis(1)).await;
        b.take(Instant::now()).unwrap();
        assert!(b.take(Instant::now()).is_err());
        // Idle for long: the bucket fills up to the burst and no further.
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        for _ in 0..3 {
            b.take(now).unwrap();
        }
        assert!(b.take(now).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_caller_at_the_rate_is_never_refused() {
        let b = RateBucket::new(limit(5, 1000, 1));
        for _ in 0..50 {
            b.take(Instant::now()).unwrap();
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        // Twice the rate: every second call is refused.
        let mut refused = 0;
        for _ in 0..50 {
            if b.take(Instant::now()).is_err() {
                refused += 1;
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!((24..=26).contains(&refused), "{refused}");
    }

    #[tokio::test(start_paused = true)]
    async fn per_minute_limits_refill_slowly() {
        let b = RateBucket::new(RateLimit {
            count: 2,
            per: Duration::from_secs(60),
            burst: 1,
        });
        b.take(Instant::now()).unwrap();
        assert_eq!(b.take(Instant::now()), Err(Duration::from_secs(30)));
    }

    #[test]
    fn the_session_quota_is_shed_not_queued() {
        let q = SessionQuota::new(2);
        let a = q.try_acquire().unwrap();
        let _b = q.try_acquire().unwrap();
        assert!(q.try_acquire().is_none());
        drop(a);
        assert!(q.try_acquire().is_some());
    }

    fn policy() -> FailurePolicy {
        FailurePolicy {
            max_failures: 3,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(30),
            max_peers: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_failing_too_often_is_blocked_for_the_cool_down() {
        let t = FailedPeers::new(policy());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            t.record_failure(ip, Instant::now());
        }
        assert_eq!(t.blocked(ip, Instant::now()), None);
        t.record_failure(ip, Instant::now());
        assert_eq!(t.blocked(ip, Instant::now()), Some(Duration::from_secs(30)));
        assert_eq!(t.blocked(other, Instant::now()), None, "only that peer");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(t.blocked(ip, Instant::now()), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.blocked(ip, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_spread_wider_than_the_window_never_block() {
        let t = FailedPeers::new(policy());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..20 {
            t.record_failure(ip, Instant::now());
            tokio::time::advance(Duration::from_secs(6)).await;
        }
        assert_eq!(t.blocked(ip, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_peers_count_by_their_64() {
        let t = FailedPeers::new(policy());
        for i in 1..=3 {
            let ip: IpAddr = format!("2001:db8:1:2::{i}").parse().unwrap();
            t.record_failure(ip, Instant::now());
        }
        let same: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let next: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(t.blocked(same, Instant::now()).is_some());
        assert!(t.blocked(next, Instant::now()).is_none());
        // IPv4-mapped addresses are their IPv4 peer.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            t.record_failure(mapped, Instant::now());
        }
        assert!(t.blocked(v4, Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded_and_keeps_blocked_peers_longest() {
        let t = FailedPeers::new(policy());
        let blocked: IpAddr = "10.9.9.9".parse().unwrap();
        for _ in 0..3 {
            t.record_failure(blocked, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        // Many one-off peers: old windows are dropped first, so the blocked
        // peer stays while it is blocked.
        for i in 0..100u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            t.record_failure(ip, Instant::now());
            tokio::time::advance(Duration::from_secs(11)).await;
            assert!(t.len() <= 4, "{}", t.len());
            if i == 0 {
                assert!(t.blocked(blocked, Instant::now()).is_some());
            }
        }
    }
}
