//! A single-flight cell: one shared value, replaced by at most one load at a
//! time, read without locks.
//!
//! Mechanism only: it knows nothing of HTTP, Payroc or expiry policy. The
//! caller decides when a value is stale and starts a load; the cell makes sure
//! concurrent loads coalesce into one, that the load runs to completion even if
//! every waiter gives up (a spawned task, so a cancelled RPC cannot strand the
//! others), and that a failed load leaves the previous value in place.
//!
//! Reads are an `ArcSwap` load: no lock, no allocation. The `Mutex` guards
//! only the "is a load in flight" slot and is never held across an `.await`.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::sync::lock;

type Outcome<T, E> = Option<Result<Arc<T>, E>>;

/// See the module documentation.
pub struct SingleFlight<T, E> {
    current: ArcSwapOption<T>,
    /// The same value, for those who wait for it to change (watchers). The
    /// hit path reads `current` instead: no lock at all.
    changes: watch::Sender<Option<Arc<T>>>,
    inflight: Mutex<Option<watch::Receiver<Outcome<T, E>>>>,
    loads: AtomicU64,
}

/// Why waiting on a load produced no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlightError<E> {
    /// The loader returned an error.
    Failed(E),
    /// The loader panicked or its runtime shut down.
    Aborted,
}

/// A handle on an in-flight load.
pub struct Flight<T, E>(watch::Receiver<Outcome<T, E>>);

impl<T, E: Clone> Flight<T, E> {
    /// Waits for the load to finish. Dropping the future stops waiting, not
    /// the load.
    pub async fn wait(mut self) -> Result<Arc<T>, FlightError<E>> {
        match self.0.wait_for(Option::is_some).await.as_deref() {
            Ok(Some(Ok(v))) => Ok(Arc::clone(v)),
            Ok(Some(Err(e))) => Err(FlightError::Failed(e.clone())),
            // `None` cannot pass `wait_for`; a dropped sender is a dead load.
            Ok(None) | Err(_) => Err(FlightError::Aborted),
        }
    }
}

impl<T, E> Default for SingleFlight<T, E> {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            changes: watch::Sender::new(None),
            inflight: Mutex::new(None),
            loads: AtomicU64::new(0),
        }
    }
}

impl<T, E> SingleFlight<T, E>
where
    T: Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current value: one atomic load, no lock.
    pub fn current(&self) -> Option<Arc<T>> {
        self.current.load_full()
    }

    /// Follows the current value: each replacement (and each invalidation,
    /// as `None`) is seen, though a receiver that lags sees only the latest.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<T>>> {
        self.changes.subscribe()
    }

    /// How many loads have been started (for tests and metrics).
    #[cfg(test)]
    pub fn loads_started(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Whether a load is in flight now.
    pub fn is_loading(&self) -> bool {
        lock(&self.inflight).is_some()
    }

    /// Joins the load in flight, or starts one with `make` (called only when
    /// none is in flight). On success the value becomes current before any
    /// waiter wakes; on failure the previous value stays.
    pub fn load<F, Fut>(self: &Arc<Self>, make: F) -> Flight<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.load_unless_replaced(None, make)
            .expect("without `seen` a flight is always joined or started")
    }

    /// Like [`SingleFlight::load`], but when no load is in flight and the
    /// current value is no longer `seen` (by pointer; `None` stands for any
    /// value), starts nothing and returns `None`: someone already replaced
    /// what the caller found stale. Many waiters that saw the same stale
    /// value thus cause one load, even if they wake after it finished.
    pub fn load_unless_replaced<F, Fut>(
        self: &Arc<Self>,
        seen: Option<&Option<Arc<T>>>,
        make: F,
    ) -> Option<Flight<T, E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let mut slot = lock(&self.inflight);
        if let Some(rx) = slot.as_ref() {
            return Some(Flight(rx.clone()));
        }
        // A finished load stores its value before it clears the slot (under
        // this lock), so a replacement is visible here.
        if let Some(seen) = seen {
            let now = self.current.load();
            let same = match (&*now, seen) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return None;
            }
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        drop(slot);
        self.loads.fetch_add(1, Ordering::Relaxed);

        let fut = make();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // Clears the slot even if `fut` panics, so the next caller can
            // start a fresh load instead of waiting forever.
            let _clear = ClearInflight(&this);
            let outcome = fut.await.map(Arc::new);
            if let Ok(v) = &outcome {
                // Store before clearing the slot: a caller arriving in between
                // sees the new value, never "no value and no load".
                this.current.store(Some(Arc::clone(v)));
                this.changes.send_replace(Some(Arc::clone(v)));
            }
            drop(_clear);
            let _ = tx.send(Some(outcome));
        });
        Some(Flight(rx))
    }

    /// Drops `seen` if it is still the current value; returns whether it was.
    /// Many callers that saw the same bad value thus cause one reload, not one
    /// each: only the first finds it current.
    pub fn invalidate(&self, seen: &Arc<T>) -> bool {
        let prev = self.current.compare_and_swap(seen, None);
        let dropped = prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, seen));
        if dropped {
            self.changes.send_if_modified(|cur| {
                // Only if no newer value was published meanwhile.
                let stale = cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, seen));
                if stale {
                    *cur = None;
                }
                stale
            });
        }
        dropped
    }

    /// Replaces the value directly, bypassing any load (tests only).
    #[cfg(test)]
    pub fn set(&self, value: T) {
        let value = Arc::new(value);
        self.current.store(Some(Arc::clone(&value)));
        self.changes.send_replace(Some(value));
    }
}

