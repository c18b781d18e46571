//! The connection a request came on: its remote address and, with mTLS, the
//! verified client certificate's names.
//!
//! `crate::transport` owns these types and puts a `PeerInfo` into every
//! request's extensions; [`peer_of`] reads it (falling back to tonic's
//! `TcpConnectInfo`, no certificate, for a service served some other way).

use tonic::transport::server::TcpConnectInfo;

pub use crate::transport::{PeerCert, PeerInfo};

/// The peer of a request, from its extensions.
pub fn peer_of(extensions: &tonic::Extensions) -> Option<PeerInfo> {
    if let Some(p) = extensions.get::<PeerInfo>() {
        return Some(p.clone());
    }
    let remote = extensions.get::<TcpConnectInfo>()?.remote_addr()?;
    Some(PeerInfo { remote, cert: None })
}
