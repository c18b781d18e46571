//! Who is calling, and what they may do.
//!
//! A caller is identified in the contract's order, first match wins:
//!
//! 1. a verified client certificate (mTLS) whose URI SAN is a caller's
//!    `spiffe_id` or whose DNS SAN is its `dns_name`. A verified certificate
//!    that names no caller is refused outright: it does not fall through to a
//!    forwarded identity or a token;
//! 2. with `forwarded_identity` set and the TCP peer inside
//!    `trusted_proxies`: the SPIFFE ID in `x-forwarded-client-cert` (`URI=`
//!    of its last element), or `l5d-client-id` against `dns_name`. From any
//!    other peer the header is ignored. A malformed header from a trusted
//!    proxy is refused; a well-formed one naming no caller falls through to
//!    the token (the proxy vouches only for what it saw, the token still
//!    proves itself);
//! 3. `authorization: Bearer <token>`, by SHA-256 digest in constant time.
//!
//! That order is [`Source::GRPC`], one slice of the one list of identity
//! sources ([`source`]); ext_authz tries Envoy's principal first
//! ([`Source::EXT_AUTHZ`]) and is otherwise identified the same way, with the
//! same `trusted_proxies`.
//!
//! Nothing matched: UNAUTHENTICATED. Two `authorization` entries are refused
//! whatever else the call carries.
//!
//! With no `[[callers]]` (`--allow-unauthenticated`) everyone is let in as
//! `anonymous` and certificates, headers and tokens are not looked at: there
//! is no caller a certificate could name, and refusing a client for
//! presenting more proof than an anonymous one would protect nothing.
//!
//! After identification: the caller's rate limit ([`limits::RateBucket`]),
//! later its allow lists ([`Caller::authorize`]) and its share of the session
//! bulkhead ([`Caller::session_slot`]). Peers that keep presenting wrong
//! tokens are refused for a cool-down without their token being looked at
//! ([`limits::FailedPeers`]); a certificate or trusted forwarded identity
//! still works from such a peer, so one bad client behind a shared proxy
//! address cannot lock out callers the mesh identifies.
//!
//! Identification reads request headers only: [`layer::Admission`] runs it
//! before the request body is read.

pub mod cert;
pub mod forwarded;
pub mod layer;
pub mod limits;
pub mod peer;
pub mod source;
pub mod token;

use std::{fmt, sync::Arc};

use tokio::{sync::OwnedSemaphorePermit, time::Instant};
use tonic::metadata::MetadataMap;

use self::{
    limits::{FailedPeers, FailurePolicy, RateBucket, SessionQuota},
    token::Presented,
};
pub use self::{
    peer::{PeerInfo, peer_of},
    source::{Evidence, Source},
};
use crate::{
    clock::Clock,
    config::{CallerConfig, CallerIdentity, Config, ForwardedIdentity, IpNet},
    domain::error::BrokerError,
    rpc::Rpc,
};

/// Who may call, and the state of their limits.
pub struct Callers {
    /// `None`: open mode, no `[[callers]]`.
    known: Option<Vec<Arc<Known>>>,
    /// Token callers' digests, in configuration order.
    tokens: Vec<([u8; 32], Arc<Known>)>,
    forwarded: ForwardedIdentity,
    trusted_proxies: Vec<IpNet>,
    failures: Arc<FailedPeers>,
    clock: Clock,
}

/// A configured caller and its limits' state.
struct Known {
    config: CallerConfig,
    /// `config.name`, shared: every call's audit record holds it.
    name: Arc<str>,
    bucket: Option<Arc<RateBucket>>,
    sessions: Arc<SessionQuota>,
}

/// How a caller was identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Open mode: nobody is asked who they are.
    Open,
    Certificate,
    /// `x-forwarded-client-cert` or `l5d-client-id` from a trusted proxy.
    ForwardedIdentity,
    Token,
}

