//! W3C Trace Context: the `traceparent` a caller sends is validated, kept
//! for the RPC (its span and audit event carry the trace id) and passed on to
//! Payroc with the same trace id and a span id of the broker's own.
//!
//! The RPC's trace travels to the Payroc client in a task-local
//! ([`scope`], [`current`]) rather than through every signature between the
//! handler and the HTTP request: the session request is sent from the RPC's
//! own task, and an identity fetch reads it when the RPC that needs the token
//! starts the fetch (the fetch itself runs in a task of its own, shared by
//! every waiter, so it carries the trace of the RPC that started it, and a
//! background refresh carries none).

use std::{fmt, future::Future};

use tonic::metadata::MetadataMap;

use crate::clock::Entropy;

/// The metadata key and HTTP header.
pub const TRACEPARENT: &str = "traceparent";

/// A valid `traceparent` (version 00 fields; later versions are read as 00,
/// as the specification asks).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when it is not valid (the trace
    /// is then simply not continued, as the specification says).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let b = value.as_bytes();
        if b.len() < 55 {
            return None;
        }
        let version = hex_bytes::<1>(&b[0..2])?[0];
        match version {
            0xff => return None,
            // Version 00 is exactly 55 characters.
            0x00 if b.len() != 55 => return None,
            // A later version may append fields after another `-`.
            _ if b.len() > 55 && b[55] != b'-' => return None,
            _ => {}
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = hex_bytes::<16>(&b[3..35])?;
        let parent_id = hex_bytes::<8>(&b[36..52])?;
        let flags = hex_bytes::<1>(&b[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The request's `traceparent`: exactly one valid entry, else none (two
    /// entries are as invalid as a malformed one).
    pub fn from_metadata(metadata: &MetadataMap) -> Option<TraceParent> {
        // A name made once, not parsed from a string on every call.
        const NAME: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);
        let mut values = metadata.as_ref().get_all(&NAME).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        TraceParent::parse(first.to_str().ok()?)
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The `traceparent` for a request the broker sends on behalf of this
    /// trace: same trace id and flags, a new random span id as parent.
    pub fn child(&self, entropy: &dyn Entropy) -> TraceParent {
        TraceParent {
            parent_id: span_id(entropy),
            ..*self
        }
    }

    /// A new trace, started here: random ids, `sampled` in the flags.
    pub fn root(entropy: &dyn Entropy, sampled: bool) -> TraceParent {
        TraceParent::root_of(trace_id(entropy), entropy, sampled)
    }

    /// A new trace with the id `trace_id` (from [`trace_id`], decided on
    /// before the rest), a random span id and `sampled` in the flags.
    pub fn root_of(trace_id: [u8; 16], entropy: &dyn Entropy, sampled: bool) -> TraceParent {
        TraceParent {
            trace_id,
            parent_id: span_id(entropy),
            flags: u8::from(sampled),
        }
    }

    /// This trace with `sampled` as its flag (the broker's own decision,
    /// passed on to the next hop).
    pub fn with_sampled(self, sampled: bool) -> TraceParent {
        TraceParent {
            flags: (self.flags & !1) | u8::from(sampled),
            ..self
        }
    }

    /// The trace id's 16 bytes.
    pub fn trace_id_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The parent id's 8 bytes: the span of the hop that sent this value.
    pub fn parent_id_bytes(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The `sampled` flag: the sender records this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// A new random trace id (never all zeros, which is invalid).
pub fn trace_id(entropy: &dyn Entropy) -> [u8; 16] {
    let (a, b) = (entropy.uuid_v4(), entropy.uuid_v4());
    let mut id = *a.as_bytes();
    // A v4 UUID fixes four bits of byte 6 and two of byte 8; replace both
    // bytes with random ones, since samplers read the trace id's low half as
    // a uniform number (the W3C format asks for random ids).
    id[6] = b.as_bytes()[0];
    id[8] = b.as_bytes()[1];
    if id == [0; 16] {
        id[15] = 1; // only a fixed test source gets here
    }
    id
}

/// A new random span id (never all zeros, which is invalid).
pub fn span_id(entropy: &dyn Entropy) -> [u8; 8] {
    let u = entropy.uuid_v4();
    let b = u.as_bytes();
    // The bytes of a v4 UUID that are wholly random (byte 6 holds the
    // version, byte 8 the variant).
    let mut id = [b[0], b[1], b[2], b[3], b[4], b[5], b[7], b[9]];
    if id == [0; 8] {
        id[7] = 1; // only a fixed test source gets here
    }
    id
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Lowercase hex only: the specification rejects uppercase.
fn hex_bytes<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

tokio::task_local! {
    static CURRENT: Option<TraceParent>;
}

/// Runs `fut` with `trace` as the current RPC's trace. Not an `async fn`:
/// one would hold `fut` twice (as its argument and inside the scope), and
/// every call's future is built around this one.
pub fn scope<F: Future>(trace: Option<TraceParent>, fut: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(trace, fut)
}

/// The trace of the RPC this task is serving, if it came with one.
pub fn current() -> Option<TraceParent> {
    CURRENT.try_with(|t| *t).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_parses_and_prints_back() {
        let t = TraceParent::parse(VALID).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.to_string(), VALID);
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff, and version 00 with extra fields
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            // wrong separators, non-hex, control characters
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\n",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn later_versions_are_read_as_00() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert_eq!(TraceParent::parse(v), TraceParent::parse(VALID));
        let glued = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(glued), None);
    }

    #[test]
    fn two_entries_are_no_trace() {
        let mut m = MetadataMap::new();
        m.insert(TRACEPARENT, VALID.parse().unwrap());
        assert!(TraceParent::from_metadata(&m).is_some());
        m.append(TRACEPARENT, VALID.parse().unwrap());
        assert_eq!(TraceParent::from_metadata(&m), None);
    }

    #[test]
    fn a_child_keeps_trace_and_flags_with_a_new_span() {
        let t = TraceParent::parse(VALID).unwrap();
        let c = t.child(&crate::clock::OsEntropy);
        let text = c.to_string();
        assert!(text.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(text.ends_with("-01"));
        assert_ne!(c, t);
        assert_eq!(TraceParent::parse(&text), Some(c));
    }

    #[test]
    fn roots_are_valid_random_traces_with_the_sampling_decision() {
        let e = crate::clock::OsEntropy;
        let (a, b) = (TraceParent::root(&e, true), TraceParent::root(&e, false));
        assert!(a.sampled() && !b.sampled());
        assert_ne!(a.trace_id_bytes(), b.trace_id_bytes());
        assert_eq!(TraceParent::parse(&a.to_string()), Some(a));
        assert!(a.to_string().ends_with("-01") && b.to_string().ends_with("-00"));
        // The variant bits of a v4 UUID do not survive in byte 8: over 64
        // roots, its top two bits take more than one value.
        let tops: std::collections::HashSet<u8> = (0..64)
            .map(|_| TraceParent::root(&e, true).trace_id_bytes()[8] >> 6)
            .collect();
        assert!(tops.len() > 1, "{tops:?}");
    }

    #[test]
    fn with_sampled_sets_only_the_sampled_flag() {
        let t =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
        assert_eq!(
            t.with_sampled(false).to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02"
        );
        assert_eq!(t.with_sampled(true), t);
    }

    #[tokio::test]
    async fn the_scope_is_the_tasks_own() {
        let t = TraceParent::parse(VALID);
        assert_eq!(current(), None);
        scope(t, async {
            assert_eq!(current(), t);
            // A spawned task does not inherit it (a shared fetch must not
            // carry whichever trace happened to be around).
            assert_eq!(tokio::spawn(async { current() }).await.unwrap(), None);
        })
        .await;
    }
}
