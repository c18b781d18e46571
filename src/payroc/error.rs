//! What can go wrong talking to Payroc.

use std::{fmt, time::Duration};

use super::problem::Problem;

/// Which Payroc endpoint an exchange was with: the same status means
/// different things at each (a 401 from identity is a bad API key; from
/// sessions, an expired Bearer token).
///
/// The one list of upstream endpoints: metrics size their arrays by
/// [`Endpoint::ALL`] and label with [`Endpoint::label`]; adding one is a
/// variant here, its entry in `ALL`, and the exhaustive matches the compiler
/// then points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Identity,
    Sessions,
}

impl Endpoint {
    /// Every endpoint, in declaration order (`ALL[e as usize] == e`).
    pub const ALL: [Endpoint; 2] = [Endpoint::Identity, Endpoint::Sessions];

    /// The `endpoint` label of the upstream metrics and status details.
    pub const fn label(self) -> &'static str {
        match self {
            Endpoint::Identity => "identity",
            Endpoint::Sessions => "sessions",
        }
    }

    /// Position in [`Endpoint::ALL`]: an index into per-endpoint arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_indexed_in_order() {
        for (i, e) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
    }
}
