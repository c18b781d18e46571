//! Where a caller's identity can come from: the one list of identity
//! sources, and what a request offers them.
//!
//! Each entry point identifies its callers by trying an ordered slice of
//! [`Source`]s (the first that names a caller, or refuses, decides): the gRPC
//! port uses [`Source::GRPC`], ext_authz puts Envoy's principal in front of
//! that ([`Source::EXT_AUTHZ`]). Adding a source is a variant here, its place
//! in those slices, and the arm of `Callers::try_source` the compiler then
//! asks for.

use tonic::metadata::MetadataMap;

use super::{PeerInfo, token};

/// One way of proving who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `attributes.source.principal` of an ext_authz Check, from a trusted
    /// proxy: the downstream workload's SPIFFE ID, as Envoy verified it.
    EnvoyPrincipal,
    /// A verified client certificate (mTLS); one that names no caller is
    /// refused, never a fall-through.
    Certificate,
    /// `x-forwarded-client-cert` or `l5d-client-id` from a trusted proxy.
    Forwarded,
    /// `authorization: Bearer <caller token>`.
    Token,
    /// The caller token where an SDK puts its API key: `x-api-key`, or
    /// `authorization: Bearer <caller token>`. Both present and different,
    /// or either repeated, is refused.
    ApiKey,
}

impl Source {
    /// The contract's order on the gRPC port.
    pub const GRPC: &'static [Source] = &[Source::Certificate, Source::Forwarded, Source::Token];

    /// ext_authz: the workload Envoy names, else whoever makes the Check call.
    pub const EXT_AUTHZ: &'static [Source] = &[
        Source::EnvoyPrincipal,
        Source::Certificate,
        Source::Forwarded,
        Source::Token,
    ];

    /// The identity endpoint: as on the gRPC port, with the token also
    /// taken from `x-api-key`.
    pub const IDENTITY_ENDPOINT: &'static [Source] =
        &[Source::Certificate, Source::Forwarded, Source::ApiKey];

    /// Where this source reads a caller token from, if it reads one.
    pub(super) fn token_headers(self) -> Option<token::Headers> {
        match self {
            Source::Token => Some(token::Headers::Authorization),
            Source::ApiKey => Some(token::Headers::ApiKeyOrAuthorization),
            Source::EnvoyPrincipal | Source::Certificate | Source::Forwarded => None,
        }
    }
}

/// What a request offers the sources: headers, connection, and (ext_authz
/// only) the principal Envoy names. Borrowed from the request; holds no copy
/// of a secret.
#[derive(Clone, Copy)]
pub struct Evidence<'a> {
    pub metadata: &'a MetadataMap,
    pub peer: Option<&'a PeerInfo>,
    /// Envoy's `attributes.source.principal`, when non-empty.
    pub envoy_principal: Option<&'a str>,
}

impl<'a> Evidence<'a> {
    /// What a gRPC call offers: its metadata and connection.
    pub fn grpc(metadata: &'a MetadataMap, peer: Option<&'a PeerInfo>) -> Self {
        Self {
            metadata,
            peer,
            envoy_principal: None,
        }
    }
}
