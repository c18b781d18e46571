//! `[server.tls]`: the certificate, key and client CA files of the gRPC port.
//!
//! Only their paths are configuration; the transport reads and parses the
//! PEM (at start-up and on each SIGHUP). The checks here catch a wrong path,
//! a non-file or a runaway size at parse time, so `check-config` sees them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Checker;

/// Certificate chains and CA bundles larger than this are refused (a full
/// public CA bundle is about 250 KiB).
const MAX_CERT_FILE_BYTES: u64 = 1024 * 1024;
/// Private keys larger than this are refused (an RSA-4096 PEM key is about
/// 3.3 KiB).
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

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
        file(
            c,
            "server.tls.cert_file",
            &mut self.cert_file,
            MAX_CERT_FILE_BYTES,
        );
        file(
            c,
            "server.tls.key_file",
            &mut self.key_file,
            MAX_KEY_FILE_BYTES,
        );
        if let Some(ca) = &mut self.client_ca_file {
            file(c, "server.tls.client_ca_file", ca, MAX_CERT_FILE_BYTES);
        } else if self.require_client_cert {
            c.problem(
                "server.tls.require_client_cert",
                "needs server.tls.client_ca_file to verify client certificates against",
            );
        }
    }
}

fn file(c: &mut Checker<'_>, key: &str, path: &mut PathBuf, cap: u64) {
    *path = c.absolute(path);
    if let Err(reason) = check_regular_file(path, cap) {
        c.problem(key, reason);
    }
}

/// Checks that `path` is, after following symbolic links, a readable regular
/// file of at most `cap` bytes. The metadata is looked at before opening, so
/// a FIFO or a device such as `/dev/zero` is refused without blocking or
/// reading it.
fn check_regular_file(path: &Path, cap: u64) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if !meta.is_file() {
        return Err(format!("`{shown}` is not a regular file"));
    }
    if meta.len() > cap {
        return Err(format!(
            "`{shown}` is {} bytes, more than the {cap} allowed",
            meta.len()
        ));
    }
    std::fs::File::open(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    Ok(())
}
