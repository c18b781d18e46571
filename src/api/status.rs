//! The one place where broker errors become gRPC statuses.
//!
//! Codes follow the contract's table; details use the standard
//! `google.rpc` messages (`BadRequest`, `ErrorInfo`, `RetryInfo`) so clients in
//! any language can read them with their stock helpers. `ErrorInfo.domain` says
//! who raised the error: `payroc.com` for Payroc's answers, `payroc-broker`
//! for the broker's own refusals (rate limits, shed load, backing off).
//!
//! No message or detail ever carries a secret: upstream problem documents
//! were redacted by the Payroc client, and nothing else here sees a credential.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::error::BrokerError,
    payroc::{Endpoint, UpstreamError},
};

/// `google.rpc.ErrorInfo.domain` of errors that came from Payroc.
pub const PAYROC_DOMAIN: &str = "payroc.com";
/// `google.rpc.ErrorInfo.domain` of errors the broker raises itself.
pub const BROKER_DOMAIN: &str = "payroc-broker";
/// `ErrorInfo.reason` of an upstream failure repeated from the negative
/// cache while the broker waits before asking Payroc again.
const BACKING_OFF: &str = "UPSTREAM_BACKING_OFF";

/// Upstream free text is capped so details stay well inside HTTP/2 header
/// limits.
const MAX_TEXT: usize = 512;
const MAX_VIOLATIONS: usize = 32;

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        match e {
            BrokerError::Unauthenticated(why) => Status::unauthenticated(why),
            BrokerError::PeerThrottled { retry_in } => broker_raised(
                Code::Unauthenticated,
                "too many failed authentications from this address; try again later".into(),
                "PEER_AUTHENTICATION_THROTTLED",
                &[],
                Some(retry_in),
            ),
            BrokerError::CallerRateLimited { caller, retry_in } => broker_raised(
                Code::ResourceExhausted,
                format!("caller `{caller}` is over its rate_limit"),
                "CALLER_RATE_LIMITED",
                &[("caller", caller.as_str())],
                Some(retry_in),
            ),
            BrokerError::CallerSessionsLimited { caller, limit } => broker_raised(
                Code::ResourceExhausted,
                format!("caller `{caller}` already has {limit} session requests in flight"),
                "CALLER_CONCURRENCY_LIMITED",
                &[("caller", caller.as_str()), ("limit", &limit.to_string())],
                None,
            ),
            BrokerError::PermissionDenied { caller, reason } => {
                Status::permission_denied(format!("caller `{caller}` {reason}"))
            }
            BrokerError::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                let mut msg = String::from("invalid request:");
                for v in &violations {
                    msg.push_str(&format!(" {}: {};", v.field, v.description));
                    details.add_bad_request_violation(&v.field, &v.description);
                }
                msg.pop();
                Status::with_error_details(Code::InvalidArgument, msg, details)
            }
            BrokerError::UnknownTerminal(t) => Status::not_found(format!(
                "processing terminal `{t}` is not served by any configured credential"
            )),
            BrokerError::UnknownCredential(name) => {
                Status::not_found(format!("no credential is configured as `{name}`"))
            }
            BrokerError::OutOfRange {
                requested,
                lifetime,
            } => Status::out_of_range(format!(
                "min_validity {} is longer than a fresh Bearer token lives ({})",
                humantime::format_duration(requested),
                humantime::format_duration(lifetime)
            )),
            BrokerError::Upstream(u) => upstream(u, false, None, false),
            BrokerError::UpstreamBackingOff { error, retry_in } => {
                let hint = error.is_retryable().then_some(retry_in);
                upstream(error, false, hint, true)
            }
            BrokerError::SessionUnauthorizedAfterRefresh(u) => upstream(u, true, None, false),
            BrokerError::DeadlineExceeded => {
                Status::deadline_exceeded("the deadline ran out before Payroc answered")
            }
            BrokerError::RequestTimeout => broker_raised(
                Code::DeadlineExceeded,
                "the request did not arrive in full within the server's request_timeout".into(),
                "REQUEST_TIMEOUT",
                &[],
                None,
            ),
            BrokerError::Overloaded(msg) => {
                broker_raised(Code::ResourceExhausted, msg, "OVERLOADED", &[], None)
            }
            BrokerError::Internal(msg) => Status::internal(msg),
            BrokerError::ShuttingDown => broker_raised(
                Code::Unavailable,
                "the broker is shutting down; call again".into(),
                "SHUTTING_DOWN",
                &[],
                None,
            ),
        }
    }
}

