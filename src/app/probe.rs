//! `payroc-broker health`: one `grpc.health.v1.Health/Check` against a running
//! broker, for Docker HEALTHCHECK and Kubernetes exec probes (native gRPC
//! probes cannot speak TLS, this can). The answer is an exit status: 0 when
//! the service is SERVING, 1 for anything else (NOT_SERVING, an unknown
//! service, nothing listening, a failed handshake, the time limit), and 2 for
//! a probe that cannot even be set up (bad address, unreadable CA file).

use std::{fmt, path::Path, time::Duration};

use crate::chain::error_chain;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Where the broker listens by default (`server.listen`).
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

/// The most a CA bundle may hold: it is read whole into memory.
const MAX_CA_BYTES: u64 = 1024 * 1024;

/// A health check ready to run: the address parsed, TLS set up.
#[derive(Debug)]
pub struct Probe {
    endpoint: Endpoint,
    service: String,
    timeout: Duration,
}

/// Why a probe could not be set up (exit status 2).
#[derive(Debug)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The health service answered SERVING.
    Serving,
    /// The health service answered, with another status (`NOT_SERVING`,
    /// `UNKNOWN`, `SERVICE_UNKNOWN`).
    NotServing(&'static str),
    /// No answer: connection refused, handshake failed, an error status
    /// (`NOT_FOUND` for an unknown service name), or the time limit.
    Failed(String),
}

impl Outcome {
    /// 0 for SERVING, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Serving => 0,
            Outcome::NotServing(_) | Outcome::Failed(_) => 1,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Serving => f.write_str("SERVING"),
            Outcome::NotServing(status) => f.write_str(status),
            Outcome::Failed(why) => write!(f, "health check failed: {why}"),
        }
    }
}

impl Probe {
    /// A probe of `service` ("" is the broker's overall status) at `addr`
    /// (`HOST:PORT`, or an `http://` / `https://` URL), finishing within
    /// `timeout` connection included. With `tls_ca` (a PEM bundle) it
    /// connects with TLS and trusts only that CA; `tls_server_name` is the
    /// name the certificate must carry when it is not the address's host
    /// (for example when probing 127.0.0.1 inside the pod).
    pub fn new(
        addr: &str,
        service: &str,
        tls_ca: Option<&Path>,
        tls_server_name: Option<&str>,
        timeout: Duration,
    ) -> Result<Probe, UsageError> {
        if timeout.is_zero() {
            return Err(UsageError("--timeout must be more than 0".into()));
        }
        if tls_server_name.is_some() && tls_ca.is_none() {
            return Err(UsageError("--tls-server-name needs --tls-ca".into()));
        }
        let uri = parse_addr(addr, tls_ca.is_some())?;
        // Only the outer limit in `check` bounds the exchange: a second
        // per-request timer of the same length raced it and made the failure
        // message depend on which fired first.
        let mut endpoint = Endpoint::from(uri).connect_timeout(timeout);
        if let Some(path) = tls_ca {
            let mut tls = ClientTlsConfig::new().ca_certificate(read_ca(path)?);
            if let Some(name) = tls_server_name {
                tls = tls.domain_name(name);
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| UsageError(format!("--tls-ca {}: {e}", path.display())))?;
        }
        Ok(Probe {
            endpoint,
            service: service.to_owned(),
            timeout,
        })
    }

    /// Runs the one Check. Never fails: every problem is an [`Outcome`].
    pub async fn check(&self) -> Outcome {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(format!("no answer within {:?}", self.timeout)),
        }
    }

    async fn exchange(&self) -> Outcome {
        let channel = match self.endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed(format!(
                    "cannot connect to {}: {}",
                    self.endpoint.uri(),
                    error_chain(&e)
                ));
            }
        };
        let request = HealthCheckRequest {
            service: self.service.clone(),
        };
        match HealthClient::new(channel).check(request).await {
            Ok(r) => match r.into_inner().status() {
                ServingStatus::Serving => Outcome::Serving,
                other => Outcome::NotServing(other.as_str_name()),
            },
            Err(status) => Outcome::Failed(format!(
                "{:?} for service {:?}: {}",
                status.code(),
                self.service,
                status.message()
            )),
        }
    }
}

