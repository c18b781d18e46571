//! The connection a request came on: its remote address and, with mTLS, the
//! verified client certificate's names.
//!
//! `crate::transport` owns these types and puts a `PeerInfo` into every
//! request's extensions. Until it is on main, this module defines the same
//! shape and [`peer_of`] builds it from tonic's `TcpConnectInfo` (no
//! certificate): switching over is replacing the two structs with
//! `pub use crate::transport::{PeerCert, PeerInfo};` and reading the
//! extension in `peer_of`.

use std::{net::SocketAddr, sync::Arc};

use tonic::transport::server::TcpConnectInfo;

/// The remote end of a request's connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// Set only when a client certificate was presented and verified.
    pub cert: Option<Arc<PeerCert>>,
}

/// The names of a verified client certificate.
#[derive(Clone, Debug, Default)]
pub struct PeerCert {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
}

/// The peer of a request, from its extensions.
pub fn peer_of(extensions: &tonic::Extensions) -> Option<PeerInfo> {
    if let Some(p) = extensions.get::<PeerInfo>() {
        return Some(p.clone());
    }
    let remote = extensions.get::<TcpConnectInfo>()?.remote_addr()?;
    Some(PeerInfo { remote, cert: None })
}
