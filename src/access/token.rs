//! Caller tokens: `authorization: Bearer <token>` metadata (and, on the
//! identity endpoint, `x-api-key`), matched by SHA-256 digest in constant
//! time.
//!
//! The broker keeps only digests of caller tokens. The presented token is
//! hashed and compared with every configured digest, whatever matches, so
//! neither the tokens nor the timing of a refusal say anything about them.

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::config::sha256;

/// Header names looked up on every call: made once, not parsed from a
/// string per lookup.
const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// What the `authorization` metadata holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No `authorization` entry.
    Nothing,
    /// More than one: which one a proxy or the broker would read is anybody's
    /// guess, so the call is refused.
    Several,
    /// An entry that is not `Bearer <token>`.
    Malformed,
    Token(&'a str),
}

/// Which headers carry a caller token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Headers {
    /// `authorization: Bearer <token>` (the gRPC port).
    Authorization,
    /// `x-api-key: <token>`, where an SDK puts its API key, or
    /// `authorization: Bearer <token>` (the identity endpoint). Both may be
    /// sent if they agree.
    ApiKeyOrAuthorization,
}

impl Headers {
    /// What the request holds.
    pub fn read(self, metadata: &MetadataMap) -> Presented<'_> {
        match self {
            Headers::Authorization => presented(metadata),
            Headers::ApiKeyOrAuthorization => match (api_key(metadata), presented(metadata)) {
                (Presented::Nothing, other) | (other, Presented::Nothing) => other,
                (Presented::Token(a), Presented::Token(b)) if a == b => Presented::Token(a),
                // Two credentials that disagree (or one unreadable beside
                // another): which is the caller's is not for the broker to
                // guess.
                _ => Presented::Several,
            },
        }
    }
}

/// Reads the `x-api-key` header: its whole value is the token.
fn api_key(metadata: &MetadataMap) -> Presented<'_> {
    let mut all = metadata.as_ref().get_all(&X_API_KEY).iter();
    let Some(value) = all.next() else {
        return Presented::Nothing;
    };
    if all.next().is_some() {
        return Presented::Several;
    }
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map_or(Presented::Malformed, Presented::Token)
}

/// Reads the `authorization` metadata.
pub fn presented(metadata: &MetadataMap) -> Presented<'_> {
    let mut all = metadata
        .as_ref()
        .get_all(http::header::AUTHORIZATION)
        .iter();
    let Some(value) = all.next() else {
        return Presented::Nothing;
    };
    if all.next().is_some() {
        return Presented::Several;
    }
    value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .map_or(Presented::Malformed, Presented::Token)
}

/// The index of the digest in `digests` that `token` hashes to, comparing
/// with every one.
pub fn find<'a>(token: &str, digests: impl Iterator<Item = &'a [u8; 32]>) -> Option<usize> {
    let presented = sha256(token.as_bytes());
    let mut found = None;
    for (i, d) in digests.enumerate() {
        if bool::from(d.ct_eq(&presented)) {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(values: &[&str]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for v in values {
            m.append("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn the_authorization_entry_is_read_strictly() {
        assert_eq!(presented(&md(&[])), Presented::Nothing);
        assert_eq!(presented(&md(&["Bearer abc"])), Presented::Token("abc"));
        assert_eq!(presented(&md(&["bearer  abc "])), Presented::Token("abc"));
        for bad in ["abc", "Basic abc", "Bearer ", "Bearer"] {
            assert_eq!(presented(&md(&[bad])), Presented::Malformed, "{bad:?}");
        }
        assert_eq!(
            presented(&md(&["Bearer abc", "Bearer def"])),
            Presented::Several
        );
        assert_eq!(presented(&md(&["Bearer abc", "x"])), Presented::Several);
    }

    #[test]
    fn an_api_key_and_a_bearer_token_must_agree() {
        let read = |key: &[&str], auth: &[&str]| {
            let mut m = md(auth);
            for k in key {
                m.append("x-api-key", k.parse().unwrap());
            }
            format!("{:?}", Headers::ApiKeyOrAuthorization.read(&m))
        };
        assert_eq!(read(&[], &[]), "Nothing");
        assert_eq!(read(&["abc"], &[]), "Token(\"abc\")");
        assert_eq!(read(&[], &["Bearer abc"]), "Token(\"abc\")");
        assert_eq!(read(&["abc"], &["Bearer abc"]), "Token(\"abc\")");
        assert_eq!(read(&["abc"], &["Bearer def"]), "Several");
        assert_eq!(read(&["abc", "abc"], &[]), "Several");
        assert_eq!(read(&["abc"], &["Bearer abc", "Bearer abc"]), "Several");
        assert_eq!(read(&["abc"], &["Basic abc"]), "Several");
        assert_eq!(read(&[" "], &[]), "Malformed");
        // The gRPC port does not read `x-api-key`.
        let mut m = MetadataMap::new();
        m.append("x-api-key", "abc".parse().unwrap());
        assert_eq!(Headers::Authorization.read(&m), Presented::Nothing);
    }

    #[test]
    fn tokens_are_found_by_digest() {
        let digests = [sha256(b"one"), sha256(b"two")];
        assert_eq!(find("two", digests.iter()), Some(1));
        assert_eq!(find("three", digests.iter()), None);
    }
}
