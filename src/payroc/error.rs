//! What can go wrong talking to Payroc.

use std::{fmt, time::Duration};

use super::problem::Problem;

/// Which Payroc endpoint an error came from: the same status means different
/// things at each (a 401 from identity is a bad API key; from sessions, an
/// expired Bearer token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Identity,
    Sessions,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Identity => "identity service",
            Endpoint::Sessions => "hosted-fields-sessions endpoint",
        })
    }
}

/// One failed upstream exchange (after any retries). Never carries a secret:
/// problem documents are redacted before they get here.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// Payroc answered with a non-success status.
    Status {
        endpoint: Endpoint,
        status: u16,
        problem: Option<Box<Problem>>,
        retry_after: Option<Duration>,
    },
    /// One attempt outlasted `request_timeout`.
    Timeout { endpoint: Endpoint },
    /// Connecting, sending or receiving failed.
    Transport { endpoint: Endpoint, message: String },
    /// A success status with a body that is not what Payroc documents.
    Malformed { endpoint: Endpoint, reason: String },
    /// The caller's deadline ran out before an answer.
    DeadlineExceeded,
}

impl UpstreamError {
    /// Whether another attempt may succeed: transport failures, timeouts,
    /// 408, 429 and 5xx. Other 4xx would fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..=599).contains(status)
            }
            UpstreamError::Timeout { .. } | UpstreamError::Transport { .. } => true,
            UpstreamError::Malformed { .. } | UpstreamError::DeadlineExceeded => false,
        }
    }

    /// The HTTP status, if Payroc answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Status {
                endpoint,
                status,
                problem,
                ..
            } => {
                write!(f, "Payroc's {endpoint} answered HTTP {status}")?;
                if let Some(p) = problem {
                    if let Some(t) = &p.title {
                        write!(f, ": {t}")?;
                    }
                    if let Some(d) = &p.detail {
                        write!(f, " ({d})")?;
                    }
                }
                Ok(())
            }
            UpstreamError::Timeout { endpoint } => {
                write!(
                    f,
                    "Payroc's {endpoint} did not answer within request_timeout"
                )
            }
            UpstreamError::Transport { endpoint, message } => {
                write!(f, "could not reach Payroc's {endpoint}: {message}")
            }
            UpstreamError::Malformed { endpoint, reason } => {
                write!(f, "Payroc's {endpoint} sent a malformed response: {reason}")
            }
            UpstreamError::DeadlineExceeded => {
                f.write_str("the caller's deadline ran out waiting for Payroc")
            }
        }
    }
}

impl std::error::Error for UpstreamError {}
