//! Test scaffolding shared by the token modules' tests: a scripted identity
//! service, fixed jitter, and a paused-clock driver.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::{
    clock::Clock,
    payroc::{IdentityToken, UpstreamError},
};

use super::{BearerToken, CredentialTokens, TokenPolicy, TokenSource, refresh::WarmStart};

/// A scripted identity service: each fetch pops the next answer (or
/// repeats the last), after an optional latency, counting calls.
#[derive(Clone, Default)]
pub(crate) struct Script(Arc<ScriptInner>);

#[derive(Default)]
pub(super) struct ScriptInner {
    answers: Mutex<Vec<Result<Duration, u16>>>,
    calls: AtomicU32,
    latency: Mutex<Duration>,
}

impl Script {
    pub(crate) fn answers(list: &[Result<u64, u16>]) -> Self {
        let s = Script::default();
        *s.0.answers.lock().unwrap() = list
            .iter()
            .rev()
            .map(|a| a.map(Duration::from_secs))
            .collect();
        s
    }
    pub(super) fn then(&self, list: &[Result<u64, u16>]) {
        *self.0.answers.lock().unwrap() = list
            .iter()
            .rev()
            .map(|a| a.map(Duration::from_secs))
            .collect();
    }
    pub(super) fn latency(self, d: Duration) -> Self {
        self.set_latency(d);
        self
    }
    pub(super) fn set_latency(&self, d: Duration) {
        *self.0.latency.lock().unwrap() = d;
    }
    pub(super) fn calls(&self) -> u32 {
        self.0.calls.load(Ordering::SeqCst)
    }
}

impl TokenSource for Script {
    fn fetch(
        &self,
        _key: SecretString,
    ) -> impl Future<Output = Result<IdentityToken, UpstreamError>> + Send + 'static {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
        let answer = {
            let mut a = self.0.answers.lock().unwrap();
            if a.len() > 1 { a.pop().unwrap() } else { a[0] }
        };
        let latency = *self.0.latency.lock().unwrap();
        async move {
            let requested_at = Instant::now();
            tokio::time::sleep(latency).await;
            match answer {
                Ok(lifetime) => Ok(IdentityToken {
                    access_token: SecretString::from(format!("token-{n}")),
                    token_type: "Bearer".into(),
                    expires_in: lifetime,
                    requested_at,
                    scopes: vec!["a".into(), "b".into()],
                    status: 200,
                }),
                Err(status) => Err(UpstreamError::Status {
                    endpoint: crate::payroc::Endpoint::Identity,
                    status,
                    problem: None,
                    // The script's 429s say: come back in 30 s.
                    retry_after: (status == 429).then_some(Duration::from_secs(30)),
                }),
            }
        }
    }
}

/// Jitter at a fixed point of its range.
pub(super) struct Fixed(pub(super) f64);
impl crate::clock::Entropy for Fixed {
    fn uuid_v4(&self) -> uuid::Uuid {
        uuid::Uuid::nil()
    }
    fn fraction(&self) -> f64 {
        self.0
    }
}

pub(crate) const FLOOR: Duration = Duration::from_secs(30);

pub(super) fn creds_with(script: &Script, refresh: u64, jitter: f64) -> CredentialTokens<Script> {
    CredentialTokens::spawn(
        "acme",
        SecretString::from("key"),
        script.clone(),
        TokenPolicy::new(Duration::from_secs(refresh), FLOOR),
        Clock::starting_at(SystemTime::UNIX_EPOCH),
        Arc::new(Fixed(jitter)),
        WarmStart::default(),
    )
}

pub(crate) fn creds(script: &Script, refresh: u64) -> CredentialTokens<Script> {
    creds_with(script, refresh, 0.0)
}

pub(super) fn secret(t: &BearerToken) -> String {
    t.access_token.expose_secret().to_owned()
}

/// Lets spawned tasks run until they block (the paused clock only
/// auto-advances when every task is idle, so this does not move time).
pub(super) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock forward, letting due timers and tasks run.
pub(super) async fn advance(secs: u64) {
    tokio::time::advance(Duration::from_secs(secs)).await;
    settle().await;
}

/// Counts the allocations each thread makes, for tests that a path
/// allocates nothing ([`allocations`]). The whole unit-test binary runs on
/// it; it only adds a thread-local increment to the system allocator.
struct Counting;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is a const-initialized thread-local without a destructor, which
// allocates nothing itself.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations (and reallocations) this thread made while `f` ran.
pub(crate) fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATIONS.with(std::cell::Cell::get);
    let out = f();
    (out, ALLOCATIONS.with(std::cell::Cell::get) - before)
}
