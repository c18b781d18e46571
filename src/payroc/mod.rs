//! Payroc's HTTP API: the identity service (API key -> Bearer token) and the
//! hosted-fields-sessions endpoint (Bearer token -> session token), with
//! problem-document parsing and one retry policy for both.
//!
//! This module knows HTTP and Payroc's rules; it knows nothing of caching,
//! callers, metrics or gRPC. Whoever counts its exchanges hands it an
//! [`AttemptObserver`].

mod client;
mod error;
mod observe;
pub(crate) mod problem;
mod retry;

pub use client::{IdentityToken, PayrocClient, Scenario, Session, SessionRequest, Settings};
pub use error::{Endpoint, UpstreamError};
pub use observe::{Attempt, AttemptObserver, AttemptTrace};
#[cfg(any(fuzzing, test))]
pub use problem::Problem;

/// A session token lives 10 minutes (Payroc's documentation); used when a
/// response omits `expiresAt`, as the official SDKs allow.
pub const SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// `processingTerminalId`: 4 to 50 of `A-Z a-z 0-9 _ -`. Payroc documents only
/// the length; the alphabet is the broker's own rule, because the id becomes a
/// URL path segment and a log field: CR, LF, NUL, `/`, `?`, `#` or spaces could
/// name another terminal upstream or forge log lines.
pub fn is_valid_terminal_id(id: &str) -> bool {
    (4..=50).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The rule of [`is_valid_terminal_id`], in words, for error messages.
pub const TERMINAL_ID_RULE: &str = "must be 4 to 50 of A-Z a-z 0-9 _ -";

/// `secureTokenId`: 1 to 200 characters.
pub fn is_valid_secure_token_id(id: &str) -> bool {
    (1..=200).contains(&id.chars().count())
}

/// `libVersion`: `^\d{1,2}\.\d{1,2}\.\d{1,2}(-beta)?\.\d+$`.
pub fn is_valid_lib_version(v: &str) -> bool {
    fn digits(s: &str, max: usize) -> bool {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    }
    let parts: Vec<&str> = v.split('.').collect();
    let [major, minor, patch, build] = parts.as_slice() else {
        return false;
    };
    let patch = patch.strip_suffix("-beta").unwrap_or(patch);
    digits(major, 2) && digits(minor, 2) && digits(patch, 2) && digits(build, usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lib_versions_follow_payrocs_pattern() {
        for ok in [
            "1.2.0-beta.135020",
            "1.3.0.135534",
            "1.6.0.172441",
            "1.7.0.261457",
            "10.20.30.1",
        ] {
            assert!(is_valid_lib_version(ok), "{ok}");
        }
        for bad in [
            "",
            "1.7.0",
            "1.7.0.x",
            "100.1.1.1",
            "1.7.0-alpha.1",
            "1.7.0.261457 ",
            "1..0.1",
            "v1.7.0.1",
            "1.7.0-beta.",
            "1.7.0.1.2",
        ] {
            assert!(!is_valid_lib_version(bad), "{bad}");
        }
    }

    #[test]
    fn terminal_ids_are_4_to_50_of_a_safe_alphabet() {
        assert!(!is_valid_terminal_id("123"));
        assert!(is_valid_terminal_id("1234"));
        assert!(is_valid_terminal_id("Ab_9-z"));
        assert!(is_valid_terminal_id(&"1".repeat(50)));
        assert!(!is_valid_terminal_id(&"1".repeat(51)));
        for bad in [
            "1234\r\n001",
            "1234\n",
            "12\u{0}34",
            "12/34",
            "1234?x",
            "1234#x",
            "12 34",
            "12.34",
            "éééé",
            "1234%2F",
        ] {
            assert!(!is_valid_terminal_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn lengths_count_characters() {
        assert!(!is_valid_secure_token_id(""));
        assert!(is_valid_secure_token_id(&"x".repeat(200)));
        assert!(!is_valid_secure_token_id(&"x".repeat(201)));
    }
}
