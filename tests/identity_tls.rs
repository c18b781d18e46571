//! Workload identities from verified client certificates, through the real
//! server over TLS on loopback, with certificates made at test time: the
//! SPIFFE ID (URI SAN) and DNS name (DNS SAN) of a caller are accepted and
//! held to its allow lists; a valid certificate naming no caller gets
//! nothing, not even with a good token beside it.

mod common;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use common::*;
use hyper_util::rt::TokioIo;
use payroc_broker::{
    config::TlsConfig,
    proto::{GetBearerTokenRequest, token_broker_client::TokenBrokerClient},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use rustls::{
    ClientConfig, RootCertStore,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::{
    Code, Request,
    transport::{Channel, Endpoint, Uri},
};

const SPIFFE_WEB: &str = "spiffe://cluster.local/ns/shop/sa/checkout-web";
const DNS_BATCH: &str = "batch.jobs.svc.cluster.local";

/// checkout-web (SPIFFE ID): CreateSession on 1234001. batch (DNS name):
/// GetBearerToken on 1234001. ops (token): everything.
const CALLERS: &str = r#"
    [[callers]]
    name = "checkout-web"
    spiffe_id = "spiffe://cluster.local/ns/shop/sa/checkout-web"
    terminals = ["1234001"]
    rpcs = ["CreateSession"]
    [[callers]]
    name = "batch"
    dns_name = "batch.jobs.svc.cluster.local"
    terminals = ["1234001"]
    rpcs = ["GetBearerToken"]
    [[callers]]
    name = "ops"
    token_env = "CALLER_OPS"
    terminals = ["*"]
    rpcs = ["*"]
"#;

/// A CA and what it signs.
struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its key, in PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn server(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with these SANs.
    fn client(&self, sans: Vec<SanType>) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

/// PEM files for `[server.tls]`, removed on drop.
struct Pki {
    dir: PathBuf,
    server_ca: Ca,
    client_ca: Ca,
    tls: TlsConfig,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "payroc-identity-tls-{}",
            payroc_broker::clock::Entropy::uuid_v4(&payroc_broker::clock::OsEntropy)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
        let server = server_ca.server();
        let tls = TlsConfig {
            cert_file: write("tls.crt", &server.cert_pem),
            key_file: write("tls.key", &server.key_pem),
            client_ca_file: Some(write("clients-ca.crt", &client_ca.0.pem())),
            // Token callers connect without a certificate.
            require_client_cert: false,
        };
        Pki {
            dir,
            server_ca,
            client_ca,
            tls,
        }
    }

    /// A rustls client trusting the server, presenting `leaf` when given.
    fn client_config(&self, leaf: Option<&Leaf>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.server_ca.0.pem().as_bytes()).unwrap())
            .unwrap();
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match leaf {
            None => builder.with_no_client_auth(),
            Some(leaf) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// tonic over our own rustls client.
#[derive(Clone)]
struct Tls(SocketAddr, Arc<ClientConfig>);

impl tower_service::Service<Uri> for Tls {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, config) = (self.0, Arc::clone(&self.1));
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let tls = TlsConnector::from(config)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A broker over TLS with the callers above, and the PKI it trusts.
struct Setup {
    pki: Pki,
    served: Served,
    _sim: payroc_broker::sim::SimPayroc,
}

impl Setup {
    async fn start() -> Setup {
        let pki = Pki::new();
        let opts = Options {
            callers: CALLERS,
            ..Options::default()
        };
        let sim = start_sim(&opts).await;
        let mut config = config_for(&sim, &opts);
        config.server.tls = Some(pki.tls.clone());
        let served = serve(config).await;
        Setup {
            pki,
            served,
            _sim: sim,
        }
    }

    /// A client on a new TLS connection presenting `leaf`.
    async fn client(&self, leaf: Option<&Leaf>) -> TokenBrokerClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.served.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(Tls(self.served.addr, self.pki.client_config(leaf)))
            .await
            .expect("TLS connection");
        TokenBrokerClient::new(channel)
    }
}

fn bearer_req(terminal: &str) -> Request<GetBearerTokenRequest> {
    Request::new(GetBearerTokenRequest {
        processing_terminal_id: terminal.into(),
        min_validity: None,
    })
}

fn with_ops<T>(mut r: Request<T>) -> Request<T> {
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {CALLER_OPS}").parse().unwrap(),
    );
    r
}

#[tokio::test]
async fn a_spiffe_id_in_the_certificate_identifies_its_caller() {
    let s = Setup::start().await;
    let web = s.pki.client_ca.client(vec![uri(SPIFFE_WEB)]);
    let mut c = s.client(Some(&web)).await;
    c.create_session(payment("1234001")).await.unwrap();
    // Held to checkout-web's allow lists: not this RPC, not that terminal.
    let (st, _) = expect_code(
        c.get_bearer_token(bearer_req("1234001")).await.unwrap_err(),
        Code::PermissionDenied,
    );
    assert!(st.message().contains("checkout-web"), "{}", st.message());
    expect_code(
        c.create_session(payment("1234002")).await.unwrap_err(),
        Code::PermissionDenied,
    );
    // The certificate decides, not a token beside it (ops could do this).
    expect_code(
        c.get_bearer_token(with_ops(bearer_req("1234002")))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
    );
}

#[tokio::test]
async fn a_dns_name_in_the_certificate_identifies_its_caller() {
    let s = Setup::start().await;
    let batch = s
        .pki
        .client_ca
        .client(vec![dns("other.example"), dns(DNS_BATCH)]);
    let mut c = s.client(Some(&batch)).await;
    c.get_bearer_token(bearer_req("1234001")).await.unwrap();
    let (st, _) = expect_code(
        c.create_session(payment("1234001")).await.unwrap_err(),
        Code::PermissionDenied,
    );
    assert!(st.message().contains("batch"), "{}", st.message());
    expect_code(
        c.get_bearer_token(bearer_req("1234002")).await.unwrap_err(),
        Code::PermissionDenied,
    );
}

#[tokio::test]
async fn a_valid_certificate_naming_no_caller_gets_nothing() {
    let s = Setup::start().await;
    for sans in [
        vec![uri("spiffe://cluster.local/ns/shop/sa/stranger")],
        vec![dns("stranger.shop.svc")],
        // The caller's SPIFFE ID as a DNS name, or its DNS name as a URI:
        // each SAN type matches only its own key.
        vec![uri("spiffe://batch.jobs.svc.cluster.local")],
        vec![],
    ] {
        let what = format!("{sans:?}");
        let stranger = s.pki.client_ca.client(sans);
        let mut c = s.client(Some(&stranger)).await;
        let (st, _) = expect_code(
            c.create_session(payment("1234001")).await.unwrap_err(),
            Code::Unauthenticated,
        );
        assert!(
            st.message().contains("certificate"),
            "{what}: {}",
            st.message()
        );
        // Not even with a good token beside it.
        expect_code(
            c.get_bearer_token(with_ops(bearer_req("1234001")))
                .await
                .unwrap_err(),
            Code::Unauthenticated,
        );
    }
}

#[tokio::test]
async fn without_a_certificate_a_token_still_works_over_tls() {
    let s = Setup::start().await;
    let mut c = s.client(None).await;
    c.get_bearer_token(with_ops(bearer_req("1234002")))
        .await
        .unwrap();
    expect_code(
        c.get_bearer_token(bearer_req("1234001")).await.unwrap_err(),
        Code::Unauthenticated,
    );
}
