//! A fine-grained timer for the simulator's latency.
//!
//! tokio's timer rounds every deadline up to its next millisecond tick, and
//! its driver wakes in whole milliseconds too: a 50 ms `sleep` answers after
//! 50.5 to 52 ms, more under load, which would be counted as the broker's.
//! This thread sleeps on a condition variable until the earliest deadline
//! (futex timeouts: tens of microseconds late) and completes every wait that
//! is due.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use payroc_sim::Pause;
use tokio::sync::oneshot;

struct Due {
    at: Instant,
    seq: u64,
    done: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Waits {
    heap: BinaryHeap<Reverse<Due>>,
    seq: u64,
    /// How late each wait was completed, in ns (see [`Lateness`]).
    late_ns: Vec<u64>,
}

type Shared = Arc<(Mutex<Waits>, Condvar)>;

/// How late the timer thread completed waits: a benchmark reports it beside
/// "latency minus L", which would otherwise count it as the broker's.
#[derive(Clone)]
pub struct Lateness(Shared);

impl Lateness {
    /// The lateness of every wait completed since the last call, in ns.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut self.0.0.lock().unwrap().late_ns)
    }
}

/// Starts the timer thread (it lives as long as the process) and returns the
/// simulator's pause and the record of its lateness.
pub fn precise_pause() -> (Pause, Lateness) {
    let shared: Shared = Arc::new((Mutex::new(Waits::default()), Condvar::new()));
    let lateness = Lateness(Arc::clone(&shared));
    std::thread::Builder::new()
        .name("bench-timer".into())
        .spawn({
            let shared = Arc::clone(&shared);
            move || run(&shared)
        })
        .expect("timer thread");
    let pause: Pause = Arc::new(move |delay: Duration| {
        let (tx, rx) = oneshot::channel();
        let at = Instant::now() + delay;
        {
            let (lock, wake) = &*shared;
            let mut waits = lock.lock().unwrap();
            waits.seq += 1;
            let seq = waits.seq;
            let earliest = waits.heap.peek().is_none_or(|Reverse(d)| at < d.at);
            waits.heap.push(Reverse(Due { at, seq, done: tx }));
            // Only a new earliest deadline changes how long the thread sleeps.
            if earliest {
                wake.notify_one();
            }
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    });
    (pause, lateness)
}

fn run(shared: &(Mutex<Waits>, Condvar)) {
    let (lock, wake) = shared;
    let mut waits = lock.lock().unwrap();
    loop {
        let now = Instant::now();
        while waits.heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Reverse(due) = waits.heap.pop().expect("peeked");
            let _ = due.done.send(());
            let late = now.saturating_duration_since(due.at).as_nanos() as u64;
            waits.late_ns.push(late);
        }
        waits = match waits.heap.peek() {
            Some(Reverse(next)) => {
                let timeout = next.at.saturating_duration_since(now);
                wake.wait_timeout(waits, timeout).unwrap().0
            }
            None => wake.wait(waits).unwrap(),
        };
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    /// A new earliest deadline wakes the thread: a short wait registered
    /// after an hour-long one completes, and the long one stays pending.
    #[tokio::test]
    async fn a_later_shorter_wait_is_not_stuck_behind_a_longer_one() {
        let (pause, _) = precise_pause();
        let mut long = pause(Duration::from_secs(3600));
        pause(Duration::from_micros(200)).await;
        assert!((&mut long).now_or_never().is_none());
    }
}