/// An identified caller. Cheap to clone; holds no secret.
#[derive(Clone)]
pub struct Caller {
    known: Option<Arc<Known>>,
    via: Via,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name())
            .field("via", &self.via)
            .finish()
    }
}

impl fmt::Debug for Callers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Option<Vec<&str>> = self
            .known
            .as_ref()
            .map(|k| k.iter().map(|c| c.config.name.as_str()).collect());
        f.debug_struct("Callers")
            .field("known", &names)
            .field("forwarded", &self.forwarded)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

/// The caller's name in open mode.
const ANONYMOUS: &str = "anonymous";

/// Nothing identified the caller, by where the token would have been.
const fn no_identity(headers: token::Headers) -> &'static str {
    match headers {
        token::Headers::Authorization => {
            "no caller identity: no client certificate, trusted forwarded identity or `authorization: Bearer <token>` metadata"
        }
        token::Headers::ApiKeyOrAuthorization => {
            "no caller identity: no client certificate, trusted forwarded identity, `x-api-key` or `authorization: Bearer <token>` header"
        }
    }
}

impl Callers {
    /// The callers of `config`. With `previous` (a reload): callers whose
    /// name and rate limit are unchanged keep their bucket, and whose name
    /// and session quota are unchanged keep their in-flight count, so a
    /// SIGHUP neither refills a bucket nor grants a second quota; the failed
    /// peers table carries over; `forwarded_identity` and `trusted_proxies`
    /// are `[server]` settings and, like the others, change at restart only.
    pub fn new(config: &Config, clock: Clock, previous: Option<&Callers>) -> Self {
        Self::with_policy(config, clock, previous, FailurePolicy::default())
    }

    /// [`Callers::new`] with a failing-peer policy of one's own (tests).
    pub fn with_policy(
        config: &Config,
        clock: Clock,
        previous: Option<&Callers>,
        policy: FailurePolicy,
    ) -> Self {
        let quota = config.payroc.max_concurrent_sessions_per_caller;
        let earlier = |name: &str| {
            previous
                .and_then(|p| p.known.as_ref())
                .and_then(|k| k.iter().find(|c| c.config.name == name))
        };
        let known: Vec<Arc<Known>> = config
            .callers
            .iter()
            .map(|c| {
                let before = earlier(&c.name);
                let bucket = c.rate_limit.map(|limit| {
                    before
                        .and_then(|b| b.bucket.as_ref())
                        .filter(|b| b.limit() == limit)
                        .map_or_else(|| Arc::new(RateBucket::new(limit)), Arc::clone)
                });
                let sessions = before
                    .map(|b| &b.sessions)
                    .filter(|s| s.limit() == quota)
                    .map_or_else(|| Arc::new(SessionQuota::new(quota)), Arc::clone);
                Arc::new(Known {
                    config: c.clone(),
                    name: Arc::from(c.name.as_str()),
                    bucket,
                    sessions,
                })
            })
            .collect();
        let tokens = known
            .iter()
            .filter_map(|k| match &k.config.identity {
                CallerIdentity::TokenSha256(d) => Some((*d, Arc::clone(k))),
                _ => None,
            })
            .collect();
        let (forwarded, trusted_proxies) = match previous {
            Some(p) => (p.forwarded, p.trusted_proxies.clone()),
            None => (
                config.server.forwarded_identity,
                config.server.trusted_proxies.clone(),
            ),
        };
        Self {
            known: (!known.is_empty()).then_some(known),
            tokens,
            forwarded,
            trusted_proxies,
            failures: previous.map_or_else(
                || Arc::new(FailedPeers::new(policy)),
                |p| Arc::clone(&p.failures),
            ),
            clock,
        }
    }

