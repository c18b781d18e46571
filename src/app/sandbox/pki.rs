//! `sandbox --tls`: a throwaway public key infrastructure made at start-up, so
//! that TLS and client certificates can be tried on a fresh machine.
//!
//! One CA signs the server's certificate (for `localhost` and the loopback
//! addresses) and one client certificate carrying [`CLIENT_SPIFFE_ID`], the
//! identity of the sandbox's only caller. The CA's key is never written: once
//! the process is gone nobody can sign with it, so the files are worthless
//! outside this sandbox run.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// The SPIFFE ID in the client certificate, and the `spiffe_id` of the
/// sandbox's caller.
pub const CLIENT_SPIFFE_ID: &str = "spiffe://sandbox.payroc-broker.local/example-client";

/// Where the files of a TLS sandbox are.
#[derive(Debug, Clone)]
pub struct SandboxPki {
    pub dir: PathBuf,
    /// The CA certificate: what clients trust, and what client certificates
    /// are verified against.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl SandboxPki {
    /// Makes the CA and both certificates and writes them into `dir`
    /// (created if missing; files of an earlier run are replaced).
    pub fn create(dir: &Path) -> Result<SandboxPki, String> {
        let failed = |what: &str, e: &dyn std::fmt::Display| format!("sandbox --tls: {what}: {e}");
        create_private_dir(dir)
            .map_err(|e| failed(&format!("cannot create {}", dir.display()), &e))?;
        let ca = ca().map_err(|e| failed("cannot make the CA", &e))?;
        let (server_cert, server_key) =
            leaf(&ca, server_params()).map_err(|e| failed("cannot make the server cert", &e))?;
        let (client_cert, client_key) =
            leaf(&ca, client_params()).map_err(|e| failed("cannot make the client cert", &e))?;
        let pki = SandboxPki {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        };
        for (path, text) in [
            (&pki.ca_cert, ca.pem()),
            (&pki.server_cert, server_cert),
            (&pki.server_key, server_key),
            (&pki.client_cert, client_cert),
            (&pki.client_key, client_key),
        ] {
            write_private(path, &text)
                .map_err(|e| failed(&format!("cannot write {}", path.display()), &e))?;
        }
        Ok(pki)
    }
}

fn ca() -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    (params.distinguished_name).push(DnType::CommonName, "payroc-broker sandbox CA (throwaway)");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

fn server_params() -> Result<CertificateParams, rcgen::Error> {
    // IP strings become IP address SANs, so clients may dial 127.0.0.1.
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    (params.distinguished_name).push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

fn client_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    (params.distinguished_name).push(DnType::CommonName, "example-client");
    params.subject_alt_names = vec![SanType::URI(CLIENT_SPIFFE_ID.try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// A certificate signed by `ca` and its fresh key, both PEM.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    params: Result<CertificateParams, rcgen::Error>,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let cert = params?.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Owner-only: the broker warns about key files others can read, and the
/// sandbox should not teach the habit.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    // Replaced, not truncated in place: a file of an earlier run may be
    // open by a client, and its mode may be wider than ours.
    let _ = fs::remove_file(path);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}
