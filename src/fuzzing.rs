//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the
//! tests below, which replay the committed seed corpus on every `cargo test`
//! so CI covers what the fuzzers found (see `fuzz/README.md`).
//!
//! Each harness takes arbitrary bytes, runs one parser of untrusted input, and
//! asserts the invariants the rest of the broker relies on. A panic is a
//! finding. Not part of the API: compiled only for cargo-fuzz (which sets
//! `--cfg fuzzing`) and for the crate's own tests, never into the product.

use std::path::Path;

use tonic::Status;

use crate::{
    config::Config,
    domain::error::BrokerError,
    payroc::{Endpoint, Problem, UpstreamError},
};

/// A secret that a hostile Payroc might echo back; it must never survive
/// redaction into a status.
const ECHOED_SECRET: &str = "sk_fuzz_SECRET_api_key_0123456789";

/// Problem documents from Payroc: parse, derive the ErrorInfo reason, redact,
/// and map to a gRPC status with rich details.
///
/// The first byte picks the content type and the status code; the rest is the
/// body.
pub fn problem_document(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 4 {
        0 => None,
        1 => Some("application/problem+json"),
        2 => Some("application/json; charset=utf-8"),
        _ => Some("text/html"),
    };
    let Some(mut problem) = Problem::parse(content_type, body) else {
        return;
    };
    let reason = problem.reason();
    assert!(
        reason.len() >= 3
            && reason.len() <= 63
            && reason.starts_with(|c: char| c.is_ascii_uppercase())
            && !reason.ends_with('_')
            && reason
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
        "reason {reason:?} does not fit google.rpc.ErrorInfo.reason"
    );
    problem.redact(ECHOED_SECRET);
    const STATUSES: [u16; 12] = [400, 401, 403, 404, 406, 409, 413, 415, 429, 500, 502, 503];
    let status = STATUSES[usize::from(selector >> 2) % STATUSES.len()];
    let endpoint = if selector & 0x80 == 0 {
        Endpoint::Identity
    } else {
        Endpoint::Sessions
    };
    let status: Status = BrokerError::Upstream(UpstreamError::Status {
        endpoint,
        status,
        problem: Some(Box::new(problem)),
        retry_after: None,
    })
    .into();
    assert!(
        !status.message().contains(ECHOED_SECRET),
        "an echoed secret reached the status message"
    );
    assert!(
        !String::from_utf8_lossy(status.details()).contains(ECHOED_SECRET),
        "an echoed secret reached the status details"
    );
}

/// The configuration file: arbitrary TOML must give a configuration or
/// problems naming keys, never a panic, and never echo a secret's value.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "FUZZ_KEY").then(|| ECHOED_SECRET.to_owned());
    match Config::parse(
        text,
        Path::new("fuzz.toml"),
        Path::new("/nonexistent"),
        &env,
    ) {
        Ok(config) => {
            assert!(!format!("{config:?}").contains(ECHOED_SECRET));
        }
        Err(e) => {
            assert!(!e.problems.is_empty(), "an error without a problem");
            assert!(
                !e.to_string().contains(ECHOED_SECRET),
                "a secret reached a configuration error"
            );
        }
    }
}

/// Request validation on wire bytes: the first byte picks the message
/// (`GetBearerTokenRequest` or `CreateSessionRequest`), the rest is decoded as
/// protobuf the way tonic would, then validated. Accepted requests must obey
/// every rule; refused ones must name only real proto fields.
pub fn request_validation(data: &[u8]) {
    use prost::Message;

    use crate::{api::validate, proto};

    let Some((&selector, wire)) = data.split_first() else {
        return;
    };
    let known = |fields: &[crate::domain::error::FieldViolation]| {
        assert!(!fields.is_empty(), "refused without a field violation");
        for f in fields {
            assert!(
                [
                    "processing_terminal_id",
                    "min_validity",
                    "scenario",
                    "lib_version",
                    "secure_token_id",
                    "idempotency_key"
                ]
                .contains(&f.field.as_str()),
                "unknown field name {:?}",
                f.field
            );
        }
    };
    if selector % 2 == 0 {
        let Ok(msg) = proto::GetBearerTokenRequest::decode(wire) else {
            return;
        };
        match validate::bearer(&msg.processing_terminal_id, msg.min_validity) {
            Ok(q) => assert!(crate::payroc::is_valid_terminal_id(
                q.processing_terminal_id
            )),
            Err(fields) => known(&fields),
        }
    } else {
        let Ok(msg) = proto::CreateSessionRequest::decode(wire) else {
            return;
        };
        match validate::session(msg) {
            Ok(q) => {
                assert!(crate::payroc::is_valid_terminal_id(
                    &q.processing_terminal_id
                ));
                if let Some(v) = &q.lib_version {
                    assert!(crate::payroc::is_valid_lib_version(v));
                }
                if let Some(k) = q.idempotency_key {
                    assert_eq!(k.get_version_num(), 4);
                }
            }
            Err(fields) => known(&fields),
        }
    }
}

/// Envoy's `x-forwarded-client-cert`: a header any peer can send. Parsing must
/// be total; what parses must survive a round trip (written back with
/// quoting, it parses to the same elements), and the SPIFFE IDs believed are
/// exactly the `URI=` values of the last element.
pub fn xfcc(data: &[u8]) {
    use crate::access::forwarded::{XfccElement, parse_xfcc, xfcc_last_uris};

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(elements) = parse_xfcc(text) else {
        assert!(xfcc_last_uris(text).is_err());
        return;
    };
    let last: Vec<String> = elements
        .last()
        .map(|e| e.uris().map(str::to_owned).collect())
        .unwrap_or_default();
    assert_eq!(xfcc_last_uris(text).unwrap(), last);

    fn write(elements: &[XfccElement]) -> String {
        let quote = |v: &str| {
            if v.contains([',', ';', '"', '\\', '='])
                || v.is_empty()
                || v.starts_with(char::is_whitespace)
                || v.ends_with(char::is_whitespace)
            {
                format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
            } else {
                v.to_owned()
            }
        };
        elements
            .iter()
            .map(|e| {
                e.pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={}", quote(v)))
                    .collect::<Vec<_>>()
                    .join(";")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
    let written = write(&elements);
    if written.len() <= crate::access::forwarded::MAX_XFCC_LEN {
        assert_eq!(
            parse_xfcc(&written).as_ref(),
            Ok(&elements),
            "round trip of {text:?} via {written:?}"
        );
    }
}

/// Replays the fuzzers' committed seed corpus (`fuzz/corpus/<target>/`)
/// through the same harnesses, so every `cargo test` re-checks what fuzzing
/// found without needing a nightly toolchain.
#[cfg(test)]
mod corpus {
    use std::path::Path;

    fn replay(target: &str, harness: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| harness(&data));
            assert!(result.is_ok(), "{} panicked on {}", target, path.display());
            inputs += 1;
        }
        assert!(inputs > 0, "no seed corpus in {}", dir.display());
    }

    #[test]
    fn problem_document_corpus() {
        replay("problem_document", super::problem_document);
    }

    #[test]
    fn config_file_corpus() {
        replay("config_file", super::config_file);
    }

    #[test]
    fn request_validation_corpus() {
        replay("request_validation", super::request_validation);
    }

    #[test]
    fn xfcc_corpus() {
        replay("xfcc", super::xfcc);
    }
}
