//! `[server.tls]`: the certificate, key and client CA files of the gRPC port.
//!
//! Only their paths are configuration; the transport reads and parses the
//! PEM (at start-up and on each SIGHUP). The checks here catch a wrong path,
//! a non-file or a runaway size at parse time, so `check-config` sees them.

use std::path::PathBuf;

use serde::Deserialize;

use super::{
    Checker,
    secret_file::{self, MAX_PUBLIC_FILE_BYTES, MAX_SECRET_FILE_BYTES},
};

/// `[server.tls]`: the gRPC port speaks only TLS. Paths are absolute once parsed
/// (relative ones are resolved against the configuration file's directory).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// When set, client certificates are asked for and verified against it.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// A handshake without a valid client certificate fails.
    #[serde(default)]
    pub require_client_cert: bool,
}

impl TlsConfig {
    /// Makes the paths absolute and checks each file.
    pub(super) fn check(&mut self, c: &mut Checker<'_>) {
        let public =
            |p: &std::path::Path| secret_file::read_public(p, MAX_PUBLIC_FILE_BYTES).map(drop);
        let secret = |p: &std::path::Path| secret_file::read(p, MAX_SECRET_FILE_BYTES).map(drop);
        file(c, "server.tls.cert_file", &mut self.cert_file, public);
        file(c, "server.tls.key_file", &mut self.key_file, secret);
        if let Some(ca) = &mut self.client_ca_file {
            file(c, "server.tls.client_ca_file", ca, public);
        } else if self.require_client_cert {
            c.problem(
                "server.tls.require_client_cert",
                "needs server.tls.client_ca_file to verify client certificates against",
            );
        }
    }
}

/// Makes `path` absolute and reads it once, so that a missing, unreadable or
/// runaway file is a configuration error, not a failed first handshake.
fn file(
    c: &mut Checker<'_>,
    key: &str,
    path: &mut PathBuf,
    read: impl Fn(&std::path::Path) -> Result<(), secret_file::ReadError>,
) {
    *path = c.absolute(path);
    if let Err(e) = read(path) {
        c.problem(key, e.to_string());
    }
}
