//! The broker's error type: every way an RPC can fail, as data.
//!
//! Handlers return `BrokerError`; `crate::api::status` turns it into a
//! `tonic::Status` in exactly one place.

use std::time::Duration;

use crate::{domain::tokens::TokenError, payroc::UpstreamError};

/// One invalid request field, named by its proto name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Why an RPC failed.
#[derive(Debug, Clone)]
pub enum BrokerError {
    /// No caller identified; the message says which proof was missing or wrong.
    Unauthenticated(&'static str),
    /// The peer presented too many wrong caller tokens lately; its tokens are
    /// refused unread for `retry_in`.
    PeerThrottled { retry_in: Duration },
    /// The caller used up its `rate_limit`; the next call is admitted in `retry_in`.
    CallerRateLimited { caller: String, retry_in: Duration },
    /// The caller already has `limit` session requests in flight.
    CallerSessionsLimited { caller: String, limit: usize },
    /// A known caller asked outside its allow lists.
    PermissionDenied { caller: String, reason: String },
    /// Request fields failed validation.
    InvalidArgument(Vec<FieldViolation>),
    /// No credential serves the terminal.
    UnknownTerminal(String),
    /// No credential has this name (the identity endpoint's path).
    UnknownCredential(String),
    /// `min_validity` longer than a fresh token lives.
    OutOfRange {
        requested: Duration,
        lifetime: Duration,
    },
    /// Payroc failed or refused.
    Upstream(UpstreamError),
    /// A recent identity failure, returned at once while the broker waits
    /// `retry_in` before asking Payroc again.
    UpstreamBackingOff {
        error: UpstreamError,
        retry_in: Duration,
    },
    /// The sessions endpoint answered 401 even with a freshly fetched token.
    SessionUnauthorizedAfterRefresh(UpstreamError),
    /// The caller's deadline ran out.
    DeadlineExceeded,
    /// The request body did not arrive in full within `server.request_timeout`.
    RequestTimeout,
    /// A bulkhead is full; the request was shed.
    Overloaded(String),
    /// A bug or shutdown; the message is safe to show.
    Internal(String),
    /// The server is shutting down (ends WatchBearerToken streams).
    ShuttingDown,
}

impl BrokerError {
    /// The HTTP status of the Payroc answer behind this error, if one is:
    /// for the audit trail's `upstream_status`.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            BrokerError::Upstream(e)
            | BrokerError::UpstreamBackingOff { error: e, .. }
            | BrokerError::SessionUnauthorizedAfterRefresh(e) => e.status(),
            _ => None,
        }
    }
}

impl From<TokenError> for BrokerError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Upstream(UpstreamError::DeadlineExceeded)
            | TokenError::DeadlineExceeded => BrokerError::DeadlineExceeded,
            TokenError::Upstream(u) => BrokerError::Upstream(u),
            TokenError::BackingOff { error, retry_in } => {
                BrokerError::UpstreamBackingOff { error, retry_in }
            }
            TokenError::OutOfRange {
                requested,
                lifetime,
            } => BrokerError::OutOfRange {
                requested,
                lifetime,
            },
            TokenError::Aborted => BrokerError::Internal("the token refresh was aborted".into()),
        }
    }
}

impl From<UpstreamError> for BrokerError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::DeadlineExceeded => BrokerError::DeadlineExceeded,
            other => BrokerError::Upstream(other),
        }
    }
}
