//! Unit tests of configuration parsing: each key good and bad, and the
//! property users see (every problem at once, each with its key path).

use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;
use crate::rpc::Rpc;

fn env(name: &str) -> Option<String> {
    match name {
        "KEY_ACME" => Some("acme-secret-key".into()),
        "KEY_OTHER" => Some("other-secret-key".into()),
        "EMPTY" => Some("  ".into()),
        "CALLER_TOKEN" => Some("caller-secret-of-22-chr".into()),
        "TOKEN_21" => Some("t".repeat(21)),
        "TOKEN_22" => Some("t".repeat(22)),
        "TOKEN_1" => Some("t".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("broker.toml"), Path::new("."), &env)
}

fn problems(text: &str) -> Vec<String> {
    let err = parse(text).expect_err("config should be rejected");
    assert_eq!(err.file, Path::new("broker.toml"));
    err.to_string().lines().map(str::to_owned).collect()
}

const GOOD: &str = r#"
    [server]
    listen = "127.0.0.1:6000"
    [payroc]
    environment = "production"
    refresh_before_expiry = "2m"
    [[credentials]]
    name = "acme"
    api_key_env = "KEY_ACME"
    terminals = ["1234001", "1234002"]
    [[credentials]]
    name = "other"
    api_key_env = "KEY_OTHER"
    terminals = ["9990001"]
    [[callers]]
    name = "checkout"
    token_env = "CALLER_TOKEN"
    terminals = ["1234001"]
    rpcs = ["CreateSession"]
    [[callers]]
    name = "ops"
    token_sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
    terminals = ["*"]
    rpcs = ["*"]
"#;

#[test]
fn a_good_file_resolves_secrets_and_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:6000".parse().unwrap());
    assert_eq!(c.payroc.environment, Environment::Production);
    assert_eq!(
        c.payroc.identity_url.as_str(),
        "https://identity.payroc.com/authorize"
    );
    assert_eq!(c.payroc.api_url.as_str(), "https://api.payroc.com/v1");
    assert_eq!(c.payroc.refresh_before_expiry, Duration::from_secs(120));
    assert_eq!(c.payroc.min_token_validity, Duration::from_secs(30));
    assert_eq!(c.payroc.lib_version, defaults::LIB_VERSION);
    assert_eq!(c.credentials[0].api_key.expose_secret(), "acme-secret-key");
    assert_eq!(
        c.callers[0].identity,
        CallerIdentity::TokenSha256(sha256(b"caller-secret-of-22-chr"))
    );
    assert_eq!(c.callers[0].terminals, Allow::Only(vec!["1234001".into()]));
    assert_eq!(c.callers[0].rpcs, Allow::Only(vec![Rpc::CreateSession]));
    assert_eq!(c.callers[1].rpcs, Allow::All);
}

#[test]
fn debug_output_never_shows_secrets() {
    let c = parse(GOOD).unwrap();
    let dump = format!("{c:?}");
    assert!(!dump.contains("acme-secret-key"), "{dump}");
    assert!(!dump.contains("other-secret-key"), "{dump}");
    assert!(dump.contains("acme"));
}

#[test]
fn unknown_keys_name_their_path() {
    let p = problems(&GOOD.replace(
        "api_key_env = \"KEY_OTHER\"",
        "api_key_env = \"KEY_OTHER\"\nnmae = 1",
    ));
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("broker.toml: credentials[1]"), "{p:?}");
    assert!(p[0].contains("unknown field `nmae`"), "{p:?}");
}

#[test]
fn a_missing_environment_variable_is_named() {
    let p = problems(&GOOD.replace("KEY_OTHER", "PAYROC_API_KEY_ACME"));
    assert_eq!(
        p,
        vec![
            "broker.toml: credentials[1].api_key_env: the environment variable \
             `PAYROC_API_KEY_ACME` is not set"
        ]
    );
}

#[test]
fn empty_and_ambiguous_secrets_are_rejected() {
    let p = problems(&GOOD.replace("\"KEY_OTHER\"", "\"EMPTY\""));
    assert!(p[0].contains("credentials[1].api_key_env: the environment variable `EMPTY` is empty"));
    let p = problems(&GOOD.replace(
        "api_key_env = \"KEY_OTHER\"",
        "api_key_env = \"KEY_OTHER\"\napi_key_file = \"/x\"",
    ));
    assert!(
        p[0].contains("set exactly one of api_key_env and api_key_file"),
        "{p:?}"
    );
}

#[test]
fn a_missing_key_file_is_named() {
    let p = problems(&GOOD.replace(
        "api_key_env = \"KEY_OTHER\"",
        "api_key_file = \"/nonexistent/acme\"",
    ));
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with(
            "broker.toml: credentials[1].api_key_file: `/nonexistent/acme` cannot be read: "
        ),
        "{p:?}"
    );
}

