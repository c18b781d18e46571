//! The one poison-tolerant lock.
//!
//! Every mutex in the broker guards state that stays consistent between
//! statements (counters, tables, queues), and no code holds one across an
//! `.await` or a call that can panic midway through an update. A panic while
//! holding one therefore leaves nothing half-written, and refusing every
//! later call because of it would turn one bug into an outage: take the
//! guard anyway.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poisoning (see the module documentation).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
