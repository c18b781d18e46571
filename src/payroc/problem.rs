//! RFC 7807 problem documents, as Payroc sends them.
//!
//! Every field is optional: Payroc documents the shape but the identity
//! service's error bodies are not documented at all, so parsing is tolerant and
//! a body that is not a problem document simply yields `None`.

use serde::Deserialize;

/// A parsed problem document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: Option<String>,
    pub title: Option<String>,
    pub status: Option<u16>,
    pub detail: Option<String>,
    pub instance: Option<String>,
    pub errors: Vec<ProblemField>,
}

/// One entry of a problem's `errors[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ProblemField {
    pub parameter: Option<String>,
    pub detail: Option<String>,
    pub message: Option<String>,
}

impl Problem {
    /// Parses `body` as a problem document when the content type allows it
    /// (`application/problem+json`, or `application/json` since Payroc's
    /// content type is unconfirmed) and it is a JSON object.
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Option<Problem> {
        let essence = content_type
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        if !(essence == "application/problem+json"
            || essence == "application/json"
            || essence.is_empty())
        {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        if !value.is_object() {
            return None;
        }
        serde_json::from_value(value).ok()
    }

    /// The `type` anchor in upper snake case (`#idempotency-key-in-use` ->
    /// `IDEMPOTENCY_KEY_IN_USE`), or `UPSTREAM_ERROR` when there is none.
    /// The result always fits `google.rpc.ErrorInfo.reason`'s
    /// `[A-Z][A-Z0-9_]+[A-Z0-9]` form.
    pub fn reason(&self) -> String {
        let anchor = self
            .type_uri
            .as_deref()
            .and_then(|t| t.split_once('#'))
            .map(|(_, a)| a)
            .unwrap_or("");
        let mut out = String::with_capacity(anchor.len());
        for c in anchor.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' => out.push(c.to_ascii_uppercase()),
                _ if !out.is_empty() && !out.ends_with('_') => out.push('_'),
                _ => {}
            }
            if out.len() >= 63 {
                break;
            }
        }
        let out = out.trim_end_matches('_');
        if out.len() < 3 || !out.starts_with(|c: char| c.is_ascii_uppercase()) {
            "UPSTREAM_ERROR".to_owned()
        } else {
            out.to_owned()
        }
    }

    /// Replaces every occurrence of `secret` in the document's free text, so a
    /// server that echoes a credential back cannot leak it into our errors.
    pub fn redact(&mut self, secret: &str) {
        if secret.len() < 4 {
            return; // too short to find meaningfully; keys and tokens never are
        }
        let fix = |s: &mut Option<String>| {
            if let Some(v) = s.as_mut()
                && v.contains(secret)
            {
                *v = v.replace(secret, "[REDACTED]");
            }
        };
        fix(&mut self.type_uri);
        fix(&mut self.title);
        fix(&mut self.detail);
        fix(&mut self.instance);
        for e in &mut self.errors {
            fix(&mut e.parameter);
            fix(&mut e.detail);
            fix(&mut e.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payroc_documents() {
        let body = br#"{
            "type": "https://docs.payroc.com/api/errors#bad-request",
            "title": "Bad request", "status": 400, "detail": "One or more validation errors occurred",
            "errors": [{"parameter": "libVersion", "detail": "bad", "message": "Invalid format"}],
            "link": {"rel": "about", "method": "GET", "href": "https://docs.payroc.com"},
            "somethingNew": 1
        }"#;
        let p = Problem::parse(Some("application/problem+json; charset=utf-8"), body).unwrap();
        assert_eq!(p.status, Some(400));
        assert_eq!(p.reason(), "BAD_REQUEST");
        assert_eq!(p.errors[0].parameter.as_deref(), Some("libVersion"));
        assert_eq!(p.errors[0].message.as_deref(), Some("Invalid format"));
    }

    #[test]
    fn tolerates_missing_fields_and_plain_json() {
        let p = Problem::parse(Some("application/json"), br#"{"title": "Nope"}"#).unwrap();
        assert_eq!(p.title.as_deref(), Some("Nope"));
        assert_eq!(p.reason(), "UPSTREAM_ERROR");
        assert!(p.errors.is_empty());
        // Wrong types in a field make the whole thing "not a problem document",
        // rather than a crash or a half-parsed lie.
        assert_eq!(Problem::parse(None, br#"{"status": "four hundred"}"#), None);
    }

    #[test]
    fn rejects_non_problem_bodies() {
        assert_eq!(Problem::parse(Some("text/html"), b"<h1>502</h1>"), None);
        assert_eq!(Problem::parse(Some("application/json"), b"{not json"), None);
        assert_eq!(Problem::parse(Some("application/json"), b"[1,2]"), None);
        assert_eq!(Problem::parse(Some("application/json"), b""), None);
    }

    #[test]
    fn reasons_are_upper_snake() {
        let r = |t: &str| {
            Problem {
                type_uri: Some(t.into()),
                ..Problem::default()
            }
            .reason()
        };
        assert_eq!(
            r("https://docs.payroc.com/api/errors#idempotency-key-in-use"),
            "IDEMPOTENCY_KEY_IN_USE"
        );
        assert_eq!(
            r("https://docs.payroc.com/api/errors#not-authorized"),
            "NOT_AUTHORIZED"
        );
        assert_eq!(r("https://docs.payroc.com/api/errors"), "UPSTREAM_ERROR");
        assert_eq!(r("about:blank#--"), "UPSTREAM_ERROR");
        assert_eq!(r("x#9lives"), "UPSTREAM_ERROR");
        assert_eq!(r(&format!("x#{}", "a-".repeat(80))).len(), 63);
    }

    #[test]
    fn redacts_echoed_secrets() {
        let mut p = Problem {
            detail: Some("token abcd1234 expired".into()),
            errors: vec![ProblemField {
                message: Some("abcd1234".into()),
                ..ProblemField::default()
            }],
            ..Problem::default()
        };
        p.redact("abcd1234");
        assert_eq!(p.detail.as_deref(), Some("token [REDACTED] expired"));
        assert_eq!(p.errors[0].message.as_deref(), Some("[REDACTED]"));
    }
}