/// A status for an error the broker raised itself: `ErrorInfo` in the
/// broker's domain, and `RetryInfo` when it knows when to come back.
fn broker_raised(
    code: Code,
    message: String,
    reason: &str,
    metadata: &[(&str, &str)],
    retry_in: Option<std::time::Duration>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        BROKER_DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<std::collections::HashMap<_, _>>(),
    );
    if let Some(wait) = retry_in {
        details.set_retry_info(Some(wait));
    }
    Status::with_error_details(code, message, details)
}

/// `retry_hint`: when the broker itself will next try (negative caching),
/// used for `RetryInfo` when Payroc gave no `Retry-After`. `backing_off`:
/// the broker answered from its negative cache without asking Payroc, so the
/// `ErrorInfo` is its own (`UPSTREAM_BACKING_OFF`, domain `payroc-broker`),
/// with Payroc's last answer in its metadata (`upstream_reason`, `status`...).
fn upstream(
    e: UpstreamError,
    after_refresh: bool,
    retry_hint: Option<std::time::Duration>,
    backing_off: bool,
) -> Status {
    let message = if after_refresh {
        format!("{e}, even with a freshly fetched Bearer token")
    } else {
        e.to_string()
    };
    let message = truncate(&message);
    let UpstreamError::Status {
        endpoint,
        status,
        problem,
        retry_after,
    } = e
    else {
        let code = match e {
            UpstreamError::Timeout { .. } | UpstreamError::Transport { .. } => Code::Unavailable,
            UpstreamError::DeadlineExceeded => Code::DeadlineExceeded,
            UpstreamError::Malformed { .. } | UpstreamError::Status { .. } => Code::Internal,
        };
        if backing_off {
            let (reason, endpoint) = match &e {
                UpstreamError::Timeout { endpoint } => ("TIMEOUT", Some(*endpoint)),
                UpstreamError::Transport { endpoint, .. } => ("TRANSPORT", Some(*endpoint)),
                UpstreamError::Malformed { endpoint, .. } => ("MALFORMED", Some(*endpoint)),
                _ => ("DEADLINE_EXCEEDED", None),
            };
            let mut metadata = vec![("upstream_reason", reason)];
            if let Some(endpoint) = endpoint {
                metadata.push(("endpoint", endpoint.label()));
            }
            return broker_raised(code, message, BACKING_OFF, &metadata, retry_hint);
        }
        return match retry_hint {
            Some(wait) => {
                Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(wait)))
            }
            None => Status::new(code, message),
        };
    };

    let code = match (status, endpoint) {
        (400 | 413, _) => Code::InvalidArgument,
        (401 | 403, Endpoint::Identity) => Code::FailedPrecondition,
        (401, Endpoint::Sessions) => Code::FailedPrecondition,
        (403, Endpoint::Sessions) => Code::PermissionDenied,
        (404, _) => Code::NotFound,
        (409, _) => Code::AlreadyExists,
        (429, _) => Code::ResourceExhausted,
        (408, _) | (500..=599, _) => Code::Unavailable,
        _ => Code::Internal, // 406, 415, and anything undocumented
    };

    let mut details = ErrorDetails::new();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("status".to_owned(), status.to_string());
    metadata.insert("endpoint".to_owned(), endpoint.label().to_owned());
    let reason = match &problem {
        Some(p) => {
            if let Some(t) = &p.title {
                metadata.insert("title".to_owned(), truncate(t));
            }
            if let Some(d) = &p.detail {
                metadata.insert("detail".to_owned(), truncate(d));
            }
            for f in p.errors.iter().take(MAX_VIOLATIONS) {
                let description = f
                    .message
                    .as_ref()
                    .or(f.detail.as_ref())
                    .map(|s| truncate(s))
                    .unwrap_or_default();
                details.add_bad_request_violation(
                    truncate(f.parameter.as_deref().unwrap_or("")),
                    description,
                );
            }
            p.reason()
        }
        None => "UPSTREAM_ERROR".to_owned(),
    };
    if backing_off {
        metadata.insert("upstream_reason".to_owned(), reason);
        details.set_error_info(BACKING_OFF, BROKER_DOMAIN, metadata);
    } else {
        details.set_error_info(reason, PAYROC_DOMAIN, metadata);
    }
    // The broker's own next attempt (negative cache) is fresher than a
    // Retry-After received earlier.
    if let Some(wait) = retry_hint.or(retry_after) {
        details.set_retry_info(Some(wait));
    }
    Status::with_error_details(code, message, details)
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        domain::error::FieldViolation,
        payroc::{Problem, problem::ProblemField},
    };

    fn upstream_status(endpoint: Endpoint, status: u16, problem: Option<Problem>) -> Status {
        BrokerError::Upstream(UpstreamError::Status {
            endpoint,
            status,
            problem: problem.map(Box::new),
            retry_after: None,
        })
        .into()
    }

    #[test]
    fn payroc_errors_become_bad_request_violations_with_payrocs_names() {
        let problem = Problem {
            type_uri: Some("https://docs.payroc.com/api/errors#bad-request".into()),
            title: Some("Bad request".into()),
            status: Some(400),
            detail: Some("One or more validation errors occurred".into()),
            errors: vec![
                ProblemField {
                    parameter: Some("libVersion".into()),
                    message: Some("Invalid format".into()),
                    ..ProblemField::default()
                },
                ProblemField {
                    parameter: None,
                    detail: Some("body must be an object".into()),
                    ..ProblemField::default()
                },
            ],
            ..Problem::default()
        };
        let s = upstream_status(Endpoint::Sessions, 400, Some(problem));
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        let v = &d.bad_request().unwrap().field_violations;
        assert_eq!(
            (v[0].field.as_str(), v[0].description.as_str()),
            ("libVersion", "Invalid format")
        );
        assert_eq!(
            (v[1].field.as_str(), v[1].description.as_str()),
            ("", "body must be an object")
        );
        let info = d.error_info().unwrap();
        assert_eq!(info.reason, "BAD_REQUEST");
        assert_eq!(info.domain, PAYROC_DOMAIN);
        assert_eq!(info.metadata["status"], "400");
        assert_eq!(info.metadata["endpoint"], "sessions");
        assert_eq!(info.metadata["title"], "Bad request");
        assert_eq!(
            info.metadata["detail"],
            "One or more validation errors occurred"
        );
    }

    #[test]
    fn a_body_that_is_no_problem_document_still_says_upstream_error() {
        let s = upstream_status(Endpoint::Identity, 502, None);
        assert_eq!(s.code(), Code::Unavailable);
        let info = s.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, "UPSTREAM_ERROR");
        assert_eq!(info.metadata["endpoint"], "identity");
        assert!(!info.metadata.contains_key("title"));
    }

    #[test]
    fn status_codes_depend_on_the_endpoint() {
        assert_eq!(
            upstream_status(Endpoint::Identity, 403, None).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            upstream_status(Endpoint::Sessions, 403, None).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            upstream_status(Endpoint::Identity, 401, None).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            upstream_status(Endpoint::Sessions, 408, None).code(),
            Code::Unavailable
        );
        assert_eq!(
            upstream_status(Endpoint::Sessions, 422, None).code(),
            Code::Internal
        );
    }

    #[test]
    fn retry_after_becomes_retry_info() {
        let s: Status = BrokerError::Upstream(UpstreamError::Status {
            endpoint: Endpoint::Sessions,
            status: 429,
            problem: None,
            retry_after: Some(Duration::from_secs(12)),
        })
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.get_error_details().retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(12))
        );
    }

    #[test]
    fn upstream_text_is_capped() {
        let problem = Problem {
            detail: Some("é".repeat(2000)),
            ..Problem::default()
        };
        let s = upstream_status(Endpoint::Sessions, 400, Some(problem));
        let details = s.get_error_details();
        let detail = &details.error_info().unwrap().metadata["detail"];
        assert!(
            detail.len() <= MAX_TEXT + '…'.len_utf8(),
            "{}",
            detail.len()
        );
        assert!(s.message().len() <= MAX_TEXT + '…'.len_utf8());
    }

    #[test]
    fn invalid_arguments_name_every_field() {
        let s: Status = BrokerError::InvalidArgument(vec![
            FieldViolation::new("processing_terminal_id", "is required"),
            FieldViolation::new("scenario", "is required"),
        ])
        .into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "invalid request: processing_terminal_id: is required; scenario: is required"
        );
        assert_eq!(
            s.get_error_details()
                .bad_request()
                .unwrap()
                .field_violations
                .len(),
            2
        );
    }

    #[test]
    fn errors_the_broker_raises_carry_its_domain() {
        let cases: Vec<(BrokerError, Code, &str, Option<Duration>)> = vec![
            (
                BrokerError::CallerRateLimited {
                    caller: "web".into(),
                    retry_in: Duration::from_millis(250),
                },
                Code::ResourceExhausted,
                "CALLER_RATE_LIMITED",
                Some(Duration::from_millis(250)),
            ),
            (
                BrokerError::CallerSessionsLimited {
                    caller: "web".into(),
                    limit: 16,
                },
                Code::ResourceExhausted,
                "CALLER_CONCURRENCY_LIMITED",
                None,
            ),
            (
                BrokerError::PeerThrottled {
                    retry_in: Duration::from_secs(60),
                },
                Code::Unauthenticated,
                "PEER_AUTHENTICATION_THROTTLED",
                Some(Duration::from_secs(60)),
            ),
            (
                BrokerError::Overloaded("64 session requests in flight".into()),
                Code::ResourceExhausted,
                "OVERLOADED",
                None,
            ),
            (
                BrokerError::UpstreamBackingOff {
                    error: UpstreamError::Timeout {
                        endpoint: Endpoint::Identity,
                    },
                    retry_in: Duration::from_secs(2),
                },
                Code::Unavailable,
                "UPSTREAM_BACKING_OFF",
                Some(Duration::from_secs(2)),
            ),
            (
                BrokerError::UpstreamBackingOff {
                    error: UpstreamError::Status {
                        endpoint: Endpoint::Identity,
                        status: 503,
                        problem: None,
                        retry_after: None,
                    },
                    retry_in: Duration::from_secs(3),
                },
                Code::Unavailable,
                "UPSTREAM_BACKING_OFF",
                Some(Duration::from_secs(3)),
            ),
        ];
        for (error, code, reason, retry) in cases {
            let what = format!("{error:?}");
            let s: Status = error.into();
            assert_eq!(s.code(), code, "{what}");
            let d = s.get_error_details();
            let info = d.error_info().unwrap_or_else(|| panic!("{what}"));
            assert_eq!(
                (info.domain.as_str(), info.reason.as_str()),
                (BROKER_DOMAIN, reason),
                "{what}"
            );
            assert_eq!(d.retry_info().and_then(|r| r.retry_delay), retry, "{what}");
        }
        let s: Status = BrokerError::CallerRateLimited {
            caller: "web".into(),
            retry_in: Duration::from_secs(1),
        }
        .into();
        assert_eq!(
            s.get_error_details().error_info().unwrap().metadata["caller"],
            "web"
        );
        let s: Status = BrokerError::UpstreamBackingOff {
            error: UpstreamError::Timeout {
                endpoint: Endpoint::Identity,
            },
            retry_in: Duration::from_secs(2),
        }
        .into();
        let d = s.get_error_details();
        let meta = &d.error_info().unwrap().metadata;
        assert_eq!(
            (meta["upstream_reason"].as_str(), meta["endpoint"].as_str()),
            ("TIMEOUT", "identity")
        );
    }
}
