//! `[server.tls]`: reading the PEM files into a rustls server configuration
//! (TLS 1.2/1.3, ALPN `h2`, ring only), swapping it on reload, and reading the
//! SANs of a verified client certificate.
//!
//! Errors name the configuration key and the file, never the files' contents:
//! a key file that fails to parse could still hold most of a private key.

use std::{
    fmt,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::PeerCert;
use crate::config::TlsConfig;

/// PEM files of certificates and keys are a few KB; a bigger file is a mistake
/// (or `/dev/zero`), refused before it is read whole.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// The one application protocol the port speaks.
const ALPN_H2: &[u8] = b"h2";

/// Why a `[server.tls]` file was refused: the key it came from, the file and
/// the reason. Safe to print: it never holds file contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// The configuration key, e.g. `server.tls.key_file`.
    pub key: &'static str,
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.key, self.file.display(), self.reason)
    }
}

impl std::error::Error for TlsError {}

const CERT_KEY: &str = "server.tls.cert_file";
const KEY_KEY: &str = "server.tls.key_file";
const CA_KEY: &str = "server.tls.client_ca_file";

/// Reads and checks the files of `config` into a server configuration: the
/// chain parses, the key parses (PKCS#8, PKCS#1 or SEC1) and matches the leaf
/// certificate, the client CA file holds at least one usable certificate.
/// Called at configuration load (so `check-config` and start-up refuse bad
/// files), at start-up, and on every reload.
pub fn load(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let err = |key, file: &Path, reason: String| TlsError {
        key,
        file: file.to_owned(),
        reason,
    };

    let certs = read_certs(&config.cert_file).map_err(|r| err(CERT_KEY, &config.cert_file, r))?;
    let key_pem = read_pem_file(&config.key_file).map_err(|r| err(KEY_KEY, &config.key_file, r))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| err(KEY_KEY, &config.key_file, pem_reason(&e, "PRIVATE KEY")))?;
    drop(key_pem);

    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(CERT_KEY, &config.cert_file, e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca_file).map_err(|r| err(CA_KEY, ca_file, r))? {
                roots.add(cert).map_err(|e| {
                    err(CA_KEY, ca_file, format!("not a usable CA certificate: {e}"))
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| err(CA_KEY, ca_file, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        // rustls's errors name what is wrong (key mismatch, unsupported key
        // type), never key bytes.
        err(
            KEY_KEY,
            &config.key_file,
            format!("does not fit the certificate in server.tls.cert_file: {e}"),
        )
    })?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(server))
}

/// Every `CERTIFICATE` block of a PEM file, at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_reason(&e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err("holds no PEM `CERTIFICATE` block".into());
    }
    Ok(certs)
}

/// Reads a regular file (symbolic links followed: Kubernetes Secret volumes
/// are links) of at most `MAX_PEM_FILE` bytes. A FIFO or device would block or
/// never end, so those are refused before opening them for reading.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(format!(
            "is {} bytes, more than a PEM file of this kind can need ({MAX_PEM_FILE})",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err("grew past the size limit while being read".into());
    }
    Ok(bytes)
}

/// A reason for a PEM failure that never quotes the file: pki-types' own
/// messages can include a line of it, and for a key file that line may be key
/// material.
fn pem_reason(e: &rustls::pki_types::pem::Error, wanted: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::NoItemsFound => format!("holds no PEM `{wanted}` block"),
        E::MissingSectionEnd { .. } => "a PEM block has no END line".into(),
        E::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        E::Base64Decode(_) => "a PEM block is not valid base64".into(),
        E::SectionTooLarge => "a PEM block is too large".into(),
        E::Io(io) => format!("cannot read it: {}", io.kind()),
        _ => "is not valid PEM".into(),
    }
}

/// The TLS configuration in force, swapped whole on reload: each handshake
/// takes the current one, connections already open keep the one they started
/// with, so a reload never drops them.
pub struct TlsAcceptor {
    current: ArcSwap<ServerConfig>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::new(load(config)?),
        })
    }

    /// Re-reads the files (rotated in place, or at new paths). On failure the
    /// configuration in force stays and the error says which file and why.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), TlsError> {
        self.current.store(load(config)?);
        Ok(())
    }

    /// The acceptor for the next handshake.
    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// The SANs of the leaf of a client certificate chain that rustls has already
/// verified against `client_ca_file`. `None` when the client sent none.
///
/// A verified certificate that x509-parser cannot read still yields a
/// `PeerCert` (with no SANs), never `None`: a presented, verified
/// certificate must not let the caller fall through to token authentication.
pub fn peer_cert(chain: Option<&[CertificateDer<'_>]>) -> Option<PeerCert> {
    let leaf = chain?.first()?;
    let mut out = PeerCert::default();
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        tracing::warn!("a verified client certificate could not be parsed for its SANs");
        return Some(out);
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(uri) => {
                        out.uri_sans.push((*uri).to_owned())
                    }
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        out.dns_sans.push((*dns).to_owned())
                    }
                    _ => {}
                }
            }
        }
        Ok(None) => {}
        Err(_) => {
            tracing::warn!("a verified client certificate has an unreadable SAN extension");
        }
    }
    Some(out)
}
