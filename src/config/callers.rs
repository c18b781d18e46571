//! `[[callers]]`: the internal services allowed to call the broker, how each
//! proves who it is, what it may ask for, and how often.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use super::{Checker, CredentialConfig, is_valid_name};
use crate::rpc::Rpc;

/// A caller token must have at least this many characters: 22 characters of
/// base64url carry 132 bits, so a random token of this length has the 128
/// bits an online guesser cannot exhaust.
pub const MIN_TOKEN_CHARS: usize = 22;

/// An allow list: everything (`["*"]`) or the listed items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow<T> {
    All,
    Only(Vec<T>),
}

impl<T> Allow<T> {
    /// Whether `item` is allowed; `item` may be a borrowed form of `T`
    /// (`&str` for `Allow<String>`), so that a check allocates nothing.
    pub fn permits<Q>(&self, item: &Q) -> bool
    where
        T: PartialEq<Q>,
        Q: ?Sized,
    {
        match self {
            Allow::All => true,
            Allow::Only(items) => items.iter().any(|i| i == item),
        }
    }
}

/// An internal service allowed to call the broker.
#[derive(Clone)]
pub struct CallerConfig {
    pub name: String,
    /// How the caller proves who it is.
    pub identity: CallerIdentity,
    pub terminals: Allow<String>,
    pub rpcs: Allow<Rpc>,
    /// Token bucket; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
}

impl fmt::Debug for CallerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerConfig")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("terminals", &self.terminals)
            .field("rate_limit", &self.rate_limit)
            .field("rpcs", &self.rpcs)
            .finish_non_exhaustive()
    }
}

/// How a caller is recognised: exactly one per caller.
#[derive(Clone, PartialEq, Eq)]
pub enum CallerIdentity {
    /// SHA-256 of the caller's bearer token; the token itself is never kept.
    TokenSha256([u8; 32]),
    /// URI SAN of a verified client certificate, or a trusted forwarded identity.
    SpiffeId(String),
    /// DNS SAN of a verified client certificate, or Linkerd's `l5d-client-id`.
    DnsName(String),
}

impl fmt::Debug for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerIdentity::TokenSha256(_) => f.write_str("TokenSha256(<redacted>)"),
            CallerIdentity::SpiffeId(id) => f.debug_tuple("SpiffeId").field(id).finish(),
            CallerIdentity::DnsName(n) => f.debug_tuple("DnsName").field(n).finish(),
        }
    }
}

/// `rate_limit = "50/s"` with `burst = 100`: a token bucket refilled with
/// `count` tokens every `per`, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

