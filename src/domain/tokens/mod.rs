//! Bearer tokens, cached per credential and shared by every caller.
//!
//! Policy on top of [`SingleFlight`](crate::domain::cell::SingleFlight):
//!
//! - A token is served while it has at least the requested validity left. The
//!   hit path is one atomic load and a comparison: no lock, no allocation.
//! - Each credential has a background refresher. It fetches the first token at
//!   start-up (warm start: spread out, bounded concurrency) and renews it a
//!   random moment before `refresh_before_expiry` is left (see
//!   `cache_entry`), so credentials and replicas started together do not
//!   refresh in the same second, and no caller waits on an identity request
//!   while a valid token is cached.
//! - A failed fetch leaves the cached token in place; the refresher retries
//!   with exponential backoff and jitter until it succeeds.
//! - With no usable token after a failure, callers fail fast with the last
//!   error and the time of the next attempt (negative caching): the identity
//!   service sees one fetch per credential per backoff step, however many
//!   callers there are.
//! - Only the miss path waits, and then on the one shared identity request.
//!
//! The parts, each importing only those listed before it:
//!
//! - `policy`: renewal points, which `min_validity` can be met, bounds on
//!   what the identity service says; pure functions of time.
//! - `cache`: one credential's state (the cell, the negative cache, health)
//!   and the booking of each fetch's outcome.
//! - `refresh`: the background task that keeps the cell filled.
//! - `credential`: [`CredentialTokens`], the handle: hit path, shared miss,
//!   invalidation.
//! - `watch`: following the token for WatchBearerToken.
//! - `registry`: [`Tokens`], every credential and which terminal it serves.

mod cache;
mod credential;
mod policy;
mod refresh;
mod registry;
#[cfg(test)]
pub(crate) mod testing;
mod watch;

use std::{
    fmt,
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use secrecy::{SecretString, zeroize::Zeroizing};
use tokio::time::Instant;

use crate::{
    domain::fingerprint::Fingerprint,
    payroc::{IdentityToken, PayrocClient, UpstreamError},
};

use policy::refetch_spacing;

pub use credential::CredentialTokens;
pub use policy::TokenPolicy;
pub use registry::{Tokens, TokensSetup};
pub use watch::WatchTimer;

/// A cached Bearer token.
pub struct BearerToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub scopes: Vec<String>,
    pub expires_at: Instant,
    /// `expires_at` on the wall clock, for responses.
    pub expires_at_wall: SystemTime,
    /// The full lifetime Payroc granted (`expires_in`).
    pub lifetime: Duration,
    /// When the background refresher renews it (jittered).
    pub refresh_at: Instant,
    /// When the identity request that got it was sent.
    pub fetched_at: Instant,
    /// The HTTP status of the identity answer that issued it.
    pub upstream_status: u16,
    /// What the audit records of it, computed once.
    pub fingerprint: Fingerprint,
    /// The token as the API answers with it, encoded once (see [`Encoded`]).
    pub encoded: Encoded,
}

/// A token's answer on the wire, encoded by the API layer the first time
/// the token is handed out and kept with it: a token is handed out
/// thousands of times and never changes, so no call builds or encodes its
/// answer again. The bytes are opaque here. They hold the token, so they
/// are wiped when the last copy goes and `Debug` shows none of them.
#[derive(Default)]
pub struct Encoded(OnceLock<Bytes>);

impl Encoded {
    /// The encoding, made by `encode` if it is the first call.
    pub fn get_or_init(&self, encode: impl FnOnce() -> Vec<u8>) -> Bytes {
        self.0
            .get_or_init(|| Bytes::from_owner(Zeroizing::new(encode())))
            .clone()
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Encoded(..)")
    }
}

impl BearerToken {
    /// The time left at `now`, zero once expired.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// Whether a caller's `min_validity` may no longer have this token
    /// replaced: it is too young (see [`refetch_spacing`]).
    fn too_young_to_refetch(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.fetched_at) < refetch_spacing(self.lifetime)
    }
}

/// Why no token could be had.
#[derive(Debug, Clone)]
pub enum TokenError {
    /// The identity request failed.
    Upstream(UpstreamError),
    /// A recent identity request failed and the next is not due yet: the
    /// caller gets that failure at once, and when to try again.
    BackingOff {
        error: UpstreamError,
        retry_in: Duration,
    },
    /// No token Payroc issues lives as long as the caller asked.
    OutOfRange {
        requested: Duration,
        lifetime: Duration,
    },
    /// The caller's deadline ran out while waiting for the token.
    DeadlineExceeded,
    /// The refresh task died (a bug, or shutdown).
    Aborted,
}

/// Whether a credential holds a usable token (one above the floor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenHealth {
    /// The first fetch has not finished yet.
    Starting,
    Usable,
    Unusable,
}

/// Where tokens come from: Payroc's identity service in production, a
/// scripted source in tests.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch(
        &self,
        api_key: SecretString,
    ) -> impl Future<Output = Result<IdentityToken, UpstreamError>> + Send + 'static;
}

impl TokenSource for Arc<PayrocClient> {
    fn fetch(
        &self,
        api_key: SecretString,
    ) -> impl Future<Output = Result<IdentityToken, UpstreamError>> + Send + 'static {
        let client = Arc::clone(self);
        // Read now, in the task of the RPC that starts the fetch: the fetch
        // runs in a task of its own.
        let trace = crate::trace::current();
        // No deadline: the fetch is shared, so no one caller's deadline may cut
        // it short. Attempts and request_timeout bound it; callers stop
        // waiting at their own deadlines.
        async move { client.fetch_bearer(&api_key, None, trace).await }
    }
}

#[cfg(test)]
mod encoded_tests {
    use super::Encoded;

    #[test]
    fn a_token_is_encoded_once_and_its_bytes_are_not_shown() {
        let e = Encoded::default();
        let mut made = 0;
        let first = e.get_or_init(|| {
            made += 1;
            b"secret".to_vec()
        });
        let again = e.get_or_init(|| unreachable!("encoded once"));
        assert_eq!(made, 1);
        // The same bytes, shared: not a copy.
        assert_eq!(first.as_ptr(), again.as_ptr());
        assert_eq!(&first[..], b"secret");
        assert_eq!(format!("{e:?}"), "Encoded(..)");
    }
}