struct ClearInflight<'a, T, E>(&'a SingleFlight<T, E>);

impl<T, E> Drop for ClearInflight<'_, T, E> {
    fn drop(&mut self) {
        *lock(&self.0.inflight) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::oneshot;

    type Cell = SingleFlight<u32, String>;

    #[tokio::test]
    async fn concurrent_loads_coalesce() {
        let cell = Cell::new();
        let (release, gate) = oneshot::channel::<()>();
        let first = cell.load(|| async move {
            gate.await.unwrap();
            Ok(7)
        });
        let mut waiters = Vec::new();
        for _ in 0..100 {
            waiters.push(cell.load(|| async { panic!("a second load must not start") }));
        }
        assert!(cell.is_loading());
        release.send(()).unwrap();
        assert_eq!(*first.wait().await.unwrap(), 7);
        for w in waiters {
            assert_eq!(*w.wait().await.unwrap(), 7);
        }
        assert_eq!(cell.loads_started(), 1);
        assert_eq!(cell.current().as_deref(), Some(&7));
        assert!(!cell.is_loading());
    }

    #[tokio::test]
    async fn a_failed_load_keeps_the_previous_value() {
        let cell = Cell::new();
        cell.set(1);
        let err = cell.load(|| async { Err("boom".to_owned()) }).wait().await;
        assert_eq!(err.unwrap_err(), FlightError::Failed("boom".into()));
        assert_eq!(cell.current().as_deref(), Some(&1));
        // And the next load starts afresh.
        assert_eq!(*cell.load(|| async { Ok(2) }).wait().await.unwrap(), 2);
        assert_eq!(cell.loads_started(), 2);
    }

    #[tokio::test]
    async fn the_load_outlives_its_waiters() {
        let cell = Cell::new();
        let (release, gate) = oneshot::channel::<()>();
        let flight = cell.load(|| async move {
            gate.await.unwrap();
            Ok(3)
        });
        // The caller gives up (its RPC was cancelled).
        let gave_up = tokio::time::timeout(Duration::from_millis(1), flight.wait()).await;
        assert!(gave_up.is_err());
        release.send(()).unwrap();
        assert_eq!(*cell.load(|| async { Ok(99) }).wait().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_panicking_loader_does_not_wedge_the_cell() {
        let cell = Cell::new();
        let r = cell.load(|| async { panic!("loader bug") }).wait().await;
        assert_eq!(r.unwrap_err(), FlightError::Aborted);
        assert!(!cell.is_loading());
        assert_eq!(*cell.load(|| async { Ok(5) }).wait().await.unwrap(), 5);
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_value_it_saw() {
        let cell = Cell::new();
        cell.set(1);
        let seen = cell.current().unwrap();
        assert!(cell.invalidate(&seen));
        assert!(cell.current().is_none());
        assert!(
            !cell.invalidate(&seen),
            "a second 401 on the same token is a no-op"
        );
        cell.set(2);
        assert!(!cell.invalidate(&seen), "a newer value is kept");
        assert_eq!(cell.current().as_deref(), Some(&2));
    }
}