/// `rate_limit` as written: `"N/s"` or `"N/m"`, N at least 1.
#[derive(Clone, Copy)]
struct Rate {
    count: u32,
    per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let parsed = text.split_once('/').and_then(|(n, unit)| {
            let per = match unit {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                _ => return None,
            };
            // Digits only: `u32::from_str` would take a `+`.
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let count = n.parse::<u32>().ok().filter(|n| *n > 0)?;
            Some(Rate { count, per })
        });
        parsed.ok_or_else(|| {
            format!("`{text}` is not a rate like \"50/s\" or \"600/m\" (a count of at least 1)")
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCaller {
    name: String,
    token_env: Option<String>,
    token_sha256: Option<String>,
    spiffe_id: Option<String>,
    dns_name: Option<String>,
    terminals: Vec<String>,
    rpcs: Vec<String>,
    rate_limit: Option<Rate>,
    burst: Option<u32>,
}

pub(super) fn check(
    raw: Vec<RawCaller>,
    credentials: &[CredentialConfig],
    c: &mut Checker<'_>,
) -> Vec<CallerConfig> {
    let known: HashSet<&str> = credentials
        .iter()
        .flat_map(|c| c.terminals.iter().map(String::as_str))
        .collect();
    let mut names = HashSet::new();
    // Who already holds each identity, keyed by (kind, value).
    let mut holders: HashMap<(&'static str, Vec<u8>), String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, caller) in raw.into_iter().enumerate() {
        let at = format!("callers[{i}]");
        if !is_valid_name(&caller.name) {
            c.problem(
                format!("{at}.name"),
                format!("`{}` must be 1 to 64 of A-Z a-z 0-9 . _ -", caller.name),
            );
        } else if !names.insert(caller.name.clone()) {
            c.problem(
                format!("{at}.name"),
                format!("`{}` is used twice", caller.name),
            );
        }
        let identity = identity(c, &at, &caller);
        if let Some((key, id)) = &identity {
            let (kind, value, shown) = match id {
                CallerIdentity::TokenSha256(h) => ("token", h.to_vec(), None),
                CallerIdentity::SpiffeId(s) => ("spiffe_id", s.as_bytes().to_vec(), Some(s)),
                CallerIdentity::DnsName(s) => ("dns_name", s.as_bytes().to_vec(), Some(s)),
            };
            if let Some(other) = holders.get(&(kind, value.clone())) {
                let reason = match shown {
                    None => format!("the same token is already given to caller `{other}`"),
                    Some(s) => format!("`{s}` is already the identity of caller `{other}`"),
                };
                c.problem(format!("{at}.{key}"), reason);
            } else {
                holders.insert((kind, value), caller.name.clone());
            }
        }
        let rate_limit = rate_limit(c, &at, caller.rate_limit, caller.burst);
        let terminals = allow(c, &format!("{at}.terminals"), caller.terminals, |t| {
            if known.contains(t.as_str()) {
                Ok(t)
            } else {
                Err(format!("terminal `{t}` is not served by any credential"))
            }
        });
        let rpcs = allow(c, &format!("{at}.rpcs"), caller.rpcs, |r| {
            Rpc::from_name(&r).ok_or_else(|| format!("`{r}` is not an RPC name ({})", Rpc::names()))
        });
        out.push(CallerConfig {
            name: caller.name,
            // The placeholder only ever sits in a configuration that is
            // rejected, as a problem was recorded.
            identity: identity.map_or(CallerIdentity::TokenSha256([0; 32]), |(_, id)| id),
            terminals,
            rpcs,
            rate_limit,
        });
    }
    out
}

/// One line per (caller, credential) where the caller may obtain Bearer
/// tokens (GetBearerToken, WatchBearerToken) for some but not all of the
/// credential's terminals. A Bearer token is valid for every terminal of its
/// API key, so such a caller can in fact act on all of them: worth knowing,
/// though not an error (the allow list still limits what the broker hands
/// out and logs).
pub(super) fn bearer_scope_warnings(
    callers: &[CallerConfig],
    credentials: &[CredentialConfig],
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, caller) in callers.iter().enumerate() {
        let rpcs: Vec<&str> = [Rpc::GetBearerToken, Rpc::WatchBearerToken]
            .into_iter()
            .filter(|r| caller.rpcs.permits(r))
            .map(Rpc::name)
            .collect();
        if rpcs.is_empty() {
            continue;
        }
        for cred in credentials {
            let allowed = cred
                .terminals
                .iter()
                .filter(|t| caller.terminals.permits(*t))
                .count();
            if allowed > 0 && allowed < cred.terminals.len() {
                out.push(format!(
                    "callers[{i}]: caller `{}` may call {} for {allowed} of the {} terminals \
                     of credential `{}`, but a Bearer token is valid for every terminal of its \
                     API key, so it can act on all {}; give each trust boundary its own \
                     credential",
                    caller.name,
                    rpcs.join(" and "),
                    cred.terminals.len(),
                    cred.name,
                    cred.terminals.len(),
                ));
            }
        }
    }
    out
}

/// One line per caller allowed `Authorize` that lacks some terminal of a
/// credential: the identity endpoint hands out a credential's token only to
/// callers allowed every one of its terminals, so this caller gets 403 for it.
pub(super) fn authorize_scope_warnings(
    callers: &[CallerConfig],
    credentials: &[CredentialConfig],
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, caller) in callers.iter().enumerate() {
        if !caller.rpcs.permits(&Rpc::Authorize) {
            continue;
        }
        let partial: Vec<String> = credentials
            .iter()
            .filter(|cred| !cred.terminals.iter().all(|t| caller.terminals.permits(t)))
            .map(|cred| format!("`{}`", cred.name))
            .collect();
        if !partial.is_empty() {
            out.push(format!(
                "callers[{i}]: caller `{}` may call Authorize but not for every terminal of \
                 credential {}; the identity endpoint answers it 403 for that credential",
                caller.name,
                partial.join(", "),
            ));
        }
    }
    out
}

/// Exactly one of `token_env`, `token_sha256`, `spiffe_id`, `dns_name`; with
/// the key that set it.
fn identity(
    c: &mut Checker<'_>,
    at: &str,
    caller: &RawCaller,
) -> Option<(&'static str, CallerIdentity)> {
    let given = [
        caller.token_env.is_some(),
        caller.token_sha256.is_some(),
        caller.spiffe_id.is_some(),
        caller.dns_name.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        c.problem(
            at,
            "set exactly one of token_env, token_sha256, spiffe_id and dns_name",
        );
        return None;
    }
    if let Some(var) = &caller.token_env {
        let key = format!("{at}.token_env");
        // Only the digest and length come back: the plaintext is wiped.
        let token = c.env_token(&key, var)?;
        if token.chars < MIN_TOKEN_CHARS {
            c.problem(
                key,
                format!(
                    "the caller token in `{var}` is shorter than {MIN_TOKEN_CHARS} characters; \
                     use at least 128 random bits, e.g. `openssl rand -base64 24`"
                ),
            );
            return None;
        }
        return Some(("token_env", CallerIdentity::TokenSha256(token.sha256)));
    }
    if let Some(hex) = &caller.token_sha256 {
        let Some(digest) = parse_sha256_hex(hex) else {
            c.problem(
                format!("{at}.token_sha256"),
                "must be exactly 64 hexadecimal digits (the SHA-256 of the token), \
                 with no sign, space or prefix",
            );
            return None;
        };
        return Some(("token_sha256", CallerIdentity::TokenSha256(digest)));
    }
    if let Some(id) = &caller.spiffe_id {
        if let Err(reason) = check_spiffe_id(id) {
            c.problem(format!("{at}.spiffe_id"), reason);
            return None;
        }
        return Some(("spiffe_id", CallerIdentity::SpiffeId(id.clone())));
    }
    let name = caller.dns_name.as_deref().unwrap_or_default();
    if !is_valid_dns_name(name) {
        c.problem(
            format!("{at}.dns_name"),
            format!(
                "`{name}` is not a DNS name (dot-separated labels of 1 to 63 letters, \
                 digits and inner hyphens; 253 characters at most)"
            ),
        );
        return None;
    }
    Some(("dns_name", CallerIdentity::DnsName(name.to_owned())))
}

/// The bucket: `burst` defaults to the per-second rate, at least 1.
fn rate_limit(
    c: &mut Checker<'_>,
    at: &str,
    rate: Option<Rate>,
    burst: Option<u32>,
) -> Option<RateLimit> {
    let Some(Rate { count, per }) = rate else {
        if burst.is_some() {
            c.problem(format!("{at}.burst"), "needs rate_limit");
        }
        return None;
    };
    let per_second = if per == Duration::from_secs(1) {
        count
    } else {
        count / 60
    };
    let burst = match burst {
        Some(0) => {
            c.problem(format!("{at}.burst"), "must be at least 1");
            1
        }
        Some(b) => b,
        None => per_second.max(1),
    };
    Some(RateLimit { count, per, burst })
}

fn allow<T>(
    c: &mut Checker<'_>,
    key: &str,
    items: Vec<String>,
    check: impl Fn(String) -> Result<T, String>,
) -> Allow<T> {
    if items.is_empty() {
        c.problem(
            key,
            "is empty, so it allows nothing; use [\"*\"] for everything",
        );
        return Allow::Only(Vec::new());
    }
    if items.iter().any(|i| i == "*") {
        if items.len() > 1 {
            c.problem(key, "\"*\" must stand alone");
        }
        return Allow::All;
    }
    let mut out = Vec::with_capacity(items.len());
    for (j, item) in items.into_iter().enumerate() {
        match check(item) {
            Ok(v) => out.push(v),
            Err(reason) => c.problem(format!("{key}[{j}]"), reason),
        }
    }
    Allow::Only(out)
}

/// Exactly 64 hex digits, either case. Strict on purpose: `u8::from_str_radix`
/// takes a leading `+`, and trimming would hide a pasting mistake.
fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    fn digit(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A SPIFFE ID: `spiffe://<trust domain>[/<path>]`, trust domain of lower-case
/// letters, digits, `.`, `-`, `_`; path segments of letters, digits, `.`, `-`,
/// `_`, none empty, `.` or `..` (the SPIFFE ID specification).
fn check_spiffe_id(id: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!("`{id}` is not a SPIFFE ID like spiffe://cluster.local/ns/shop/sa/web ({why})")
    };
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("it must start with spiffe://"))?;
    if id.len() > 2048 {
        return Err(bad("longer than 2048 bytes"));
    }
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if domain.is_empty()
        || !domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
    {
        return Err(bad(
            "the trust domain must be lower-case letters, digits, '.', '-' or '_'",
        ));
    }
    if let Some(path) = path {
        for segment in path.split('/') {
            let ok = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err(bad(
                    "path segments must be non-empty letters, digits, '.', '-' or '_'",
                ));
            }
        }
    }
    Ok(())
}

/// A DNS name as it appears in a certificate's DNS SAN (RFC 1123 host name):
/// labels of 1..=63 letters, digits and inner hyphens, 253 characters at
/// most, no trailing dot, no wildcard.
fn is_valid_dns_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}
