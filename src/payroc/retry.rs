//! One retry policy for both Payroc endpoints.
//!
//! Retries transport failures, timeouts, 408, 429 and 5xx with exponential
//! backoff and full jitter; honours `Retry-After` (capped); never starts an
//! attempt that the caller's deadline would cut short before it could even be
//! sent. Each attempt is bounded by `request_timeout` and by the deadline, so
//! the whole exchange fits inside the caller's gRPC deadline.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use super::error::UpstreamError;
use crate::clock::{Clock, Entropy};

/// How often and how patiently to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubles with each retry.
    pub base_delay: Duration,
    /// Ceiling of any computed backoff.
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured; a longer one ends the retries.
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    pub fn new(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        }
    }

    /// The wait before the attempt after `attempt` (1-based) failed with
    /// `err`, or `None` to give up.
    pub fn delay_after(
        &self,
        attempt: u32,
        err: &UpstreamError,
        entropy: &dyn Entropy,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts || !err.is_retryable() {
            return None;
        }
        if let UpstreamError::Status {
            retry_after: Some(wait),
            ..
        } = err
        {
            // Payroc said when: believe it, within reason.
            return (*wait <= self.max_retry_after).then_some(*wait);
        }
        let exp = self
            .base_delay
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(self.max_delay);
        Some(entropy.jitter(exp))
    }
}

/// Runs `attempt` under the policy. `deadline` is the caller's; `None` means
/// only attempts and `request_timeout` bound the work.
pub async fn run<T, F, Fut>(
    policy: &RetryPolicy,
    clock: &Clock,
    entropy: &dyn Entropy,
    request_timeout: Duration,
    deadline: Option<Instant>,
    endpoint: super::Endpoint,
    mut attempt: F,
) -> Result<T, UpstreamError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut n = 1;
    loop {
        let now = clock.now();
        let limit = match deadline {
            Some(d) if d <= now => return Err(UpstreamError::DeadlineExceeded),
            Some(d) => request_timeout.min(d - now),
            None => request_timeout,
        };
        let cut_by_deadline = limit < request_timeout;
        let err = match tokio::time::timeout(limit, attempt(n)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) if cut_by_deadline => return Err(UpstreamError::DeadlineExceeded),
            Err(_) => UpstreamError::Timeout { endpoint },
        };
        let Some(wait) = policy.delay_after(n, &err, entropy) else {
            return Err(err);
        };
        // A retry that could not finish before the deadline is not started:
        // the caller gets the real upstream error, not a vague timeout, and
        // Payroc is spared a request nobody will wait for. "Could not finish"
        // is judged by a minimum useful attempt: a quarter of
        // request_timeout, at most 250 ms.
        let min_attempt = (request_timeout / 4).min(Duration::from_millis(250));
        if deadline.is_some_and(|d| clock.now() + wait + min_attempt > d) {
            return Err(err);
        }
        tracing::debug!(%endpoint, attempt = n, ?wait, error = %err, "retrying Payroc request");
        tokio::time::sleep(wait).await;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payroc::Endpoint;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Fixed(f64);
    impl Entropy for Fixed {
        fn uuid_v4(&self) -> uuid::Uuid {
            uuid::Uuid::nil()
        }
        fn fraction(&self) -> f64 {
            self.0
        }
    }

    fn status(code: u16, retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError::Status {
            endpoint: Endpoint::Sessions,
            status: code,
            problem: None,
            retry_after,
        }
    }

    #[test]
    fn backoff_is_exponential_with_full_jitter_and_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            ..RetryPolicy::new(10)
        };
        let e = status(503, None);
        assert_eq!(
            p.delay_after(1, &e, &Fixed(0.999_999)).unwrap().as_millis(),
            199
        );
        assert_eq!(
            p.delay_after(2, &e, &Fixed(0.5)).unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(
            p.delay_after(9, &e, &Fixed(1.0)).unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(p.delay_after(3, &e, &Fixed(0.0)).unwrap(), Duration::ZERO);
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let p = RetryPolicy::new(3);
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                p.delay_after(1, &status(code, None), &Fixed(0.5)).is_some(),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 406, 409, 413, 415] {
            assert!(
                p.delay_after(1, &status(code, None), &Fixed(0.5)).is_none(),
                "{code}"
            );
        }
        assert!(
            p.delay_after(3, &status(503, None), &Fixed(0.5)).is_none(),
            "attempts spent"
        );
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let p = RetryPolicy::new(3);
        let wait = Some(Duration::from_secs(7));
        assert_eq!(p.delay_after(1, &status(429, wait), &Fixed(0.5)), wait);
        assert_eq!(
            p.delay_after(1, &status(429, Some(Duration::from_secs(61))), &Fixed(0.5)),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_past_the_deadline_is_not_started() {
        let clock = Clock::starting_at(std::time::UNIX_EPOCH);
        let calls = AtomicU32::new(0);
        let deadline = clock.now() + Duration::from_secs(2);
        let r: Result<(), _> = run(
            &RetryPolicy::new(3),
            &clock,
            &Fixed(0.5),
            Duration::from_secs(10),
            Some(deadline),
            Endpoint::Sessions,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(status(429, Some(Duration::from_secs(5)))) }
            },
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(r.unwrap_err().status(), Some(429));
        assert!(
            clock.now() < deadline,
            "gave up at once instead of sleeping"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_with_too_little_time_left_is_not_started() {
        let clock = Clock::starting_at(std::time::UNIX_EPOCH);
        let calls = AtomicU32::new(0);
        // 503 after 2.95 s of a 3 s deadline: 50 ms would be left.
        let deadline = clock.now() + Duration::from_secs(3);
        let r: Result<(), _> = run(
            &RetryPolicy::new(3),
            &clock,
            &Fixed(0.0),
            Duration::from_secs(10),
            Some(deadline),
            Endpoint::Sessions,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(2950)).await;
                    Err(status(503, None))
                }
            },
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            r.unwrap_err().status(),
            Some(503),
            "UNAVAILABLE, not DEADLINE_EXCEEDED"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_cut_by_the_deadline_or_the_timeout() {
        let clock = Clock::starting_at(std::time::UNIX_EPOCH);
        let slow = |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<(), UpstreamError>(())
        };
        let p = RetryPolicy::new(1);
        let deadline = Some(clock.now() + Duration::from_secs(1));
        let r = run(
            &p,
            &clock,
            &Fixed(0.5),
            Duration::from_secs(10),
            deadline,
            Endpoint::Identity,
            slow,
        )
        .await;
        assert!(matches!(r, Err(UpstreamError::DeadlineExceeded)), "{r:?}");

        let r = run(
            &p,
            &clock,
            &Fixed(0.5),
            Duration::from_secs(3),
            None,
            Endpoint::Identity,
            slow,
        )
        .await;
        assert!(matches!(r, Err(UpstreamError::Timeout { .. })), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let clock = Clock::starting_at(std::time::UNIX_EPOCH);
        let r = run(
            &RetryPolicy::new(3),
            &clock,
            &Fixed(0.5),
            Duration::from_secs(10),
            None,
            Endpoint::Sessions,
            |n| async move { if n < 3 { Err(status(503, None)) } else { Ok(n) } },
        )
        .await;
        assert_eq!(r.unwrap(), 3);
    }
}
