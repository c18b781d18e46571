//! Where `api_key_env` and `token_env` values come from.
//!
//! Tests and `check-config` hand the parser a plain lookup function. `serve`
//! uses [`CapturedEnv`]: it reads each secret variable once, at start-up,
//! keeps what the configuration needs of it (an API key as a wiped-on-drop
//! secret, a caller token as its SHA-256 digest only) and reports the names
//! it read, so `main` can remove them from the process environment (and
//! `/proc/PID/environ`). A SIGHUP reload then gets the same values from the
//! capture: a running process's environment cannot change from outside
//! anyway, so nothing is lost.

use std::{collections::HashMap, sync::Mutex};

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::sha256;

/// What the configuration keeps of a caller token: its digest and length.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest {
    pub sha256: [u8; 32],
    /// Characters of the token (surrounding whitespace dropped).
    pub chars: usize,
}

impl TokenDigest {
    /// Of `token`, surrounding whitespace dropped.
    pub fn of(token: &str) -> TokenDigest {
        let token = token.trim();
        TokenDigest {
            sha256: sha256(token.as_bytes()),
            chars: token.chars().count(),
        }
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(<redacted>)")
    }
}

/// A source of `*_env` secrets.
pub trait SecretEnv {
    /// The value of variable `name` as it is set (untrimmed), or `None`.
    fn secret(&self, name: &str) -> Option<SecretString>;

    /// A caller token in variable `name`, reduced to its digest.
    fn token(&self, name: &str) -> Option<TokenDigest> {
        self.secret(name)
            .map(|s| TokenDigest::of(s.expose_secret()))
    }
}

/// Any `Fn(&str) -> Option<String>` (such as [`super::process_env`], or a
/// map in tests) is a source; the `String` it returns is wiped after use.
impl<F: Fn(&str) -> Option<String>> SecretEnv for F {
    fn secret(&self, name: &str) -> Option<SecretString> {
        self(name).map(|v| SecretString::from(Zeroizing::new(v).as_str()))
    }
}

enum Captured {
    Secret(SecretString),
    Token(TokenDigest),
}

/// The process environment, each secret variable read once and remembered
/// (see the module documentation). Variables that were not set are not
/// remembered: they are looked up again on each load.
#[derive(Default)]
pub struct CapturedEnv {
    seen: Mutex<HashMap<String, Captured>>,
}

impl CapturedEnv {
    pub fn new() -> CapturedEnv {
        CapturedEnv::default()
    }

    /// The variables read from the process environment so far.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().keys().cloned().collect();
        names.sort();
        names
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Captured>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (each update is one insert), so a poisoned lock is still good.
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SecretEnv for CapturedEnv {
    fn secret(&self, name: &str) -> Option<SecretString> {
        let mut seen = self.lock();
        match seen.get(name) {
            Some(Captured::Secret(s)) => Some(s.clone()),
            // Read at start-up as a caller token: only its digest was kept,
            // and the variable is gone from the environment.
            Some(Captured::Token(_)) => None,
            None => {
                let value = super::process_env.secret(name)?;
                seen.insert(name.to_owned(), Captured::Secret(value.clone()));
                Some(value)
            }
        }
    }

    fn token(&self, name: &str) -> Option<TokenDigest> {
        let mut seen = self.lock();
        match seen.get(name) {
            Some(Captured::Token(d)) => Some(*d),
            Some(Captured::Secret(s)) => Some(TokenDigest::of(s.expose_secret())),
            None => {
                let digest = super::process_env.token(name)?;
                seen.insert(name.to_owned(), Captured::Token(digest));
                Some(digest)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_sources() {
        let f = |n: &str| (n == "A").then(|| " token-value ".to_owned());
        assert_eq!(f.secret("A").unwrap().expose_secret(), " token-value ");
        assert!(f.secret("B").is_none());
        let d = f.token("A").unwrap();
        assert_eq!(d.sha256, sha256(b"token-value"));
        assert_eq!(d.chars, 11);
        assert_eq!(format!("{d:?}"), "TokenDigest(<redacted>)");
    }

    #[test]
    fn a_capture_reads_each_variable_once_and_names_it() {
        // PATH is set in any test environment and is not secret; nothing is
        // removed here (removing needs the single-threaded start of `main`).
        let env = CapturedEnv::new();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(env.secret("PATH").unwrap().expose_secret(), path);
        assert!(env.secret("PAYROC_BROKER_SURELY_UNSET_1").is_none());
        assert_eq!(env.names(), ["PATH"]);
        // Served from the capture from now on.
        env.lock().insert(
            "PATH".into(),
            Captured::Secret(SecretString::from("captured")),
        );
        assert_eq!(env.secret("PATH").unwrap().expose_secret(), "captured");
        assert_eq!(env.token("PATH").unwrap().sha256, sha256(b"captured"));
    }

    #[test]
    fn a_captured_token_keeps_only_its_digest() {
        let env = CapturedEnv::new();
        let home = std::env::var("PATH").unwrap();
        let d = env.token("PATH").unwrap();
        assert_eq!(d, TokenDigest::of(&home));
        assert!(matches!(env.lock().get("PATH"), Some(Captured::Token(_))));
        assert_eq!(env.token("PATH"), Some(d));
        // Asked for as a plain secret later, it is not there to give.
        assert!(env.secret("PATH").is_none());
    }
}
