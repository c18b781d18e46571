//! `[server.tls]` through the real server on loopback, with certificates made
//! at test time: TLS 1.2/1.3 with ALPN h2, client certificates verified
//! against the configured CA (wrong CA, expired, missing), the SANs in
//! `PeerInfo`, and certificates re-read on reload without dropping open
//! connections.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use common::{pki::*, *};
use payroc_broker::{
    clock::Clock,
    config::{Config, TlsConfig},
    transport::{PeerInfo, Transport},
};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, SanType};
use rustls::ClientConfig;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const SPIFFE: &str = "spiffe://test.local/ns/shop/sa/checkout-web";
const DNS: &str = "checkout-web.shop.svc";

impl Ca {
    /// A client certificate naming this file's SPIFFE ID and DNS name.
    fn client(&self) -> Leaf {
        self.sign(client_params())
    }
}

fn client_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![
        SanType::URI(SPIFFE.try_into().unwrap()),
        SanType::DnsName(DNS.try_into().unwrap()),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

async fn check(
    channel: &Channel,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(Duration::from_secs(5));
    HealthClient::new(channel.clone()).check(req).await
}

/// A health Check on a new TLS connection: Ok, or why not.
async fn check_new(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<Channel, String> {
    let channel = tls_channel(addr, config).await?;
    check(&channel).await.map_err(|s| format!("{s:?}"))?;
    Ok(channel)
}

async fn serve_tls(tls: TlsConfig) -> (Served, payroc_sim::SimPayroc) {
    let opts = Options::default();
    let sim = start_sim(&opts).await;
    let mut config = config_for(&sim, &opts);
    config.server.tls = Some(tls);
    (serve(config).await, sim)
}

#[tokio::test]
async fn tls_12_and_13_with_alpn_h2() {
    let pki = Pki::new(false);
    let (served, _sim) = serve_tls(pki.tls.clone()).await;
    for (version, expected) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let stream = handshake(served.addr, client_config(&pki.server_ca, None, &[version]))
            .await
            .unwrap();
        let (_, conn) = stream.get_ref();
        assert_eq!(conn.protocol_version(), Some(expected));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    }
    // gRPC over it, with and without a client certificate (not required).
    check_new(served.addr, client_config(&pki.server_ca, None, BOTH))
        .await
        .unwrap();
    let client = pki.client_ca.client();
    check_new(
        served.addr,
        client_config(&pki.server_ca, Some(&client), BOTH),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_plaintext_client_is_refused_on_a_tls_port() {
    let pki = Pki::new(false);
    let (served, _sim) = serve_tls(pki.tls.clone()).await;
    let plain = Endpoint::from_shared(format!("http://{}", served.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    match plain {
        Err(_) => {}
        Ok(channel) => assert!(check(&channel).await.is_err(), "h2c answered on a TLS port"),
    }
    // A client offering only HTTP/1.1 over TLS is refused in the handshake.
    let mut http1 = (*client_config(&pki.server_ca, None, BOTH)).clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    assert!(handshake(served.addr, Arc::new(http1)).await.is_err());
}

#[tokio::test]
async fn client_certificates_are_verified_against_the_client_ca() {
    let pki = Pki::new(true);
    let (served, _sim) = serve_tls(pki.tls.clone()).await;
    let addr = served.addr;
    let good = pki.client_ca.client();
    check_new(addr, client_config(&pki.server_ca, Some(&good), BOTH))
        .await
        .expect("a certificate from the client CA");

    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let none = check_new(addr, client_config(&pki.server_ca, None, versions)).await;
        assert!(none.is_err(), "no certificate with require_client_cert");

        let stranger = Ca::new("another CA").client();
        let wrong_ca = check_new(
            addr,
            client_config(&pki.server_ca, Some(&stranger), versions),
        )
        .await;
        assert!(wrong_ca.is_err(), "a certificate from another CA");

        let mut params = client_params();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = pki.client_ca.sign(params);
        let expired = check_new(
            addr,
            client_config(&pki.server_ca, Some(&expired), versions),
        )
        .await;
        assert!(expired.is_err(), "an expired certificate");
    }
}

#[tokio::test]
async fn a_wrong_client_certificate_is_refused_even_when_not_required() {
    // Not presenting one is allowed; presenting a bad one is not.
    let pki = Pki::new(false);
    let (served, _sim) = serve_tls(pki.tls.clone()).await;
    let stranger = Ca::new("another CA").client();
    let r = check_new(
        served.addr,
        client_config(&pki.server_ca, Some(&stranger), BOTH),
    )
    .await;
    assert!(r.is_err());
}

/// Answers every health Check with the `PeerInfo` it saw, in the status
/// message: the transport's extensions as the handlers get them.
#[derive(Clone)]
struct PeerEcho;

impl tonic::server::NamedService for PeerEcho {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl tower_service::Service<http::Request<tonic::body::Body>> for PeerEcho {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let seen = match req.extensions().get::<PeerInfo>() {
            None => "no PeerInfo".to_owned(),
            Some(p) => match &p.cert {
                None => format!("remote={} cert=none", p.remote),
                Some(c) => format!(
                    "remote={} uri={} dns={}",
                    p.remote,
                    c.uri_sans.join(","),
                    c.dns_sans.join(",")
                ),
            },
        };
        std::future::ready(Ok(tonic::Status::unknown(seen).into_http()))
    }
}

async fn peer_seen(addr: SocketAddr, config: Arc<ClientConfig>) -> String {
    let channel = tls_channel(addr, config).await.unwrap();
    check(&channel).await.unwrap_err().message().to_owned()
}

#[tokio::test]
async fn the_verified_client_certificate_sans_are_in_peer_info() {
    let pki = Pki::new(false);
    let server = {
        let mut c: Config = config_for(&start_sim(&Options::default()).await, &Options::default());
        c.server.tls = Some(pki.tls.clone());
        c.server
    };
    let transport = Transport::new(
        &server,
        payroc_broker::transport::Protocol::Grpc,
        Clock::system(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = tonic::service::Routes::new(PeerEcho).prepare();
    let _serving = tokio::spawn(transport.serve(listener, routes, std::future::pending()));

    let client = pki.client_ca.client();
    let seen = peer_seen(addr, client_config(&pki.server_ca, Some(&client), BOTH)).await;
    assert!(seen.starts_with("remote=127.0.0.1:"), "{seen}");
    assert!(seen.ends_with(&format!("uri={SPIFFE} dns={DNS}")), "{seen}");

    let seen = peer_seen(addr, client_config(&pki.server_ca, None, BOTH)).await;
    assert!(seen.ends_with("cert=none"), "{seen}");
}

#[tokio::test]
async fn plaintext_requests_carry_peer_info_too() {
    let server = config_for(&start_sim(&Options::default()).await, &Options::default()).server;
    let transport = Transport::new(
        &server,
        payroc_broker::transport::Protocol::Grpc,
        Clock::system(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _serving = tokio::spawn(transport.serve(
        listener,
        tonic::service::Routes::new(PeerEcho).prepare(),
        std::future::pending(),
    ));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let seen = check(&channel).await.unwrap_err().message().to_owned();
    assert!(seen.starts_with("remote=127.0.0.1:"), "{seen}");
    assert!(seen.ends_with("cert=none"), "{seen}");
}

/// Rotates the server's certificate in place: a new one from another CA.
fn rotate(pki: &Pki, to: &Ca) {
    let next = to.server();
    write_atomically(&pki.tls.cert_file, &next.cert_pem);
    write_atomically(&pki.tls.key_file, &next.key_pem);
}

/// As Kubernetes updates a Secret volume: never a half-written file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_reload_rereads_certificates_and_keeps_open_connections() {
    let pki = Pki::new(false);
    let (served, sim) = serve_tls(pki.tls.clone()).await;
    let addr = served.addr;
    let old_trust = client_config(&pki.server_ca, None, BOTH);
    let open = check_new(addr, Arc::clone(&old_trust)).await.unwrap();

    let next_ca = Ca::new("next server CA");
    let new_trust = client_config(&next_ca, None, BOTH);
    assert!(check_new(addr, Arc::clone(&new_trust)).await.is_err());

    rotate(&pki, &next_ca);
    let mut reloaded = config_for(&sim, &Options::default());
    reloaded.server.tls = Some(pki.tls.clone());
    served.reload.send(reloaded.clone()).await.unwrap();
    eventually("new connections get the new certificate", || async {
        check_new(addr, Arc::clone(&new_trust)).await.is_ok()
    })
    .await;
    // The connection opened before still works: had it been dropped, the
    // channel's reconnect would have failed against the new certificate.
    check(&open)
        .await
        .expect("the open connection survives the reload");
    assert!(check_new(addr, old_trust).await.is_err());

    // A bad key on reload is refused; the new certificate keeps serving.
    std::fs::write(
        &pki.tls.key_file,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n",
    )
    .unwrap();
    served.reload.send(reloaded.clone()).await.unwrap();
    // A second reload queues behind the first, so once it is taken the bad
    // one has been handled.
    served.reload.send(reloaded).await.unwrap();
    check_new(addr, new_trust)
        .await
        .expect("the certificate in force keeps serving");
    drop(pki.dir);
}

#[tokio::test]
async fn a_client_certificate_identifies_its_caller_end_to_end() {
    use payroc_broker::proto::{GetBearerTokenRequest, token_broker_client::TokenBrokerClient};
    let pki = Pki::new(false);
    let opts = Options {
        callers: r#"
            [[callers]]
            name = "checkout-web"
            spiffe_id = "spiffe://test.local/ns/shop/sa/checkout-web"
            terminals = ["1234001"]
            rpcs = ["GetBearerToken"]
        "#,
        ..Options::default()
    };
    let sim = start_sim(&opts).await;
    let mut config = config_for(&sim, &opts);
    config.server.tls = Some(pki.tls.clone());
    let served = serve(config).await;
    let call = |leaf: Option<Leaf>| {
        let trust = client_config(&pki.server_ca, leaf.as_ref(), BOTH);
        async move {
            let channel = tls_channel(served.addr, trust).await.unwrap();
            TokenBrokerClient::new(channel)
                .get_bearer_token(GetBearerTokenRequest {
                    processing_terminal_id: "1234001".into(),
                    min_validity: None,
                })
                .await
        }
    };
    call(Some(pki.client_ca.client()))
        .await
        .expect("the certificate's SPIFFE ID is checkout-web's");
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.subject_alt_names = vec![SanType::URI(
        "spiffe://test.local/ns/shop/sa/someone-else"
            .try_into()
            .unwrap(),
    )];
    let e = call(Some(pki.client_ca.sign(other))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = call(None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}
