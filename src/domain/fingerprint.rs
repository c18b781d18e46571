//! What the audit trail records of a token: the first 8 hex digits of its
//! SHA-256, enough to match an event with a token a caller reports, useless
//! to anyone else.
//!
//! A Bearer token's fingerprint is computed once, when the token enters the
//! cache (see `tokens::policy::cache_entry`): the token changes about once
//! an hour, the calls that hand it out and are audited come by the
//! thousand a second.

use std::fmt;

use crate::config::sha256;

/// A token's fingerprint, as 8 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    pub fn of(secret: &str) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = sha256(secret.as_bytes());
        let mut hex = [0; 8];
        for (i, b) in digest[..4].iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_8_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf 8f01cfea ...
        assert_eq!(Fingerprint::of("abc").as_str(), "ba7816bf");
        assert_eq!(Fingerprint::of("abc").to_string(), "ba7816bf");
        // sha256("") = e3b0c442 ...
        assert_eq!(Fingerprint::of("").as_str(), "e3b0c442");
    }
}
