//! Workload identities from verified client certificates, through the real
//! server over TLS on loopback, with certificates made at test time: the
//! SPIFFE ID (URI SAN) and DNS name (DNS SAN) of a caller are accepted and
//! held to its allow lists; a valid certificate naming no caller gets
//! nothing, not even with a good token beside it.

mod common;

use common::{pki::*, *};
use payroc_broker::proto::{GetBearerTokenRequest, token_broker_client::TokenBrokerClient};
use tonic::{Code, Request, transport::Channel};

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

/// A broker over TLS with the callers above, and the PKI it trusts.
struct Setup {
    pki: Pki,
    served: Served,
    _sim: payroc_sim::SimPayroc,
}

impl Setup {
    async fn start() -> Setup {
        // Token callers connect without a certificate.
        let pki = Pki::new(false);
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
        let config = client_config(&self.pki.server_ca, leaf, BOTH);
        let channel = tls_channel(self.served.addr, config)
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
    let web = s.pki.client_ca.client_with(vec![uri(SPIFFE_WEB)]);
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
        .client_with(vec![dns("other.example"), dns(DNS_BATCH)]);
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
        let stranger = s.pki.client_ca.client_with(sans);
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