#[test]
fn key_files_are_read_relative_to_the_config_and_trimmed() {
    let dir = std::env::temp_dir().join(format!("payroc-broker-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("acme.key"), "file-secret\n").unwrap();
    let text = GOOD.replace("api_key_env = \"KEY_OTHER\"", "api_key_file = \"acme.key\"");
    let c = Config::parse(&text, &dir.join("broker.toml"), &dir, &env).unwrap();
    assert_eq!(c.credentials[1].api_key.expose_secret(), "file-secret");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_terminal_under_two_credentials_is_rejected() {
    let p = problems(&GOOD.replace("[\"9990001\"]", "[\"9990001\", \"1234002\"]"));
    assert_eq!(
        p,
        vec![
            "broker.toml: credentials[1].terminals[1]: terminal `1234002` is already \
             served by credential `acme`"
        ]
    );
}

#[test]
fn durations_must_parse() {
    let p = problems(&GOOD.replace("\"2m\"", "\"two minutes\""));
    assert_eq!(
        p,
        ["broker.toml: payroc.refresh_before_expiry: invalid value: a string, expected a duration"]
    );
    let c = parse(&GOOD.replace("\"2m\"", "\"1h 30m\"")).unwrap();
    assert_eq!(c.payroc.refresh_before_expiry, Duration::from_secs(5400));
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let p = problems(&GOOD.replace(
        "environment = \"production\"",
        "identity_url = \"http://identity.example.com/authorize\"",
    ));
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("broker.toml: payroc.identity_url: plain http to the non-loopback host `identity.example.com`"), "{p:?}");

    for host in ["127.0.0.1:9", "localhost:9", "[::1]:9"] {
        let ok = GOOD.replace(
            "environment = \"production\"",
            &format!("identity_url = \"http://{host}/authorize\"\napi_url = \"http://{host}/v1/\""),
        );
        let c = parse(&ok).unwrap();
        assert!(
            c.payroc.api_url.as_str().ends_with("/v1"),
            "{}",
            c.payroc.api_url
        );
    }
    let explicit = GOOD.replace(
        "environment = \"production\"",
        "identity_url = \"http://identity.example.com/authorize\"\nallow_insecure_http = true",
    );
    parse(&explicit).unwrap();
}

#[test]
fn api_url_must_end_in_v1() {
    let p = problems(&GOOD.replace(
        "environment = \"production\"",
        "api_url = \"https://api.example.com/v2\"",
    ));
    assert!(
        p[0].starts_with("broker.toml: payroc.api_url: the base URL must end in /v1"),
        "{p:?}"
    );
}

#[test]
fn callers_are_checked() {
    let p = problems(&GOOD.replace("rpcs = [\"CreateSession\"]", "rpcs = [\"Nope\"]"));
    assert_eq!(
        p,
        vec![
            "broker.toml: callers[0].rpcs[0]: `Nope` is not an RPC name (GetBearerToken, CreateSession, WatchBearerToken, ExtAuthz, Authorize)"
        ]
    );
    let p = problems(&GOOD.replace("terminals = [\"1234001\"]", "terminals = [\"5555555\"]"));
    assert_eq!(
        p,
        vec![
            "broker.toml: callers[0].terminals[0]: terminal `5555555` is not served by any credential"
        ]
    );
    let p = problems(&GOOD.replace("token_sha256 = \"0000", "token_sha256 = \"zz00"));
    assert!(
        p[0].starts_with("broker.toml: callers[1].token_sha256: must be exactly 64 hexadecimal"),
        "{p:?}"
    );
    let p = problems(&GOOD.replace("terminals = [\"*\"]", "terminals = [\"*\", \"1234001\"]"));
    assert_eq!(
        p,
        vec!["broker.toml: callers[1].terminals: \"*\" must stand alone"]
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = GOOD
        .replace(
            "\"2m\"",
            "\"2m\"\nrequest_timeout = \"0s\"\nlib_version = \"1.7\"",
        )
        .replace("KEY_OTHER", "UNSET")
        .replace("[\"9990001\"]", "[\"1234001\"]")
        .replace("rpcs = [\"CreateSession\"]", "rpcs = []");
    let p = problems(&text);
    assert_eq!(
        p,
        [
            "broker.toml: payroc.lib_version: `1.7` does not match Payroc's pattern, e.g. 1.7.0.261457",
            "broker.toml: payroc.request_timeout: must be longer than zero",
            "broker.toml: credentials[1].api_key_env: the environment variable `UNSET` is not set",
            "broker.toml: credentials[1].terminals[0]: terminal `1234001` is already served by \
             credential `acme`",
            "broker.toml: callers[0].rpcs: is empty, so it allows nothing; use [\"*\"] for everything",
        ]
    );
}

/// Documented limit: serde stops at the first value it cannot read at all
/// (wrong type or form), so such a value is reported alone; the rules are
/// checked once the file reads.
#[test]
fn a_malformed_value_is_reported_alone_with_its_key() {
    let text = GOOD
        .replace("\"2m\"", "\"soon\"")
        .replace("KEY_OTHER", "UNSET")
        .replace("\"127.0.0.1:6000\"", "\"nowhere\"");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0] == "broker.toml: server.listen: invalid socket address syntax"
            || p[0]
                == "broker.toml: payroc.refresh_before_expiry: invalid value: a string, \
                    expected a duration",
        "{p:?}"
    );
}

#[test]
fn type_errors_never_quote_the_string_they_refused() {
    let p = problems(&GOOD.replace(
        "terminals = [\"9990001\"]",
        "terminals = \"sk_live_pasted\\\"secret\"",
    ));
    assert_eq!(
        p,
        ["broker.toml: credentials[1].terminals: invalid type: a string, expected a sequence"]
    );
    assert_eq!(without_string_values("x string \"a\\\"b"), "x a string");
    assert_eq!(
        without_string_values("string \"a\", then string \"b\\\\\" end"),
        "a string, then a string end"
    );
}

#[test]
fn syntax_errors_name_the_file() {
    let p = problems("[server\nlisten = 1");
    assert!(p[0].starts_with("broker.toml: line 1, column "), "{p:?}");
    let p = problems("[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"");
    assert!(
        p[0] == "broker.toml: line 3, column 1 (in [server], at key `listen`): duplicate key",
        "{p:?}"
    );
    let p = problems("[server]\nlisten = 5");
    assert!(
        p[0].starts_with("broker.toml: server.listen: invalid type"),
        "{p:?}"
    );
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "payroc-broker-cfg-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &self.0.join("broker.toml"), &self.0, &env)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GOOD with `extra` added to its `[server]` table.
fn with_server(extra: &str) -> String {
    GOOD.replace(
        "listen = \"127.0.0.1:6000\"",
        &format!("listen = \"127.0.0.1:6000\"\n{extra}"),
    )
}

/// GOOD with `extra` added to its first caller.
fn with_caller(extra: &str) -> String {
    GOOD.replace(
        "rpcs = [\"CreateSession\"]",
        &format!("rpcs = [\"CreateSession\"]\n{extra}"),
    )
}

#[test]
fn part_two_keys_have_their_defaults() {
    let c = parse(GOOD).unwrap();
    let s = &c.server;
    assert_eq!(s.tls, None);
    assert_eq!(s.forwarded_identity, ForwardedIdentity::None);
    assert_eq!(
        s.trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["127.0.0.0/8", "::1/128"]
    );
    assert_eq!(s.log_format, LogFormat::Text);
    assert_eq!(s.metrics_listen, None);
    assert_eq!(s.handshake_timeout, Duration::from_secs(5));
    assert_eq!(s.idle_timeout, Duration::from_secs(300));
    assert_eq!(s.max_connection_age, Duration::from_secs(3600));
    assert_eq!(s.max_connections_per_peer, 64);
    assert_eq!(s.request_timeout, Duration::from_secs(30));
    assert_eq!(s.max_in_flight_requests, 4096);
    assert_eq!(c.payroc.max_concurrent_sessions_per_caller, 16);
    assert_eq!(c.ext_authz, ExtAuthzConfig { enabled: false });
    assert_eq!(c.callers[0].rate_limit, None);
}

#[test]
fn server_keys_of_part_two_are_read() {
    let c = parse(&with_server(
        r#"forwarded_identity = "xfcc"
        trusted_proxies = ["10.0.0.0/8", "fd00::/8", "192.168.1.7"]
        log_format = "json"
        metrics_listen = "127.0.0.1:9464"
        handshake_timeout = "2s"
        idle_timeout = "1m"
        max_connection_age = "30m"
        max_connections_per_peer = 8
        request_timeout = "15s"
        max_in_flight_requests = 100"#,
    ))
    .unwrap();
    let s = &c.server;
    assert_eq!(s.forwarded_identity, ForwardedIdentity::Xfcc);
    assert_eq!(
        s.trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
    );
    assert!(s.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
    assert!(!s.trusted_proxies[0].contains("11.1.2.3".parse().unwrap()));
    assert_eq!(s.log_format, LogFormat::Json);
    assert_eq!(s.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(s.handshake_timeout, Duration::from_secs(2));
    assert_eq!(s.idle_timeout, Duration::from_secs(60));
    assert_eq!(s.max_connection_age, Duration::from_secs(1800));
    assert_eq!(s.max_connections_per_peer, 8);
    assert_eq!(s.request_timeout, Duration::from_secs(15));
    assert_eq!(s.max_in_flight_requests, 100);

    let c = parse(&with_server(
        "forwarded_identity = \"l5d-client-id\"\ntrusted_proxies = []",
    ))
    .unwrap();
    assert_eq!(c.server.forwarded_identity, ForwardedIdentity::L5dClientId);
    assert!(c.server.trusted_proxies.is_empty());
    let c = parse(&with_server(
        "forwarded_identity = \"none\"\nlog_format = \"text\"",
    ))
    .unwrap();
    assert_eq!(c.server.forwarded_identity, ForwardedIdentity::None);
    assert_eq!(c.server.log_format, LogFormat::Text);
}

/// Port 0 means a fresh port for each listener: gRPC and metrics on
/// `127.0.0.1:0` do not clash (what `sandbox --metrics-listen` relies on).
#[test]
fn metrics_and_grpc_may_both_ask_for_any_free_port() {
    let text = GOOD.replace(
        "listen = \"127.0.0.1:6000\"",
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"",
    );
    let c = parse(&text).unwrap();
    assert_eq!(
        c.server.metrics_listen,
        Some("127.0.0.1:0".parse().unwrap())
    );
}

#[test]
fn bad_server_rules_of_part_two_are_all_reported() {
    let p = problems(&with_server(
        r#"metrics_listen = "127.0.0.1:6000"
        handshake_timeout = "0s"
        idle_timeout = "0s"
        max_connection_age = "0s"
        max_connections_per_peer = 0
        request_timeout = "0s"
        max_in_flight_requests = 0"#,
    ));
    assert_eq!(
        p,
        [
            "broker.toml: server.metrics_listen: `127.0.0.1:6000` is the gRPC address \
             (server.listen); use another port",
            "broker.toml: server.handshake_timeout: must be longer than zero",
            "broker.toml: server.idle_timeout: must be longer than zero",
            "broker.toml: server.max_connection_age: must be longer than zero",
            "broker.toml: server.request_timeout: must be longer than zero",
            "broker.toml: server.max_connections_per_peer: must be at least 1",
            "broker.toml: server.max_in_flight_requests: must be at least 1",
        ],
    );
}

#[test]
fn malformed_server_values_of_part_two_name_their_key() {
    for (line, key, reason) in [
        (
            "forwarded_identity = \"envoy\"",
            "server.forwarded_identity",
            "unknown variant `envoy`, expected one of `none`, `xfcc`, `l5d-client-id`",
        ),
        (
            "log_format = \"xml\"",
            "server.log_format",
            "unknown variant `xml`, expected `text` or `json`",
        ),
        (
            "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
            "server.trusted_proxies[1]",
            "`10.0.0.1/8` has host bits set; the network is 10.0.0.0/8",
        ),
        (
            "trusted_proxies = [\"10.0.0.0/33\"]",
            "server.trusted_proxies[0]",
            "`10.0.0.0/33` is not a network like 10.0.0.0/8 or ::1/128 (the prefix length is at most 32)",
        ),
        (
            "trusted_proxies = [\"example.com\"]",
            "server.trusted_proxies[0]",
            "`example.com` is not a network like 10.0.0.0/8 or ::1/128 (not an IP address)",
        ),
        (
            "trusted_proxies = [\"::1/+8\"]",
            "server.trusted_proxies[0]",
            "`::1/+8` is not a network like 10.0.0.0/8 or ::1/128 (bad prefix length)",
        ),
        (
            "metrics_listen = \"nowhere\"",
            "server.metrics_listen",
            "invalid socket address syntax",
        ),
        (
            "idle_timeout = \"forever\"",
            "server.idle_timeout",
            "invalid value: a string, expected a duration",
        ),
        (
            "max_in_flight_requests = -1",
            "server.max_in_flight_requests",
            "invalid value: integer `-1`, expected usize",
        ),
    ] {
        assert_eq!(
            problems(&with_server(line)),
            [format!("broker.toml: {key}: {reason}")],
            "{line}"
        );
    }
}

#[test]
fn payroc_per_caller_session_share_is_read() {
    let text = GOOD.replace(
        "refresh_before_expiry = \"2m\"",
        "refresh_before_expiry = \"2m\"\nmax_concurrent_sessions_per_caller = 3",
    );
    assert_eq!(
        parse(&text)
            .unwrap()
            .payroc
            .max_concurrent_sessions_per_caller,
        3
    );
    let p = problems(&text.replace("= 3", "= 0"));
    assert_eq!(
        p,
        ["broker.toml: payroc.max_concurrent_sessions_per_caller: must be at least 1"]
    );
}

#[test]
fn ext_authz_is_read() {
    let c = parse(&format!("{GOOD}\n[ext_authz]\nenabled = true")).unwrap();
    assert!(c.ext_authz.enabled);
    let c = parse(&format!("{GOOD}\n[ext_authz]")).unwrap();
    assert!(!c.ext_authz.enabled);
    let p = problems(&format!("{GOOD}\n[ext_authz]\nenable = true"));
    assert!(p[0].starts_with("broker.toml: ext_authz"), "{p:?}");
    assert!(p[0].contains("unknown field `enable`"), "{p:?}");
}

#[test]
fn tls_paths_resolve_against_the_config_directory() {
    let dir = Scratch::new("tls");
    dir.write("tls/tls.crt", b"-----BEGIN CERTIFICATE-----\n");
    dir.write("tls/tls.key", b"-----BEGIN PRIVATE KEY-----\n");
    let ca = dir.write("ca.crt", b"-----BEGIN CERTIFICATE-----\n");
    let text = format!(
        "{GOOD}\n[server.tls]\ncert_file = \"tls/tls.crt\"\nkey_file = \"tls/tls.key\"\n\
         client_ca_file = \"{}\"\nrequire_client_cert = true",
        ca.display()
    );
    let tls = dir.parse(&text).unwrap().server.tls.unwrap();
    assert_eq!(tls.cert_file, dir.0.join("tls/tls.crt"));
    assert_eq!(tls.key_file, dir.0.join("tls/tls.key"));
    assert!(tls.cert_file.is_absolute());
    assert_eq!(tls.client_ca_file, Some(ca));
    assert!(tls.require_client_cert);

    let plain =
        format!("{GOOD}\n[server.tls]\ncert_file = \"tls/tls.crt\"\nkey_file = \"tls/tls.key\"");
    let tls = dir.parse(&plain).unwrap().server.tls.unwrap();
    assert_eq!(tls.client_ca_file, None);
    assert!(!tls.require_client_cert);
}

#[test]
fn tls_files_must_be_readable_regular_files_of_sane_size() {
    let dir = Scratch::new("tlsbad");
    dir.write("tls.crt", b"x");
    dir.write("big.key", &vec![b'k'; 16 * 1024 + 1]);
    std::fs::create_dir_all(dir.0.join("adir")).unwrap();
    let text = format!(
        "{GOOD}\n[server.tls]\ncert_file = \"missing.crt\"\nkey_file = \"big.key\"\n\
         client_ca_file = \"adir\""
    );
    let err = dir.parse(&text).unwrap_err().to_string();
    let p: Vec<&str> = err.lines().collect();
    assert_eq!(p.len(), 3, "{p:#?}");
    assert!(p[0].contains(": server.tls.cert_file: `"), "{p:?}");
    assert!(p[0].contains("missing.crt` cannot be read: "), "{p:?}");
    assert!(p[1].contains(": server.tls.key_file: `"), "{p:?}");
    assert!(p[1].contains("more than the 16384 allowed"), "{p:?}");
    assert!(p[2].contains(": server.tls.client_ca_file: `"), "{p:?}");
    assert!(
        p[2].ends_with("adir` is not a regular file (FIFOs, devices and directories are refused)"),
        "{p:?}"
    );

    // A device is refused from its metadata, without reading it.
    let text = format!(
        "{GOOD}\n[server.tls]\ncert_file = \"tls.crt\"\nkey_file = \"/dev/zero\"\n\
         require_client_cert = true"
    );
    let err = dir.parse(&text).unwrap_err().to_string();
    let p: Vec<&str> = err.lines().collect();
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(
        p[0].ends_with(
            "server.tls.key_file: `/dev/zero` is not a regular file (FIFOs, devices and \
             directories are refused)"
        ),
        "{p:?}"
    );
    assert!(
        p[1].ends_with("server.tls.require_client_cert: needs server.tls.client_ca_file to verify client certificates against"),
        "{p:?}"
    );
}

#[test]
fn callers_may_be_identified_by_spiffe_id_or_dns_name() {
    let text = GOOD
        .replace(
            "token_env = \"CALLER_TOKEN\"",
            "spiffe_id = \"spiffe://cluster.local/ns/shop/sa/checkout-web\"",
        )
        .replace(
            "token_sha256 = \"0000000000000000000000000000000000000000000000000000000000000001\"",
            "dns_name = \"ops.tools.svc\"",
        );
    let c = parse(&text).unwrap();
    assert_eq!(
        c.callers[0].identity,
        CallerIdentity::SpiffeId("spiffe://cluster.local/ns/shop/sa/checkout-web".into())
    );
    assert_eq!(
        c.callers[1].identity,
        CallerIdentity::DnsName("ops.tools.svc".into())
    );
    // Debug shows workload identities (not secret) but never a token digest.
    let dump = format!("{:?}", c.callers);
    assert!(dump.contains("spiffe://cluster.local"), "{dump}");
    parse(&GOOD.replace(
        "token_env = \"CALLER_TOKEN\"",
        "spiffe_id = \"spiffe://example.org\"",
    ))
    .unwrap();
}

#[test]
fn caller_identities_are_exactly_one_and_well_formed() {
    let p = problems(&with_caller("dns_name = \"checkout.shop.svc\""));
    assert_eq!(
        p,
        [
            "broker.toml: callers[0]: set exactly one of token_env, token_sha256, spiffe_id and dns_name"
        ]
    );
    let p = problems(&GOOD.replace("token_env = \"CALLER_TOKEN\"", ""));
    assert_eq!(
        p,
        [
            "broker.toml: callers[0]: set exactly one of token_env, token_sha256, spiffe_id and dns_name"
        ]
    );
    for bad in [
        "https://cluster.local/ns/shop",
        "spiffe://",
        "spiffe://Cluster.Local/ns",
        "spiffe://cluster.local/ns//sa",
        "spiffe://cluster.local/ns/shop/",
        "spiffe://cluster.local/ns/../sa",
        "spiffe://cluster.local/ns/shop?x=1",
        "SPIFFE://cluster.local/ns",
    ] {
        let p = problems(&GOOD.replace(
            "token_env = \"CALLER_TOKEN\"",
            &format!("spiffe_id = \"{bad}\""),
        ));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert!(
            p[0].starts_with(&format!(
                "broker.toml: callers[0].spiffe_id: `{bad}` is not a SPIFFE ID"
            )),
            "{p:?}"
        );
    }
    let long_label = "a".repeat(64);
    let long_name = ["abcdefghi"; 26].join(".");
    for bad in [
        "",
        "-web.shop.svc",
        "web-.shop.svc",
        "*.shop.svc",
        "web..svc",
        "web.shop.svc.",
        "web_1.shop.svc",
        "web shop",
        long_label.as_str(),
        long_name.as_str(),
    ] {
        let p = problems(&GOOD.replace(
            "token_env = \"CALLER_TOKEN\"",
            &format!("dns_name = \"{bad}\""),
        ));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert!(
            p[0].starts_with(&format!(
                "broker.toml: callers[0].dns_name: `{bad}` is not a DNS name"
            )),
            "{p:?}"
        );
    }
    for good in ["web", "Web-1.shop.svc.cluster.local", &"a".repeat(63)] {
        parse(&GOOD.replace(
            "token_env = \"CALLER_TOKEN\"",
            &format!("dns_name = \"{good}\""),
        ))
        .unwrap();
    }
}

#[test]
fn a_workload_identity_belongs_to_one_caller() {
    let text = GOOD
        .replace(
            "token_env = \"CALLER_TOKEN\"",
            "dns_name = \"web.shop.svc\"",
        )
        .replace(
            "token_sha256 = \"0000000000000000000000000000000000000000000000000000000000000001\"",
            "dns_name = \"web.shop.svc\"",
        );
    assert_eq!(
        problems(&text),
        [
            "broker.toml: callers[1].dns_name: `web.shop.svc` is already the identity of caller `checkout`"
        ]
    );
    // The same string as a SPIFFE ID and a DNS name are different identities.
    parse(
        &GOOD
            .replace("token_env = \"CALLER_TOKEN\"", "spiffe_id = \"spiffe://a\"")
            .replace(
                "token_sha256 = \"0000000000000000000000000000000000000000000000000000000000000001\"",
                "spiffe_id = \"spiffe://b\"",
            ),
    )
    .unwrap();
}

#[test]
fn rate_limits_and_bursts() {
    let rl = |extra: &str| parse(&with_caller(extra)).unwrap().callers[0].rate_limit;
    assert_eq!(
        rl("rate_limit = \"50/s\""),
        Some(RateLimit {
            count: 50,
            per: Duration::from_secs(1),
            burst: 50
        })
    );
    assert_eq!(
        rl("rate_limit = \"50/s\"\nburst = 100"),
        Some(RateLimit {
            count: 50,
            per: Duration::from_secs(1),
            burst: 100
        })
    );
    assert_eq!(
        rl("rate_limit = \"600/m\""),
        Some(RateLimit {
            count: 600,
            per: Duration::from_secs(60),
            burst: 10
        })
    );
    // Under one per second: the burst is still at least 1.
    assert_eq!(
        rl("rate_limit = \"30/m\""),
        Some(RateLimit {
            count: 30,
            per: Duration::from_secs(60),
            burst: 1
        })
    );
    for bad in [
        "50",
        "0/s",
        "+5/s",
        "-5/s",
        "5/h",
        "5 /s",
        "/s",
        "5/",
        "99999999999/s",
        "1.5/s",
    ] {
        let p = problems(&with_caller(&format!("rate_limit = \"{bad}\"")));
        assert_eq!(
            p,
            [format!(
                "broker.toml: callers[0].rate_limit: `{bad}` is not a rate like \"50/s\" or \"600/m\" (a count of at least 1)"
            )],
        );
    }
    assert_eq!(
        problems(&with_caller("rate_limit = \"5/s\"\nburst = 0")),
        ["broker.toml: callers[0].burst: must be at least 1"]
    );
    assert_eq!(
        problems(&with_caller("burst = 5")),
        ["broker.toml: callers[0].burst: needs rate_limit"]
    );
    let p = problems(&with_caller("burst = -1"));
    assert!(p[0].starts_with("broker.toml: callers[0].burst: "), "{p:?}");
}

#[test]
fn every_rpc_name_is_accepted() {
    let c = parse(&GOOD.replace(
        "rpcs = [\"CreateSession\"]",
        "rpcs = [\"GetBearerToken\", \"CreateSession\", \"WatchBearerToken\", \"ExtAuthz\", \"Authorize\"]",
    ))
    .unwrap();
    assert_eq!(c.callers[0].rpcs, Allow::Only(Rpc::ALL.to_vec()));
}

#[test]
fn configured_terminal_ids_use_a_safe_alphabet() {
    for bad in [
        "1234\\r\\n002",
        "12/34",
        "1234?x",
        "12 34",
        "1234#",
        "123\\u0000",
    ] {
        let p = problems(&GOOD.replace("\"1234002\"", &format!("\"{bad}\"")));
        assert_eq!(
            p,
            [
                "broker.toml: credentials[0].terminals[1]: the terminal id must be 4 to 50 of \
              A-Z a-z 0-9 _ -"
            ],
            "{bad}"
        );
    }
    let c = parse(&GOOD.replace("\"1234002\"", "\"Term_02-b\"")).unwrap();
    assert_eq!(c.credentials[0].terminals[1], "Term_02-b");
}

#[test]
fn caller_tokens_carry_at_least_128_bits() {
    for short in ["TOKEN_1", "TOKEN_21"] {
        let p = problems(&GOOD.replace("\"CALLER_TOKEN\"", &format!("\"{short}\"")));
        assert_eq!(
            p,
            [format!(
                "broker.toml: callers[0].token_env: the caller token in `{short}` is shorter \
                 than 22 characters; use at least 128 random bits, e.g. `openssl rand -base64 24`"
            )]
        );
    }
    let c = parse(&GOOD.replace("\"CALLER_TOKEN\"", "\"TOKEN_22\"")).unwrap();
    assert_eq!(
        c.callers[0].identity,
        CallerIdentity::TokenSha256(sha256("t".repeat(22).as_bytes()))
    );
}

#[test]
fn token_sha256_is_exactly_64_hex_digits() {
    let good = "00000000000000000000000000000000000000000000000000000000000000AF";
    let hex_in_good = format!("{}1", "0".repeat(63));
    let c = parse(&GOOD.replace(&hex_in_good, good)).unwrap();
    let mut want = [0u8; 32];
    want[31] = 0xaf;
    assert_eq!(c.callers[1].identity, CallerIdentity::TokenSha256(want));
    for bad in [
        format!("+{}", &good[1..]),
        format!("+{good}"),
        format!(" {good}"),
        format!("{good} "),
        format!("{good}\\n"),
        good[1..].to_owned(),
        format!("{good}0"),
        format!("0x{}", &good[2..]),
        format!("{}g", &good[1..]),
        format!("{}-1", &good[2..]),
    ] {
        let p = problems(&GOOD.replace(&hex_in_good, &bad));
        assert_eq!(
            p,
            [
                "broker.toml: callers[1].token_sha256: must be exactly 64 hexadecimal digits \
              (the SHA-256 of the token), with no sign, space or prefix"
            ],
            "{bad:?}"
        );
    }
}

#[test]
fn a_secret_typed_where_a_variable_name_belongs_is_not_echoed() {
    for typed in ["sk_live_51Habc", "abc-def", "9KEY", "KEY NAME", "key", ""] {
        let text = GOOD.replace("\"KEY_OTHER\"", &format!("\"{typed}\""));
        let err = parse(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "broker.toml: credentials[1].api_key_env: the value is not a valid environment \
             variable name (A-Z, 0-9 and _, not starting with a digit); was the secret typed \
             where its name belongs?",
            "{typed:?}"
        );
        let text = GOOD.replace("\"CALLER_TOKEN\"", &format!("\"{typed}\""));
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("broker.toml: callers[0].token_env: the value is not a valid"),
            "{err}"
        );
        if !typed.is_empty() {
            assert!(!err.contains(typed), "{err}");
        }
    }
    // A proper name is still named, so the operator knows what to set.
    assert_eq!(
        problems(&GOOD.replace("\"KEY_OTHER\"", "\"_UNSET_9\"")),
        ["broker.toml: credentials[1].api_key_env: the environment variable `_UNSET_9` is not set"]
    );
}

#[test]
fn api_key_files_may_be_symbolic_links_but_not_devices() {
    let dir = Scratch::new("keylink");
    dir.write("..2024/acme", b"linked-secret\n");
    std::os::unix::fs::symlink("..2024", dir.0.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/acme", dir.0.join("acme")).unwrap();
    let text = GOOD.replace("api_key_env = \"KEY_OTHER\"", "api_key_file = \"acme\"");
    let c = dir.parse(&text).unwrap();
    assert_eq!(c.credentials[1].api_key.expose_secret(), "linked-secret");

    let text = GOOD.replace(
        "api_key_env = \"KEY_OTHER\"",
        "api_key_file = \"/dev/zero\"",
    );
    let p = problems(&text);
    assert_eq!(
        p,
        [
            "broker.toml: credentials[1].api_key_file: `/dev/zero` is not a regular file (FIFOs, \
          devices and directories are refused)"
        ]
    );
    dir.write("big", &vec![b'k'; 16 * 1024 + 1]);
    let text = GOOD.replace("api_key_env = \"KEY_OTHER\"", "api_key_file = \"big\"");
    let err = dir.parse(&text).unwrap_err().to_string();
    assert!(
        err.ends_with("big` is 16385 bytes, more than the 16384 allowed"),
        "{err}"
    );
}

#[test]
fn an_api_key_must_be_a_valid_header_value() {
    let dir = Scratch::new("keyline");
    dir.write("two-lines", b"first-half\nsecond-half\n");
    dir.write("nul", b"key\0key");
    dir.write("ok", b"  sk_live-OK.key/=+  \r\n");
    let with_file = |f: &str| {
        GOOD.replace(
            "api_key_env = \"KEY_OTHER\"",
            &format!("api_key_file = \"{f}\""),
        )
    };
    for f in ["two-lines", "nul"] {
        let err = dir.parse(&with_file(f)).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "credentials[1].api_key_file: the API key is not a valid HTTP header value: it \
                 holds a control character (such as a line break inside it) or a non-ASCII \
                 character"
            ),
            "{err}"
        );
        assert!(!err.contains("half"), "{err}");
    }
    let c = dir.parse(&with_file("ok")).unwrap();
    assert_eq!(
        c.credentials[1].api_key.expose_secret(),
        "sk_live-OK.key/=+"
    );

    let env = |name: &str| {
        (name == "KEY_ACME" || name == "KEY_OTHER" || name == "CALLER_TOKEN").then(|| match name {
            "KEY_OTHER" => "line\r\nbreak".to_owned(),
            _ => "x".repeat(30),
        })
    };
    let err = Config::parse(GOOD, Path::new("b.toml"), Path::new("."), &env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "b.toml: credentials[1].api_key_env: the API key is not a valid HTTP header value: it \
         holds a control character (such as a line break inside it) or a non-ASCII character"
    );
}

#[test]
fn syntax_errors_give_place_and_key_but_never_the_text() {
    const SECRET: &str = "sk_live_Secret123";
    for (text, want_start) in [
        (
            format!(
                "[server]\nlisten = \"127.0.0.1:1\"\n[[credentials]]\nname = \"a\"\napi_key_env = {SECRET}\n"
            ),
            "broker.toml: line 5, column 15 (in [[credentials]], at key `api_key_env`): ",
        ),
        (
            format!("[[credentials]]\napi_key_env = \"{SECRET}\nterminals = []\n"),
            "broker.toml: line 2, column ",
        ),
        (
            format!("[payroc]\n{SECRET}\n"),
            "broker.toml: line 2, column ",
        ),
        (
            format!("[[callers]]\ntoken_env = '{SECRET}\n"),
            "broker.toml: line 2, column ",
        ),
        (
            format!("[[callers]]\ntoken_env = \"A\"\ntoken_env = \"{SECRET}\"\n"),
            "broker.toml: line 3, column 1 (in [[callers]], at key `token_env`): ",
        ),
        (format!("{SECRET} = 1\n"), "broker.toml: "),
    ] {
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with(want_start), "{text:?}\n{p:?}");
        if !text.starts_with(SECRET) {
            assert!(!p[0].contains(SECRET), "{p:?}");
            assert!(!p[0].contains("Secret"), "{p:?}");
        }
    }
}

#[test]
fn a_caller_with_bearer_tokens_for_part_of_a_credential_is_warned_about() {
    let with = |terminals: &str, rpcs: &str| {
        parse(
            &GOOD
                .replace(
                    "terminals = [\"1234001\"]",
                    &format!("terminals = {terminals}"),
                )
                .replace("rpcs = [\"CreateSession\"]", &format!("rpcs = {rpcs}")),
        )
        .unwrap()
        .warnings()
    };
    let w = with("[\"1234001\"]", "[\"GetBearerToken\", \"CreateSession\"]");
    assert_eq!(
        w,
        [
            "callers[0]: caller `checkout` may call GetBearerToken for 1 of the 2 terminals of \
          credential `acme`, but a Bearer token is valid for every terminal of its API key, so \
          it can act on all 2; give each trust boundary its own credential"
        ]
    );
    let w = with("[\"1234001\", \"9990001\"]", "[\"*\"]");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("may call GetBearerToken and WatchBearerToken for 1 of the 2 terminals of credential `acme`"),
        "{w:?}"
    );
    let w = with("[\"1234001\"]", "[\"WatchBearerToken\"]");
    assert!(w[0].contains("may call WatchBearerToken for 1 of"), "{w:?}");
    // Sessions only, every terminal of the credential, or all terminals: fine.
    assert!(with("[\"1234001\"]", "[\"CreateSession\", \"ExtAuthz\"]").is_empty());
    assert!(with("[\"1234001\", \"1234002\"]", "[\"GetBearerToken\"]").is_empty());
    assert!(with("[\"*\"]", "[\"GetBearerToken\"]").is_empty());
}

#[test]
fn the_identity_endpoint_is_off_unless_configured_and_needs_its_own_port() {
    assert_eq!(parse(GOOD).unwrap().identity_endpoint, None);
    let on = parse(&format!(
        "{GOOD}\n[identity_endpoint]\nlisten = \"127.0.0.1:8080\"\n"
    ))
    .unwrap();
    assert_eq!(
        on.identity_endpoint.map(|e| e.listen.to_string()),
        Some("127.0.0.1:8080".to_owned())
    );
    let p = problems(&format!("{GOOD}\n[identity_endpoint]\nlisten = \"nope\"\n"));
    assert!(
        p[0].starts_with("broker.toml: identity_endpoint.listen: "),
        "{p:?}"
    );
    let p = problems(&format!("{GOOD}\n[identity_endpoint]\nport = 8080\n"));
    assert!(p[0].contains("identity_endpoint"), "{p:?}");
    let p = problems(&format!(
        "{GOOD}\n[identity_endpoint]\nlisten = \"127.0.0.1:6000\"\n"
    ));
    assert!(
        p.iter().any(|p| p
            == "broker.toml: identity_endpoint.listen: `127.0.0.1:6000` is the gRPC address (server.listen); use another port"),
        "{p:?}"
    );
}

#[test]
fn the_identity_endpoint_warns_of_clear_text_and_of_partial_callers() {
    let text = |listen: &str| format!("{GOOD}\n[identity_endpoint]\nlisten = \"{listen}\"\n");
    let clear = parse(&text("0.0.0.0:8080")).unwrap().warnings();
    assert!(
        clear
            .iter()
            .any(|w| w
                .starts_with("identity_endpoint.listen: `0.0.0.0:8080` is not a loopback address")),
        "{clear:?}"
    );
    let local = parse(&text("127.0.0.1:8080")).unwrap().warnings();
    assert!(local.is_empty(), "{local:?}");
    // A caller allowed Authorize for part of a credential is named, once,
    // with each such credential.
    let partial = format!(
        "{}\n[identity_endpoint]\nlisten = \"127.0.0.1:8080\"\n",
        GOOD.replace(
            "rpcs = [\"CreateSession\"]",
            "rpcs = [\"CreateSession\", \"Authorize\"]"
        )
    );
    let w = parse(&partial).unwrap().warnings();
    assert_eq!(
        w,
        vec![
            "callers[0]: caller `checkout` may call Authorize but not for every terminal of \
             credential `acme`, `other`; the identity endpoint answers it 403 for that credential"
                .to_owned()
        ]
    );
    // Without the endpoint, Authorize is harmless.
    let off = partial.replace("[identity_endpoint]\nlisten = \"127.0.0.1:8080\"\n", "");
    assert!(parse(&off).unwrap().warnings().is_empty());
}

#[test]
fn telemetry_is_off_unless_an_endpoint_is_set_and_every_key_is_checked() {
    let off = parse(GOOD).unwrap().telemetry;
    assert_eq!(off.otlp_endpoint, None);
    assert_eq!(off.service_name, "payroc-broker");
    assert_eq!(off.sample_ratio, 1.0);
    let with = |lines: &str| format!("{GOOD}\n[telemetry]\n{lines}\n");
    let on = with("otlp_endpoint = \"http://otel-collector:4317\"\nsample_ratio = 0.25");
    if cfg!(feature = "otlp") {
        let t = parse(&on).unwrap().telemetry;
        assert_eq!(
            t.otlp_endpoint.as_deref(),
            Some("http://otel-collector:4317")
        );
        assert_eq!(t.sample_ratio, 0.25);
    } else {
        // A build without the exporter says so at parse time (check-config).
        let p = problems(&on);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with(
                "broker.toml: telemetry.otlp_endpoint: this build has no OTLP exporter"
            ),
            "{p:?}"
        );
    }
    // The feature's own problem aside, each bad value is named.
    let p = problems(&with(
        "otlp_endpoint = \"grpc://collector:4317\"\nservice_name = \" \"\nsample_ratio = 1.5",
    ));
    let p: Vec<&String> = p
        .iter()
        .filter(|p| !p.contains("no OTLP exporter"))
        .collect();
    assert_eq!(
        p,
        [
            "broker.toml: telemetry.otlp_endpoint: `grpc` is not an http:// or https:// URL (OTLP over gRPC)",
            "broker.toml: telemetry.service_name: must not be empty",
            "broker.toml: telemetry.sample_ratio: 1.5 is not between 0 and 1",
        ]
    );
    let p = problems(&with(
        "otlp_endpoint = \"http://user:hunter2@collector:4317\"",
    ));
    assert!(
        p.iter()
            .any(|p| p.ends_with("must not carry credentials (user:password@)")),
        "{p:?}"
    );
    assert!(!p.iter().any(|p| p.contains("hunter2")), "{p:?}");
    for endpoint in [
        "http://c:4318/v1/traces",
        "http://c:4317?x=1",
        "http://c:4317#f",
    ] {
        let p = problems(&with(&format!("otlp_endpoint = \"{endpoint}\"")));
        assert!(
            p.iter().any(|p| p.ends_with("must be scheme, host and port only (OTLP over gRPC has no path or query; /v1/traces is OTLP over HTTP, on another port)")),
            "{endpoint}: {p:?}"
        );
    }
    let p = problems(&with("otlp_endpoint = \"not a url\""));
    assert!(
        p.iter()
            .any(|p| p.starts_with("broker.toml: telemetry.otlp_endpoint: not a URL")),
        "{p:?}"
    );
    let p = problems(&with("endpoint = \"http://c:4317\""));
    assert!(p[0].contains("telemetry"), "{p:?}");
}