/// `HOST:PORT` or a URL; the scheme must agree with whether TLS is on.
fn parse_addr(addr: &str, tls: bool) -> Result<Uri, UsageError> {
    let bad = |why: &str| UsageError(format!("--addr {addr:?}: {why}"));
    let text = if addr.contains("://") {
        let https = addr.starts_with("https://");
        if !https && !addr.starts_with("http://") {
            return Err(bad("the scheme must be http or https"));
        }
        if https != tls {
            return Err(bad(if tls {
                "--tls-ca needs an https:// address (or HOST:PORT)"
            } else {
                "an https:// address needs --tls-ca"
            }));
        }
        addr.to_owned()
    } else {
        format!("{}://{addr}", if tls { "https" } else { "http" })
    };
    let uri: Uri = text.parse().map_err(|_| bad("expected HOST:PORT"))?;
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(bad("expected HOST:PORT, with a port"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("expected no path"));
    }
    Ok(uri)
}

fn read_ca(path: &Path) -> Result<Certificate, UsageError> {
    let bad = |why: String| UsageError(format!("--tls-ca {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_CA_BYTES {
        return Err(bad(format!("larger than {MAX_CA_BYTES} bytes")));
    }
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(Certificate::from_pem(pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(addr: &str, tls: bool) -> String {
        parse_addr(addr, tls).unwrap_err().to_string()
    }

    #[test]
    fn addresses_take_a_scheme_that_matches_tls() {
        assert_eq!(
            parse_addr("127.0.0.1:50051", false).unwrap().to_string(),
            "http://127.0.0.1:50051/"
        );
        assert_eq!(
            parse_addr("broker.svc:443", true).unwrap().to_string(),
            "https://broker.svc:443/"
        );
        assert_eq!(
            parse_addr("[::1]:50051", false).unwrap().host(),
            Some("[::1]")
        );
        assert!(parse_addr("http://localhost:1", false).is_ok());
        assert!(usage("http://localhost:1", true).contains("--tls-ca needs an https://"));
        assert!(usage("https://localhost:1", false).contains("needs --tls-ca"));
        assert!(usage("ftp://localhost:1", false).contains("http or https"));
    }

    #[test]
    fn an_address_needs_a_host_and_a_port_and_no_path() {
        for bad in [
            "localhost",
            "",
            ":50051",
            "http://localhost",
            "localhost:1/x",
        ] {
            assert!(parse_addr(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn setup_problems_are_usage_errors() {
        let t = Duration::from_secs(1);
        let e = Probe::new("127.0.0.1:1", "", None, None, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("--timeout"), "{e}");
        let e = Probe::new("127.0.0.1:1", "", None, Some("x"), t).unwrap_err();
        assert!(
            e.to_string().contains("--tls-server-name needs --tls-ca"),
            "{e}"
        );
        let e = Probe::new(
            "127.0.0.1:1",
            "",
            Some(Path::new("/nonexistent/ca.pem")),
            None,
            t,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/ca.pem: cannot read"),
            "{e}"
        );
        let e = Probe::new("127.0.0.1:1", "", Some(Path::new("/")), None, t).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let not_pem = std::env::temp_dir().join(format!("probe-ca-{}.pem", std::process::id()));
        std::fs::write(&not_pem, b"hello").unwrap();
        let e = Probe::new("127.0.0.1:1", "", Some(&not_pem), None, t).unwrap_err();
        let _ = std::fs::remove_file(&not_pem);
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn only_serving_exits_0() {
        assert_eq!(Outcome::Serving.exit_code(), 0);
        assert_eq!(Outcome::NotServing("NOT_SERVING").exit_code(), 1);
        assert_eq!(Outcome::Failed("refused".into()).exit_code(), 1);
    }
}
