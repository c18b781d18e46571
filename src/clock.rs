//! Time and randomness, injected.
//!
//! Logic never reads a clock or a random source directly (clippy's
//! `disallowed-methods` enforces it): it asks a [`Clock`] or an [`Entropy`].
//! The clock is tokio's, so a test with a paused runtime drives expiry and
//! refresh-ahead by advancing time instead of sleeping, and the wall-clock
//! instants shown to callers are derived from the same monotonic reading.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

/// Monotonic time for logic, plus the wall-clock translation of it for the
/// timestamps the API returns.
#[derive(Clone, Debug)]
pub struct Clock {
    origin: Instant,
    origin_wall: SystemTime,
}

impl Clock {
    /// The real clock. The wall clock is read once, here; later wall times are
    /// `origin_wall + elapsed`, so a wall-clock step never moves an expiry.
    #[allow(clippy::disallowed_methods)] // the one place that reads the wall clock
    pub fn system() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// A clock whose current instant corresponds to `wall` (tests).
    pub fn starting_at(wall: SystemTime) -> Self {
        Self {
            origin: Instant::now(),
            origin_wall: wall,
        }
    }

    /// The current monotonic instant (tokio's clock, pausable in tests).
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// The wall-clock time of a monotonic instant.
    pub fn wall(&self, at: Instant) -> SystemTime {
        match at.checked_duration_since(self.origin) {
            Some(ahead) => self.origin_wall + ahead,
            None => self.origin_wall - (self.origin - at),
        }
    }

    /// [`Clock::wall`], or `None` where the wall clock cannot represent it
    /// (instants derived from untrusted durations).
    pub fn checked_wall(&self, at: Instant) -> Option<SystemTime> {
        match at.checked_duration_since(self.origin) {
            Some(ahead) => self.origin_wall.checked_add(ahead),
            None => self.origin_wall.checked_sub(self.origin - at),
        }
    }
}

/// A source of randomness: Idempotency-Keys and jitter.
pub trait Entropy: Send + Sync + 'static {
    /// A random UUID v4.
    fn uuid_v4(&self) -> uuid::Uuid;

    /// A uniformly distributed fraction in `[0, 1)`.
    fn fraction(&self) -> f64 {
        // 53 random bits make every f64 in [0, 1) with a 2^-53 step.
        let bits = (self.uuid_v4().as_u128() >> 64) as u64 >> 11;
        bits as f64 / (1u64 << 53) as f64
    }

    /// A duration uniformly drawn from `[0, max]` ("full jitter").
    fn jitter(&self, max: Duration) -> Duration {
        max.mul_f64(self.fraction())
    }
}

/// The operating system's random source (through `uuid`'s `getrandom`).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    #[allow(clippy::disallowed_methods)] // the one place that draws OS randomness
    fn uuid_v4(&self) -> uuid::Uuid {
        uuid::Uuid::new_v4()
    }
}

/// Shared handle to an entropy source.
pub type SharedEntropy = Arc<dyn Entropy>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wall_time_follows_the_paused_clock() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::starting_at(start);
        let t0 = clock.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.wall(clock.now()), start + Duration::from_secs(90));
        assert_eq!(clock.wall(t0), start);
    }

    #[test]
    fn fraction_stays_in_unit_interval() {
        for _ in 0..1000 {
            let f = OsEntropy.fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
        let j = OsEntropy.jitter(Duration::from_secs(2));
        assert!(j <= Duration::from_secs(2));
    }
}