    /// Whether anyone may call without identifying themselves.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.known.is_none()
    }

    /// Identifies the caller of a gRPC call from its metadata and
    /// connection, in the contract's order (see the module documentation).
    #[cfg(test)]
    pub fn identify(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, BrokerError> {
        self.identify_with(Source::GRPC, &Evidence::grpc(metadata, peer))
    }

    /// Identifies the caller by trying `sources` in order: the first that
    /// names a caller, or refuses, decides.
    pub fn identify_with(
        &self,
        sources: &[Source],
        evidence: &Evidence<'_>,
    ) -> Result<Caller, BrokerError> {
        let Some(known) = &self.known else {
            return Ok(Caller {
                known: None,
                via: Via::Open,
            });
        };
        // Where this entry point reads a caller token (its token source's
        // headers; the gRPC port's when it has none).
        let headers = sources
            .iter()
            .find_map(|s| s.token_headers())
            .unwrap_or(token::Headers::Authorization);
        let presented = headers.read(evidence.metadata);
        // Refused whatever else the call carries: which of two tokens would
        // be the caller's is not for the broker to guess.
        if presented == Presented::Several {
            return Err(BrokerError::Unauthenticated(match headers {
                token::Headers::Authorization => "more than one `authorization` entry",
                token::Headers::ApiKeyOrAuthorization => {
                    "a repeated `x-api-key` or `authorization` header, or two that disagree"
                }
            }));
        }
        for source in sources {
            if let Some((k, via)) = self.try_source(*source, known, evidence, &presented)? {
                return Ok(Caller {
                    known: Some(Arc::clone(k)),
                    via,
                });
            }
        }
        Err(BrokerError::Unauthenticated(no_identity(headers)))
    }

    /// What one source says: a caller, nothing (try the next), or a refusal.
    fn try_source<'k>(
        &'k self,
        source: Source,
        known: &'k [Arc<Known>],
        evidence: &Evidence<'_>,
        presented: &Presented<'_>,
    ) -> Result<Option<(&'k Arc<Known>, Via)>, BrokerError> {
        let peer = evidence.peer;
        match source {
            Source::EnvoyPrincipal => {
                let trusted = peer.is_some_and(|p| self.trusts(p));
                Ok(evidence
                    .envoy_principal
                    .filter(|_| trusted)
                    .and_then(|id| {
                        known
                            .iter()
                            .find(|k| cert::is_spiffe_id(&k.config.identity, id))
                    })
                    .map(|k| (k, Via::ForwardedIdentity)))
            }
            // A verified client certificate decides alone.
            Source::Certificate => match peer.and_then(|p| p.cert.as_deref()) {
                None => Ok(None),
                Some(cert) => known
                    .iter()
                    .find(|k| cert::names(&k.config.identity, cert))
                    .map(|k| Some((k, Via::Certificate)))
                    .ok_or(BrokerError::Unauthenticated(
                        "the client certificate names no configured caller",
                    )),
            },
            Source::Forwarded => Ok(self
                .forwarded_caller(known, evidence.metadata, peer)?
                .map(|k| (k, Via::ForwardedIdentity))),
            Source::Token | Source::ApiKey => {
                let headers = source
                    .token_headers()
                    .unwrap_or(token::Headers::Authorization);
                self.token_caller(presented, headers, peer).map(Some)
            }
        }
    }

    /// The caller whose token the call presents. Peers that keep presenting
    /// wrong tokens are refused for a while without their token being read.
    fn token_caller(
        &self,
        presented: &Presented<'_>,
        headers: token::Headers,
        peer: Option<&PeerInfo>,
    ) -> Result<(&Arc<Known>, Via), BrokerError> {
        let token = match *presented {
            Presented::Nothing => return Err(BrokerError::Unauthenticated(no_identity(headers))),
            Presented::Token(t) => Some(t),
            Presented::Malformed | Presented::Several => None,
        };
        let now = self.clock.now();
        let ip = peer.map(|p| p.remote.ip());
        if let Some(retry_in) = ip.and_then(|ip| self.failures.blocked(ip, now)) {
            return Err(BrokerError::PeerThrottled { retry_in });
        }
        let Some(token) = token else {
            self.failed(ip, now);
            return Err(BrokerError::Unauthenticated(match headers {
                token::Headers::Authorization => "`authorization` metadata is not `Bearer <token>`",
                token::Headers::ApiKeyOrAuthorization => {
                    "`x-api-key` is empty or `authorization` is not `Bearer <token>`"
                }
            }));
        };
        match token::find(token, self.tokens.iter().map(|(d, _)| d)) {
            Some(i) => Ok((&self.tokens[i].1, Via::Token)),
            None => {
                self.failed(ip, now);
                Err(BrokerError::Unauthenticated("unknown caller token"))
            }
        }
    }

    /// Whether the peer is one of `trusted_proxies`, whose forwarded
    /// identities (and Envoy principals) are believed.
    fn trusts(&self, peer: &PeerInfo) -> bool {
        self.trusted_proxies
            .iter()
            .any(|n| n.contains(peer.remote.ip()))
    }

    /// The caller configured as `name`, for a stream admitted before a
    /// reload and re-checked against the new allow lists. `None` when no
    /// caller has that name any more (or a configured caller replaced open
    /// mode). Takes nothing from the rate limit.
    pub fn by_name(&self, name: &str, via: Via) -> Option<Caller> {
        let Some(known) = &self.known else {
            return Some(Caller {
                known: None,
                via: Via::Open,
            });
        };
        if via == Via::Open {
            return None;
        }
        known
            .iter()
            .find(|k| k.config.name == name)
            .map(|k| Caller {
                known: Some(Arc::clone(k)),
                via,
            })
    }

    /// Identifies the caller, then takes one call from its rate limit: the
    /// checks that need only the request's headers, in the contract's order.
    pub fn admit(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, BrokerError> {
        self.admit_with(Source::GRPC, &Evidence::grpc(metadata, peer))
    }

    /// [`Callers::admit`] with the sources of another entry point.
    pub fn admit_with(
        &self,
        sources: &[Source],
        evidence: &Evidence<'_>,
    ) -> Result<Caller, BrokerError> {
        let caller = self.identify_with(sources, evidence)?;
        caller.rate_limit(self.clock.now())?;
        Ok(caller)
    }

    fn failed(&self, ip: Option<std::net::IpAddr>, now: Instant) {
        let Some(ip) = ip else { return };
        self.failures.record_failure(ip, now);
        if self.failures.blocked(ip, now).is_some() {
            // Once per cool-down: blocked peers are refused before this point.
            tracing::warn!(
                peer = %ip,
                "a peer keeps presenting wrong caller tokens; refusing its tokens for a while"
            );
        }
    }

    fn forwarded_caller<'k>(
        &self,
        known: &'k [Arc<Known>],
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Option<&'k Arc<Known>>, BrokerError> {
        if self.forwarded == ForwardedIdentity::None {
            return Ok(None);
        }
        if !peer.is_some_and(|p| self.trusts(p)) {
            return Ok(None);
        }
        match self.forwarded {
            ForwardedIdentity::None => Ok(None),
            ForwardedIdentity::Xfcc => {
                const MALFORMED: BrokerError =
                    BrokerError::Unauthenticated("malformed `x-forwarded-client-cert` metadata");
                let mut values = Vec::new();
                for v in metadata.get_all("x-forwarded-client-cert") {
                    values.push(v.to_str().map_err(|_| MALFORMED)?);
                }
                if values.is_empty() {
                    return Ok(None);
                }
                // Several entries are one list, in order (RFC 9110, 5.3).
                let uris = forwarded::xfcc_last_uris(&values.join(",")).map_err(|_| MALFORMED)?;
                Ok(known.iter().find(|k| {
                    uris.iter()
                        .any(|u| cert::is_spiffe_id(&k.config.identity, u))
                }))
            }
            ForwardedIdentity::L5dClientId => {
                let mut all = metadata.get_all("l5d-client-id").iter();
                let Some(value) = all.next() else {
                    return Ok(None);
                };
                if all.next().is_some() {
                    return Err(BrokerError::Unauthenticated(
                        "more than one `l5d-client-id` entry",
                    ));
                }
                let id = value.to_str().map_err(|_| {
                    BrokerError::Unauthenticated("malformed `l5d-client-id` metadata")
                })?;
                Ok(known
                    .iter()
                    .find(|k| cert::is_dns_name(&k.config.identity, id.trim())))
            }
        }
    }
}

