//! Time and randomness, injected.
//!
//! Logic never reads a clock or a random source directly (clippy's
//! `disallowed-methods` enforces it): it asks a [`Clock`] or an [`Entropy`].
//! The clock is tokio's, so a test with a paused runtime drives expiry and
//! refresh-ahead by advancing time instead of sleeping, and the wall-clock
//! instants shown to callers are derived from the same monotonic reading.
//!
//! A crate of its own, below both `payroc-broker` and `payroc-sim`: the
//! simulated Payroc must run on the same injected [`Clock`] and [`Entropy`]
//! as the broker in front of it, and the broker's `sandbox` subcommand
//! depends on the simulator. The broker re-exports it as
//! `payroc_broker::clock`.

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

    /// The wall-clock time of a monotonic instant, or `None` when it lies
    /// outside what `SystemTime` can represent. Checked arithmetic: the
    /// instant may come from an upstream answer (a token's expiry).
    pub fn checked_wall(&self, at: Instant) -> Option<SystemTime> {
        match at.checked_duration_since(self.origin) {
            Some(ahead) => self.origin_wall.checked_add(ahead),
            None => self
                .origin_wall
                .checked_sub(self.origin.checked_duration_since(at)?),
        }
    }

    /// The wall-clock time of a monotonic instant, clamped to the range a
    /// `google.protobuf.Timestamp` can carry (years 1 to 9999): never panics,
    /// and never yields a time the API could not send.
    pub fn wall(&self, at: Instant) -> SystemTime {
        let (earliest, latest) = timestamp_range();
        match self.checked_wall(at) {
            Some(t) => t.clamp(earliest, latest),
            None if at >= self.origin => latest,
            None => earliest,
        }
    }
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the bounds of a
/// `google.protobuf.Timestamp`.
fn timestamp_range() -> (SystemTime, SystemTime) {
    const BEFORE_EPOCH: Duration = Duration::from_secs(62_135_596_800);
    const AFTER_EPOCH: Duration = Duration::from_secs(253_402_300_799);
    let epoch = SystemTime::UNIX_EPOCH;
    (
        epoch.checked_sub(BEFORE_EPOCH).unwrap_or(epoch),
        epoch.checked_add(AFTER_EPOCH).unwrap_or(epoch),
    )
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

/// The proleptic Gregorian date `(year, month, day)` of the day `days` after
/// 1970-01-01 (before it when negative), month and day counted from 1:
/// Howard Hinnant's `civil_from_days`. For the timestamps the broker's log
/// lines and the simulator's answers write without a date library.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

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

    #[tokio::test(start_paused = true)]
    async fn wall_time_of_a_far_instant_is_clamped_not_a_panic() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::starting_at(start);
        let far = Duration::from_secs(u64::MAX / 4);
        // An instant this far ahead may not exist at all; where it does, its
        // wall time is the last second a Timestamp can carry.
        if let Some(at) = clock.now().checked_add(far) {
            assert_eq!(clock.checked_wall(at), start.checked_add(far));
            let latest = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
            assert_eq!(clock.wall(at), latest);
        }
        let later = clock.now() + Duration::from_secs(3600);
        assert_eq!(clock.wall(later), start + Duration::from_secs(3600));
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

    #[test]
    fn civil_dates_of_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(civil_from_days(-719_162), (1, 1, 1));
        assert_eq!(civil_from_days(2_932_896), (9999, 12, 31));
    }

    /// Day by day from 1600 to 2400 (leap centuries and not), against a
    /// calendar counted the slow way.
    #[test]
    fn civil_dates_follow_the_calendar_day_by_day() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let length = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut date = (1600, 1, 1);
        for days in -135_140..=157_054 {
            assert_eq!(civil_from_days(days), date, "day {days}");
            let (y, m, d) = date;
            date = match (d == length(y, m), m == 12) {
                (false, _) => (y, m, d + 1),
                (true, false) => (y, m + 1, 1),
                (true, true) => (y + 1, 1, 1),
            };
        }
        assert_eq!(date, (2400, 1, 2));
    }
}
