//! Identification order, allow lists, limits and reloads of [`Callers`].

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tonic::metadata::MetadataMap;

use super::{peer::PeerCert, *};
use crate::config::{Allow, RateLimit, sha256};

const WEB_TOKEN: &str = "web-token-2c8f0e6a9d41b7c3";
const OPS_TOKEN: &str = "ops-token-93b1d7e2a6c4f058";
const WEB_SPIFFE: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BATCH_DNS: &str = "batch.jobs.svc";

fn base() -> Config {
    let text = r#"
        [payroc]
        identity_url = "http://127.0.0.1:9/authorize"
        api_url = "http://127.0.0.1:9/v1"
        [[credentials]]
        name = "acme"
        api_key_env = "KEY"
        terminals = ["1234001", "1234002"]
    "#;
    let env = |n: &str| (n == "KEY").then(|| "key-acme-0000".to_owned());
    Config::parse(text, Path::new("t.toml"), Path::new("."), &env).unwrap()
}

fn caller(name: &str, identity: CallerIdentity, rpcs: Allow<Rpc>) -> CallerConfig {
    CallerConfig {
        name: name.into(),
        identity,
        terminals: Allow::Only(vec!["1234001".into()]),
        rpcs,
        rate_limit: None,
    }
}

/// web: SPIFFE ID, CreateSession on 1234001; batch: DNS name, every RPC on
/// 1234001; ops: token, everything; web-token: token, CreateSession.
fn config() -> Config {
    let mut c = base();
    c.callers = vec![
        caller(
            "web",
            CallerIdentity::SpiffeId(WEB_SPIFFE.into()),
            Allow::Only(vec![Rpc::CreateSession]),
        ),
        caller(
            "batch",
            CallerIdentity::DnsName(BATCH_DNS.into()),
            Allow::All,
        ),
        CallerConfig {
            terminals: Allow::All,
            ..caller(
                "ops",
                CallerIdentity::TokenSha256(sha256(OPS_TOKEN.as_bytes())),
                Allow::All,
            )
        },
        caller(
            "web-token",
            CallerIdentity::TokenSha256(sha256(WEB_TOKEN.as_bytes())),
            Allow::Only(vec![Rpc::CreateSession]),
        ),
    ];
    c.server.trusted_proxies = vec![IpNet {
        addr: "127.0.0.0".parse().unwrap(),
        prefix: 8,
    }];
    c
}

fn callers(config: &Config) -> Callers {
    Callers::new(config, Clock::system(), None)
}