impl Caller {
    /// The caller's configured name (`anonymous` in open mode), for logs and
    /// the audit trail.
    pub fn name(&self) -> &str {
        self.known.as_ref().map_or(ANONYMOUS, |k| &k.config.name)
    }

    /// [`Self::name`], shared rather than copied (for the audit record).
    pub fn shared_name(&self) -> Arc<str> {
        static OPEN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| ANONYMOUS.into());
        Arc::clone(self.known.as_ref().map_or(&*OPEN, |k| &k.name))
    }

    /// How the caller was identified.
    pub fn via(&self) -> Via {
        self.via
    }

    /// Takes one call from the caller's rate limit, if it has one.
    pub fn rate_limit(&self, now: Instant) -> Result<(), BrokerError> {
        let Some(bucket) = self.known.as_ref().and_then(|k| k.bucket.as_ref()) else {
            return Ok(());
        };
        // A refusal is counted in payroc_broker_caller_rate_limited_total by
        // the audit (`crate::obs::audit`), which sees every error.
        bucket
            .take(now)
            .map_err(|retry_in| BrokerError::CallerRateLimited {
                caller: self.name().to_owned(),
                retry_in,
            })
    }

    /// Checks the caller's allow lists.
    pub fn authorize(&self, rpc: Rpc, terminal: &str) -> Result<(), BrokerError> {
        let Some(k) = &self.known else {
            return Ok(());
        };
        let c = &k.config;
        let denied = |reason: String| BrokerError::PermissionDenied {
            caller: c.name.clone(),
            reason,
        };
        if !c.rpcs.permits(&rpc) {
            return Err(denied(format!("may not call {}", rpc.name())));
        }
        if !c.terminals.permits(terminal) {
            return Err(denied(format!(
                "may not use processing terminal `{terminal}`"
            )));
        }
        Ok(())
    }

    /// Checks the caller's allow lists for a credential's Bearer token as a
    /// whole (the identity endpoint): `rpc`, and **every** one of the
    /// credential's `terminals`, since the token is good for all of them.
    pub fn authorize_all(&self, rpc: Rpc, terminals: &[String]) -> Result<(), BrokerError> {
        let Some(k) = &self.known else {
            return Ok(());
        };
        let c = &k.config;
        if !c.rpcs.permits(&rpc) {
            return Err(BrokerError::PermissionDenied {
                caller: c.name.clone(),
                reason: format!("may not call {}", rpc.name()),
            });
        }
        let missing = terminals
            .iter()
            .filter(|t| !c.terminals.permits(*t))
            .count();
        if missing > 0 {
            return Err(BrokerError::PermissionDenied {
                caller: c.name.clone(),
                reason: format!(
                    "may not use {missing} of the credential's {} processing terminals, and its \
                     Bearer token is good for every one",
                    terminals.len()
                ),
            });
        }
        Ok(())
    }

    /// One of the caller's session slots, held until dropped: each caller
    /// gets at most `max_concurrent_sessions_per_caller` of the session
    /// bulkhead, so one caller cannot fill it for everybody. Anonymous
    /// callers (open mode) cannot be told apart and share the bulkhead alone.
    pub fn session_slot(&self) -> Result<Option<OwnedSemaphorePermit>, BrokerError> {
        let Some(k) = &self.known else {
            return Ok(None);
        };
        k.sessions
            .try_acquire()
            .map(Some)
            .ok_or_else(|| BrokerError::CallerSessionsLimited {
                caller: k.config.name.clone(),
                limit: k.sessions.limit(),
            })
    }
}

#[cfg(test)]
mod tests;
