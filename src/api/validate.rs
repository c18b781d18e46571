//! Request validation: proto messages in, domain values or field violations
//! out. Pure functions, no I/O and no state, so the handlers stay short and
//! the fuzzer (`payroc_broker::fuzzing::request_validation`) can drive them.
//!
//! Every violated field is reported, not just the first, each named by its
//! proto field name.

use std::time::Duration;

use uuid::Uuid;

use crate::{
    domain::error::FieldViolation,
    payroc::{self, Scenario},
    proto,
};

/// A valid `GetBearerToken` / `WatchBearerToken` request, borrowing the
/// request's terminal (a cached call needs no copy of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerQuery<'a> {
    pub processing_terminal_id: &'a str,
    /// `None`: the configured floor.
    pub min_validity: Option<Duration>,
}

/// A valid `CreateSession` request, before defaults are applied (the
/// domain fills them in).
pub use crate::domain::broker::SessionQuery;

/// Checks a Bearer token request (`GetBearerToken`, `WatchBearerToken`).
pub fn bearer(
    processing_terminal_id: &str,
    min_validity: Option<prost_types::Duration>,
) -> Result<BearerQuery<'_>, Vec<FieldViolation>> {
    let mut bad = Vec::new();
    check_terminal(processing_terminal_id, &mut bad);
    let min_validity = match min_validity {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            bad.push(FieldViolation::new("min_validity", "must not be negative"));
            None
        }
        Some(d) => match Duration::try_from(d) {
            Ok(d) => Some(d),
            Err(_) => {
                bad.push(FieldViolation::new(
                    "min_validity",
                    "is not a valid duration",
                ));
                None
            }
        },
    };
    if bad.is_empty() {
        Ok(BearerQuery {
            processing_terminal_id,
            min_validity,
        })
    } else {
        Err(bad)
    }
}

/// Checks a `CreateSession` request.
pub fn session(msg: proto::CreateSessionRequest) -> Result<SessionQuery, Vec<FieldViolation>> {
    let mut bad = Vec::new();
    check_terminal(&msg.processing_terminal_id, &mut bad);
    let scenario = match proto::Scenario::try_from(msg.scenario) {
        Ok(proto::Scenario::Payment) => Some(Scenario::Payment),
        Ok(proto::Scenario::Tokenization) => Some(Scenario::Tokenization),
        Ok(proto::Scenario::Unspecified) => {
            bad.push(FieldViolation::new(
                "scenario",
                "is required: SCENARIO_PAYMENT or SCENARIO_TOKENIZATION",
            ));
            None
        }
        Err(_) => {
            bad.push(FieldViolation::new(
                "scenario",
                format!("{} is not a Scenario value", msg.scenario),
            ));
            None
        }
    };
    if !msg.lib_version.is_empty() && !payroc::is_valid_lib_version(&msg.lib_version) {
        // The value is echoed to help the caller, escaped and capped: it is
        // request text, and must not be able to forge anything downstream.
        bad.push(FieldViolation::new(
            "lib_version",
            format!(
                "{:?} does not match Payroc's pattern (digits like 1.7.0.261457, optionally 1.2.0-beta.135020)",
                msg.lib_version.chars().take(64).collect::<String>()
            ),
        ));
    }
    if !msg.secure_token_id.is_empty() && !payroc::is_valid_secure_token_id(&msg.secure_token_id) {
        bad.push(FieldViolation::new(
            "secure_token_id",
            "must be 1 to 200 characters",
        ));
    }
    let idempotency_key = if msg.idempotency_key.is_empty() {
        None
    } else {
        match Uuid::try_parse(&msg.idempotency_key) {
            Ok(u) if u.get_version_num() == 4 && u.get_variant() == uuid::Variant::RFC4122 => {
                Some(u)
            }
            _ => {
                bad.push(FieldViolation::new(
                    "idempotency_key",
                    "must be a UUID v4, or empty to have one generated",
                ));
                None
            }
        }
    };
    match scenario {
        Some(scenario) if bad.is_empty() => Ok(SessionQuery {
            processing_terminal_id: msg.processing_terminal_id,
            scenario,
            lib_version: Some(msg.lib_version).filter(|v| !v.is_empty()),
            secure_token_id: Some(msg.secure_token_id).filter(|s| !s.is_empty()),
            idempotency_key,
        }),
        _ => Err(bad),
    }
}

fn check_terminal(id: &str, bad: &mut Vec<FieldViolation>) {
    if id.is_empty() {
        bad.push(FieldViolation::new("processing_terminal_id", "is required"));
    } else if !payroc::is_valid_terminal_id(id) {
        // The id itself is not echoed: it may hold control characters.
        bad.push(FieldViolation::new(
            "processing_terminal_id",
            format!(
                "{} (got {} characters)",
                payroc::TERMINAL_ID_RULE,
                id.chars().count()
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: Vec<FieldViolation>) -> Vec<String> {
        e.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn every_bad_session_field_is_named() {
        let e = session(proto::CreateSessionRequest {
            processing_terminal_id: "12".into(),
            scenario: 0,
            lib_version: "x".into(),
            secure_token_id: "s".repeat(201),
            idempotency_key: "not-a-uuid".into(),
        })
        .unwrap_err();
        assert_eq!(
            fields(e),
            [
                "processing_terminal_id",
                "scenario",
                "lib_version",
                "secure_token_id",
                "idempotency_key"
            ]
        );
    }

    #[test]
    fn a_good_session_request_keeps_its_values() {
        let key = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
        let q = session(proto::CreateSessionRequest {
            processing_terminal_id: "1234001".into(),
            scenario: proto::Scenario::Tokenization as i32,
            lib_version: String::new(),
            secure_token_id: String::new(),
            idempotency_key: key.into(),
        })
        .unwrap();
        assert_eq!(q.scenario, Scenario::Tokenization);
        assert_eq!(q.lib_version, None);
        assert_eq!(q.secure_token_id, None);
        assert_eq!(q.idempotency_key, Some(Uuid::parse_str(key).unwrap()));
    }

    #[test]
    fn terminal_ids_outside_the_alphabet_are_refused() {
        for id in ["1234\r\n001", "1234/../5", "12 34", "1234\u{0}"] {
            let e = bearer(id, None).unwrap_err();
            assert_eq!(fields(e.clone()), ["processing_terminal_id"], "{id:?}");
            assert!(e[0].description.contains("A-Z a-z 0-9 _ -"), "{e:?}");
            assert!(!e[0].description.contains(id), "{e:?}");
            let e = session(proto::CreateSessionRequest {
                processing_terminal_id: id.into(),
                scenario: proto::Scenario::Payment as i32,
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(fields(e), ["processing_terminal_id"], "{id:?}");
        }
        assert!(bearer("Term_01-a", None).is_ok());
    }

    #[test]
    fn negative_min_validity_is_refused() {
        let e = bearer(
            "1234001",
            Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        )
        .unwrap_err();
        assert_eq!(fields(e), ["min_validity"]);
        let q = bearer("1234001", None).unwrap();
        assert_eq!(q.min_validity, None);
    }
}