fn md(entries: &[(&'static str, &str)]) -> MetadataMap {
    let mut m = MetadataMap::new();
    for (k, v) in entries {
        m.append(*k, v.parse().unwrap());
    }
    m
}

fn bearer(token: &str) -> MetadataMap {
    md(&[("authorization", &format!("Bearer {token}"))])
}

fn peer(addr: &str) -> PeerInfo {
    PeerInfo {
        remote: addr.parse::<SocketAddr>().unwrap(),
        cert: None,
    }
}

fn with_cert(addr: &str, uris: &[&str], dns: &[&str]) -> PeerInfo {
    PeerInfo {
        cert: Some(Arc::new(PeerCert {
            uri_sans: uris.iter().map(|s| s.to_string()).collect(),
            dns_sans: dns.iter().map(|s| s.to_string()).collect(),
        })),
        ..peer(addr)
    }
}

#[track_caller]
fn name(r: Result<Caller, BrokerError>) -> String {
    r.unwrap().name().to_owned()
}

#[track_caller]
fn unauthenticated(r: Result<Caller, BrokerError>) -> &'static str {
    match r {
        Err(BrokerError::Unauthenticated(why)) => why,
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

const LOCAL: &str = "127.0.0.1:40000";

#[test]
fn tokens_identify_their_callers() {
    let c = callers(&config());
    assert_eq!(
        name(c.identify(&bearer(OPS_TOKEN), Some(&peer(LOCAL)))),
        "ops"
    );
    let web = c.identify(&bearer(WEB_TOKEN), None).unwrap();
    assert_eq!((web.name(), web.via()), ("web-token", Via::Token));
    for m in [
        md(&[]),
        md(&[("authorization", "web-token")]),
        md(&[("authorization", "Basic abc")]),
        bearer("nope"),
    ] {
        unauthenticated(c.identify(&m, Some(&peer(LOCAL))));
    }
}

#[test]
fn two_authorization_entries_are_refused_even_if_both_are_good() {
    let c = callers(&config());
    let m = md(&[
        ("authorization", &format!("Bearer {OPS_TOKEN}")),
        ("authorization", &format!("Bearer {OPS_TOKEN}")),
    ]);
    assert!(unauthenticated(c.identify(&m, None)).contains("more than one"));
    // ...also beside a certificate that names a caller.
    let cert = with_cert(LOCAL, &[WEB_SPIFFE], &[]);
    unauthenticated(c.identify(&m, Some(&cert)));
}

#[test]
fn certificates_name_callers_by_spiffe_id_or_dns_name() {
    let c = callers(&config());
    let web = c
        .identify(&md(&[]), Some(&with_cert(LOCAL, &[WEB_SPIFFE], &[])))
        .unwrap();
    assert_eq!((web.name(), web.via()), ("web", Via::Certificate));
    assert_eq!(
        name(c.identify(&md(&[]), Some(&with_cert(LOCAL, &[], &["x", BATCH_DNS])))),
        "batch"
    );
}

#[test]
fn a_certificate_naming_no_caller_gets_nothing_not_even_with_a_good_token() {
    let c = callers(&config());
    let stranger = with_cert(LOCAL, &["spiffe://cluster.local/ns/x/sa/y"], &["y.x.svc"]);
    let why = unauthenticated(c.identify(&bearer(OPS_TOKEN), Some(&stranger)));
    assert!(why.contains("certificate"), "{why}");
    // A certificate without SANs is no better.
    unauthenticated(c.identify(&bearer(OPS_TOKEN), Some(&with_cert(LOCAL, &[], &[]))));
}

#[test]
fn the_certificate_comes_before_the_token() {
    let c = callers(&config());
    let both = c.identify(
        &bearer(OPS_TOKEN),
        Some(&with_cert(LOCAL, &[WEB_SPIFFE], &[])),
    );
    assert_eq!(name(both), "web");
}

#[test]
fn open_mode_lets_everyone_in_and_ignores_certificates() {
    let mut config = config();
    config.callers.clear();
    let c = callers(&config);
    assert!(c.is_open());
    let stranger = with_cert(LOCAL, &["spiffe://elsewhere/x"], &[]);
    for (m, p) in [(md(&[]), None), (bearer("anything"), Some(&stranger))] {
        let anon = c.identify(&m, p).unwrap();
        assert_eq!((anon.name(), anon.via()), ("anonymous", Via::Open));
        anon.authorize(Rpc::GetBearerToken, "9999999").unwrap();
        assert!(
            anon.session_slot().unwrap().is_none(),
            "no per-caller quota"
        );
    }
}

fn xfcc_config(trusted: &str) -> Config {
    let mut c = config();
    c.server.forwarded_identity = ForwardedIdentity::Xfcc;
    let (addr, prefix) = trusted.split_once('/').unwrap();
    c.server.trusted_proxies = vec![IpNet {
        addr: addr.parse().unwrap(),
        prefix: prefix.parse().unwrap(),
    }];
    c
}

fn xfcc(value: &str) -> (&'static str, String) {
    ("x-forwarded-client-cert", value.to_owned())
}

fn md_owned(entries: &[(&'static str, String)]) -> MetadataMap {
    let mut m = MetadataMap::new();
    for (k, v) in entries {
        m.append(*k, v.parse().unwrap());
    }
    m
}

#[test]
fn xfcc_from_a_trusted_proxy_names_the_caller_by_its_last_element() {
    let c = callers(&xfcc_config("127.0.0.0/8"));
    let header =
        format!("By=spiffe://cluster.local/ns/b/sa/broker;Hash=ab;Subject=\"\";URI={WEB_SPIFFE}");
    let web = c
        .identify(&md_owned(&[xfcc(&header)]), Some(&peer(LOCAL)))
        .unwrap();
    assert_eq!((web.name(), web.via()), ("web", Via::ForwardedIdentity));
    // Only the last element counts: an earlier hop's identity does not.
    let hops = format!("URI={WEB_SPIFFE},URI=spiffe://cluster.local/ns/gw/sa/gateway");
    unauthenticated(c.identify(&md_owned(&[xfcc(&hops)]), Some(&peer(LOCAL))));
    // Two header entries are one list: the last entry's last element.
    let two = md_owned(&[
        xfcc("URI=spiffe://cluster.local/ns/gw/sa/gateway"),
        xfcc(&format!("URI={WEB_SPIFFE}")),
    ]);
    assert_eq!(name(c.identify(&two, Some(&peer(LOCAL)))), "web");
}

#[test]
fn xfcc_from_any_other_peer_is_ignored() {
    let c = callers(&xfcc_config("10.0.0.0/8"));
    let m = md_owned(&[xfcc(&format!("URI={WEB_SPIFFE}"))]);
    let why = unauthenticated(c.identify(&m, Some(&peer(LOCAL))));
    assert_eq!(why, no_identity(token::Headers::Authorization));
    // ...so its token is what counts.
    let mut m = m;
    m.insert(
        "authorization",
        format!("Bearer {OPS_TOKEN}").parse().unwrap(),
    );
    assert_eq!(name(c.identify(&m, Some(&peer(LOCAL)))), "ops");
    // No peer known at all: not trusted either.
    unauthenticated(c.identify(&md_owned(&[xfcc(&format!("URI={WEB_SPIFFE}"))]), None));
    // From a trusted peer it would have counted.
    assert_eq!(name(c.identify(&m, Some(&peer("10.1.2.3:5000")))), "web");
}

#[test]
fn xfcc_is_ignored_when_forwarded_identity_is_off() {
    let mut config = xfcc_config("127.0.0.0/8");
    config.server.forwarded_identity = ForwardedIdentity::None;
    let c = callers(&config);
    let m = md_owned(&[xfcc(&format!("URI={WEB_SPIFFE}"))]);
    unauthenticated(c.identify(&m, Some(&peer(LOCAL))));
}

#[test]
fn malformed_xfcc_from_a_trusted_proxy_is_refused_and_unknown_falls_through() {
    let c = callers(&xfcc_config("127.0.0.0/8"));
    let bad = md_owned(&[
        xfcc("URI=\"unterminated"),
        ("authorization", format!("Bearer {OPS_TOKEN}")),
    ]);
    assert!(unauthenticated(c.identify(&bad, Some(&peer(LOCAL)))).contains("malformed"));
    let unknown = md_owned(&[
        xfcc("URI=spiffe://cluster.local/ns/x/sa/unknown"),
        ("authorization", format!("Bearer {OPS_TOKEN}")),
    ]);
    assert_eq!(name(c.identify(&unknown, Some(&peer(LOCAL)))), "ops");
    // A forwarded SPIFFE ID never matches a dns_name.
    let dns = md_owned(&[xfcc(&format!("URI={BATCH_DNS};DNS={BATCH_DNS}"))]);
    unauthenticated(c.identify(&dns, Some(&peer(LOCAL))));
}

#[test]
fn l5d_client_id_names_callers_by_dns_name() {
    let mut config = config();
    config.server.forwarded_identity = ForwardedIdentity::L5dClientId;
    let c = callers(&config);
    let batch = c
        .identify(
            &md(&[("l5d-client-id", "Batch.Jobs.svc")]),
            Some(&peer(LOCAL)),
        )
        .unwrap();
    assert_eq!(
        (batch.name(), batch.via()),
        ("batch", Via::ForwardedIdentity)
    );
    // Not matched against SPIFFE IDs, and XFCC is not read in this mode.
    unauthenticated(c.identify(&md(&[("l5d-client-id", WEB_SPIFFE)]), Some(&peer(LOCAL))));
    unauthenticated(c.identify(
        &md_owned(&[xfcc(&format!("URI={WEB_SPIFFE}"))]),
        Some(&peer(LOCAL)),
    ));
    let two = md(&[("l5d-client-id", BATCH_DNS), ("l5d-client-id", BATCH_DNS)]);
    assert!(unauthenticated(c.identify(&two, Some(&peer(LOCAL)))).contains("more than one"));
    // Untrusted peer: ignored.
    unauthenticated(c.identify(
        &md(&[("l5d-client-id", BATCH_DNS)]),
        Some(&peer("192.0.2.1:1")),
    ));
}

#[test]
fn allow_lists_are_enforced() {
    let c = callers(&config());
    let web = c.identify(&bearer(WEB_TOKEN), None).unwrap();
    web.authorize(Rpc::CreateSession, "1234001").unwrap();
    for (rpc, terminal) in [
        (Rpc::GetBearerToken, "1234001"),
        (Rpc::WatchBearerToken, "1234001"),
        (Rpc::ExtAuthz, "1234001"),
        (Rpc::CreateSession, "1234002"),
    ] {
        assert!(
            matches!(
                web.authorize(rpc, terminal),
                Err(BrokerError::PermissionDenied { .. })
            ),
            "{rpc:?} {terminal}"
        );
    }
    let ops = c.identify(&bearer(OPS_TOKEN), None).unwrap();
    ops.authorize(Rpc::GetBearerToken, "anything").unwrap();
}

#[test]
fn debug_output_names_callers_and_no_secret() {
    let c = callers(&config());
    let dump = format!("{c:?} {:?}", c.identify(&bearer(OPS_TOKEN), None).unwrap());
    assert!(dump.contains("ops"), "{dump}");
    assert!(!dump.contains(OPS_TOKEN), "{dump}");
    let digest: String = sha256(OPS_TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!dump.contains(&digest[..16]), "{dump}");
}

fn limited(count: u32, per: Duration, burst: u32) -> Config {
    let mut c = config();
    c.callers[2].rate_limit = Some(RateLimit { count, per, burst });
    c
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_caller_is_told_when_to_come_back() {
    let c = Callers::new(
        &limited(2, Duration::from_secs(1), 2),
        Clock::system(),
        None,
    );
    let ops = || c.admit(&bearer(OPS_TOKEN), None);
    ops().unwrap();
    ops().unwrap();
    match ops() {
        Err(BrokerError::CallerRateLimited { caller, retry_in }) => {
            assert_eq!(caller, "ops");
            assert_eq!(retry_in, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    // Other callers have their own (here: no) limit.
    for _ in 0..10 {
        c.admit(&bearer(WEB_TOKEN), None).unwrap();
    }
    tokio::time::advance(Duration::from_millis(500)).await;
    ops().unwrap();
    assert!(ops().is_err());
    // An unauthenticated call costs the caller nothing: identification first.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(c.admit(&bearer("wrong"), None).is_err());
    ops().unwrap();
    ops().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_the_bucket_of_an_unchanged_caller_only() {
    let config = limited(1, Duration::from_secs(10), 1);
    let first = Callers::new(&config, Clock::system(), None);
    first.admit(&bearer(OPS_TOKEN), None).unwrap();
    assert!(first.admit(&bearer(OPS_TOKEN), None).is_err());

    let same = Callers::new(&config, Clock::system(), Some(&first));
    assert!(
        same.admit(&bearer(OPS_TOKEN), None).is_err(),
        "a reload does not refill the bucket"
    );
    let faster = limited(10, Duration::from_secs(10), 1);
    let changed = Callers::new(&faster, Clock::system(), Some(&same));
    changed.admit(&bearer(OPS_TOKEN), None).unwrap();
    // A renamed caller starts afresh too.
    let mut renamed = config.clone();
    renamed.callers[2].name = "ops2".into();
    let renamed = Callers::new(&renamed, Clock::system(), Some(&first));
    renamed.admit(&bearer(OPS_TOKEN), None).unwrap();
}

#[test]
fn each_caller_has_its_own_session_quota_kept_across_reloads() {
    let mut config = config();
    config.payroc.max_concurrent_sessions_per_caller = 2;
    let c = callers(&config);
    let ops = c.identify(&bearer(OPS_TOKEN), None).unwrap();
    let web = c.identify(&bearer(WEB_TOKEN), None).unwrap();
    let held = [ops.session_slot().unwrap(), ops.session_slot().unwrap()];
    match ops.session_slot() {
        Err(BrokerError::CallerSessionsLimited { caller, limit }) => {
            assert_eq!((caller.as_str(), limit), ("ops", 2));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        web.session_slot().unwrap().is_some(),
        "another caller is served"
    );

    let reloaded = Callers::new(&config, Clock::system(), Some(&c));
    let ops_again = reloaded.identify(&bearer(OPS_TOKEN), None).unwrap();
    assert!(ops_again.session_slot().is_err(), "still two in flight");
    drop(held);
    assert!(ops_again.session_slot().unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_keeps_failing_is_refused_without_a_look_at_its_token() {
    let policy = FailurePolicy {
        max_failures: 3,
        window: Duration::from_secs(60),
        cool_down: Duration::from_secs(30),
        max_peers: 16,
    };
    let mut config = xfcc_config("127.0.0.0/8");
    config.server.trusted_proxies.clear();
    let c = Callers::with_policy(&config, Clock::system(), None, policy);
    let attacker = peer("192.0.2.66:1234");
    // Missing tokens are not guesses and do not count.
    for _ in 0..10 {
        unauthenticated(c.identify(&md(&[]), Some(&attacker)));
    }
    for _ in 0..3 {
        unauthenticated(c.identify(&bearer("guess"), Some(&attacker)));
    }
    // Now even the right token is refused, from any port of that address.
    let other_port = peer("192.0.2.66:9999");
    match c.identify(&bearer(OPS_TOKEN), Some(&other_port)) {
        Err(BrokerError::PeerThrottled { retry_in }) => {
            assert_eq!(retry_in, Duration::from_secs(30))
        }
        other => panic!("{other:?}"),
    }
    // Other peers are not affected, nor a certificate from the same address.
    assert_eq!(
        name(c.identify(&bearer(OPS_TOKEN), Some(&peer("192.0.2.67:1")))),
        "ops"
    );
    let cert = with_cert("192.0.2.66:1", &[WEB_SPIFFE], &[]);
    assert_eq!(name(c.identify(&md(&[]), Some(&cert))), "web");
    // The table survives a reload.
    let reloaded = Callers::with_policy(&config, Clock::system(), Some(&c), policy);
    assert!(matches!(
        reloaded.identify(&bearer(OPS_TOKEN), Some(&attacker)),
        Err(BrokerError::PeerThrottled { .. })
    ));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(
        name(reloaded.identify(&bearer(OPS_TOKEN), Some(&attacker))),
        "ops"
    );
}

#[test]
fn ext_authz_principals_are_looked_up_by_spiffe_id() {
    let c = callers(&config());
    let none = md(&[]);
    let from = |peer: &PeerInfo, principal: &'static str| {
        let evidence = Evidence {
            metadata: &none,
            peer: Some(peer),
            envoy_principal: Some(principal),
        };
        c.identify_with(Source::EXT_AUTHZ, &evidence)
    };
    let trusted = peer(LOCAL);
    assert_eq!(name(from(&trusted, WEB_SPIFFE)), "web");
    unauthenticated(from(&trusted, "spiffe://cluster.local/ns/x/sa/y"));
    // Not a dns_name lookup.
    unauthenticated(from(&trusted, BATCH_DNS));
    // Believed only from a trusted proxy.
    unauthenticated(from(&peer("10.1.2.3:5000"), WEB_SPIFFE));
    let mut open = config();
    open.callers.clear();
    let evidence = Evidence {
        metadata: &none,
        peer: Some(&trusted),
        envoy_principal: Some(WEB_SPIFFE),
    };
    assert_eq!(
        name(callers(&open).identify_with(Source::EXT_AUTHZ, &evidence)),
        "anonymous"
    );
}
