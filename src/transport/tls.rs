//! `[server.tls]`: reading the PEM files into a rustls server configuration
//! (TLS 1.2/1.3, ALPN `h2`, ring only), swapping it on reload, and reading the
//! SANs of a verified client certificate.
//!
//! Errors name the configuration key and the file, never the files' contents:
//! a key file that fails to parse could still hold most of a private key.

use std::{
    fmt,
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
use zeroize::Zeroizing;

use super::{PeerCert, Protocol};
use crate::config::{
    TlsConfig,
    secret_file::{MAX_PUBLIC_FILE_BYTES, MAX_SECRET_FILE_BYTES, read_public},
};

/// The one application protocol the port speaks.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";

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
    load_for(config, Protocol::Grpc)
}

/// [`load`], offering the ALPN protocols of `protocol`.
fn load_for(config: &TlsConfig, protocol: Protocol) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let err = |key, file: &Path, reason: String| TlsError {
        key,
        file: file.to_owned(),
        reason,
    };

    let certs = read_certs(&config.cert_file).map_err(|r| err(CERT_KEY, &config.cert_file, r))?;
    // Wiped when dropped. `read_public`: the configuration already warned
    // about the file's mode when it was loaded; once is enough.
    let key_pem = Zeroizing::new(
        read_public(&config.key_file, MAX_SECRET_FILE_BYTES)
            .map_err(|e| err(KEY_KEY, &config.key_file, e.reason))?,
    );
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
    server.alpn_protocols = match protocol {
        Protocol::Grpc => vec![ALPN_H2.to_vec()],
        // h2 first: a client offering both gets HTTP/2.
        Protocol::Http => vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()],
    };
    Ok(Arc::new(server))
}

/// Every `CERTIFICATE` block of a PEM file, at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_public(path, MAX_PUBLIC_FILE_BYTES).map_err(|e| e.reason)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_reason(&e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err("holds no PEM `CERTIFICATE` block".into());
    }
    Ok(certs)
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
    protocol: Protocol,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// The acceptor of a port speaking `protocol` (its ALPN offer).
    pub fn new(config: &TlsConfig, protocol: Protocol) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::new(load_for(config, protocol)?),
            protocol,
        })
    }

    /// Re-reads the files (rotated in place, or at new paths). On failure the
    /// configuration in force stays and the error says which file and why.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), TlsError> {
        self.current.store(load_for(config, self.protocol)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed server certificate and its key, in PEM.
    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    struct Files(PathBuf);

    impl Files {
        fn new() -> Files {
            let dir = std::env::temp_dir().join(format!(
                "payroc-tls-unit-{}",
                crate::clock::Entropy::uuid_v4(&crate::clock::OsEntropy)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Files(dir)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(files: &Files, cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            cert_file: files.write("tls.crt", cert),
            key_file: files.write("tls.key", key),
            client_ca_file: None,
            require_client_cert: false,
        }
    }

    #[test]
    fn a_good_pair_loads_with_h2_only() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let server = load(&config(&files, &cert, &key)).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
        // The identity endpoint's port offers HTTP/1.1 too, after h2.
        let http = load_for(&config(&files, &cert, &key), Protocol::Http).unwrap();
        assert_eq!(
            http.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn bad_files_name_the_key_and_file_and_never_quote_the_key() {
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        // A key whose body is intact but whose BEGIN line is mangled, so a
        // parser that quoted lines would print key material.
        let body: String = key.lines().nth(1).unwrap().to_owned();
        let mangled = key.replace("BEGIN PRIVATE KEY", "BEGIN PRIVATE KEY-- ");
        let cases = [
            ("", key.as_str(), "server.tls.cert_file", "no PEM"),
            (&cert, "garbage", "server.tls.key_file", "no PEM"),
            (&cert, &other_key, "server.tls.key_file", "does not fit"),
            (&key, &key, "server.tls.cert_file", "no PEM"),
            (&cert, &mangled, "server.tls.key_file", "malformed"),
        ];
        for (cert, key, expected_key, reason) in cases {
            let files = Files::new();
            let tls = config(&files, cert, key);
            let e = load(&tls).expect_err("refused");
            assert_eq!(e.key, expected_key, "{e}");
            assert!(e.reason.contains(reason), "{e}");
            let text = e.to_string();
            assert!(text.contains(expected_key), "{text}");
            assert!(text.contains(&files.0.display().to_string()), "{text}");
            assert!(!text.contains(&body[..20]), "key material in: {text}");
        }
    }

    #[test]
    fn missing_files_directories_and_huge_files_are_refused_before_reading() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let mut tls = config(&files, &cert, &key);
        tls.cert_file = files.0.join("absent.crt");
        assert_eq!(load(&tls).unwrap_err().key, "server.tls.cert_file");
        tls.cert_file = files.0.clone();
        let e = load(&tls).unwrap_err();
        assert!(e.reason.contains("not a regular file"), "{e}");
        tls.cert_file = files.write("huge.crt", &"x".repeat(2 * 1024 * 1024));
        let e = load(&tls).unwrap_err();
        assert!(e.reason.contains("bytes"), "{e}");
        tls.cert_file = files.write("tls.crt", &cert);
        tls.key_file = files.write("huge.key", &"x".repeat(64 * 1024));
        assert_eq!(load(&tls).unwrap_err().key, "server.tls.key_file");
    }

    #[test]
    fn a_client_ca_file_must_hold_a_certificate() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let mut tls = config(&files, &cert, &key);
        tls.client_ca_file = Some(files.write("ca.crt", "nothing here"));
        assert_eq!(load(&tls).unwrap_err().key, "server.tls.client_ca_file");
        tls.client_ca_file = Some(files.write("ca.crt", &cert));
        load(&tls).expect("a certificate is a usable trust anchor");
    }

    #[test]
    fn a_failed_reload_keeps_the_configuration_in_force() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let tls = config(&files, &cert, &key);
        let acceptor = TlsAcceptor::new(&tls, Protocol::Grpc).unwrap();
        let before = acceptor.current.load_full();
        files.write("tls.key", "garbage");
        assert!(acceptor.reload(&tls).is_err());
        assert!(Arc::ptr_eq(&before, &acceptor.current.load_full()));
        let (cert, key) = self_signed();
        acceptor.reload(&config(&files, &cert, &key)).unwrap();
        assert!(!Arc::ptr_eq(&before, &acceptor.current.load_full()));
    }
}
