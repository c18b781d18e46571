//! Configuration: parse the TOML file, validate every rule, resolve secrets.
//!
//! The output, [`Config`], is fully checked: URLs obey the https-only rule,
//! every terminal belongs to exactly one credential, API keys and caller tokens
//! have been read (into redacting secret types). Nothing downstream re-checks
//! or re-reads. Every problem is reported at once, each naming the file, the
//! key's path (`credentials[1].api_key_env`) and the reason.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::payroc;

/// The environment variable that names the configuration file when
/// `--config` is not given.
pub const CONFIG_ENV: &str = "PAYROC_BROKER_CONFIG";

/// Payroc's environments and their published URLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Environment {
    /// UAT.
    Test,
    Production,
}

impl Environment {
    fn urls(self) -> (&'static str, &'static str) {
        match self {
            Environment::Test => (
                "https://identity.uat.payroc.com/authorize",
                "https://api.uat.payroc.com/v1",
            ),
            Environment::Production => (
                "https://identity.payroc.com/authorize",
                "https://api.payroc.com/v1",
            ),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub payroc: PayrocConfig,
    pub credentials: Vec<CredentialConfig>,
    pub callers: Vec<CallerConfig>,
    pub ext_authz: ExtAuthzConfig,
}

/// `[ext_authz]`: Envoy's `envoy.service.auth.v3.Authorization/Check` on the gRPC port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtAuthzConfig {
    pub enabled: bool,
}

/// `[server.tls]`: the gRPC port speaks only TLS. Paths are absolute once parsed
/// (relative ones are resolved against the configuration file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// When set, client certificates are asked for and verified against it.
    pub client_ca_file: Option<PathBuf>,
    /// A handshake without a valid client certificate fails.
    pub require_client_cert: bool,
}

/// Whose forwarded identity header the broker believes (from `trusted_proxies` only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedIdentity {
    #[default]
    None,
    /// Envoy/Istio `x-forwarded-client-cert`: `URI=` of its last element.
    Xfcc,
    /// Linkerd `l5d-client-id`.
    L5dClientId,
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// An IP network in CIDR form (`10.0.0.0/8`, `::1/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies inside the network. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.1`) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// How long in-flight RPCs may run on after SIGTERM before the process exits anyway.
    pub shutdown_grace: Duration,
    /// Longest health stays NOT_SERVING at start-up waiting for first tokens.
    pub warm_start_timeout: Duration,
    /// Open client connections at most; more are closed at once.
    pub max_connections: usize,
    /// Concurrent RPCs per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// `[server.tls]`; `None`: plaintext h2c.
    pub tls: Option<TlsConfig>,
    pub forwarded_identity: ForwardedIdentity,
    /// Peers whose forwarded identity header is believed.
    pub trusted_proxies: Vec<IpNet>,
    pub log_format: LogFormat,
    /// Prometheus `/metrics` listener; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// The TLS handshake and the HTTP/2 preface must be done within this.
    pub handshake_timeout: Duration,
    /// A connection with no open stream for this long is closed.
    pub idle_timeout: Duration,
    /// Connections are closed gracefully (GOAWAY) after this long.
    pub max_connection_age: Duration,
    /// Open connections per remote IP address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// A whole request, body included, must arrive within this.
    pub request_timeout: Duration,
    /// RPCs in flight server-wide; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight_requests: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayrocConfig {
    pub environment: Environment,
    pub identity_url: Url,
    /// Base URL, ending in `/v1`.
    pub api_url: Url,
    pub lib_version: String,
    pub refresh_before_expiry: Duration,
    pub min_token_validity: Duration,
    pub request_timeout: Duration,
    /// Attempts per upstream request, the first included.
    pub max_attempts: u32,
    pub allow_insecure_http: bool,
    /// Session requests to Payroc in flight at once; more are shed.
    pub max_concurrent_sessions: usize,
    /// First identity fetches at start-up running at once.
    pub warm_start_concurrency: usize,
    /// First identity fetches are spread at random over this long.
    pub warm_start_spread: Duration,
    /// Wait after a failed identity fetch before the next; doubles with
    /// each consecutive failure up to `identity_max_backoff`.
    pub identity_backoff: Duration,
    pub identity_max_backoff: Duration,
    /// Session requests of one caller in flight at once: each caller's fair
    /// share of `max_concurrent_sessions`.
    pub max_concurrent_sessions_per_caller: usize,
}

/// One Payroc API key and the terminals it serves.
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub name: String,
    pub api_key: SecretString,
    pub terminals: Vec<String>,
}

/// The TokenBroker RPCs, as named in caller allow lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    GetBearerToken,
    CreateSession,
    WatchBearerToken,
    /// `envoy.service.auth.v3.Authorization/Check`.
    ExtAuthz,
}

impl Rpc {
    pub fn from_name(name: &str) -> Option<Rpc> {
        match name {
            "GetBearerToken" => Some(Rpc::GetBearerToken),
            "CreateSession" => Some(Rpc::CreateSession),
            "WatchBearerToken" => Some(Rpc::WatchBearerToken),
            "ExtAuthz" => Some(Rpc::ExtAuthz),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rpc::GetBearerToken => "GetBearerToken",
            Rpc::CreateSession => "CreateSession",
            Rpc::WatchBearerToken => "WatchBearerToken",
            Rpc::ExtAuthz => "ExtAuthz",
        }
    }
}

/// An allow list: everything (`["*"]`) or the listed items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow<T> {
    All,
    Only(Vec<T>),
}

impl<T: PartialEq> Allow<T> {
    pub fn permits(&self, item: &T) -> bool {
        match self {
            Allow::All => true,
            Allow::Only(items) => items.contains(item),
        }
    }
}

/// An internal service allowed to call the broker.
#[derive(Clone)]
pub struct CallerConfig {
    pub name: String,
    /// How the caller proves who it is.
    pub identity: CallerIdentity,
    pub terminals: Allow<String>,
    pub rpcs: Allow<Rpc>,
    /// Token bucket; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
}

/// How a caller is recognised: exactly one per caller.
#[derive(Clone, PartialEq, Eq)]
pub enum CallerIdentity {
    /// SHA-256 of the caller's bearer token; the token itself is never kept.
    TokenSha256([u8; 32]),
    /// URI SAN of a verified client certificate, or a trusted forwarded identity.
    SpiffeId(String),
    /// DNS SAN of a verified client certificate, or Linkerd's `l5d-client-id`.
    DnsName(String),
}

impl fmt::Debug for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerIdentity::TokenSha256(_) => f.write_str("TokenSha256(<redacted>)"),
            CallerIdentity::SpiffeId(id) => f.debug_tuple("SpiffeId").field(id).finish(),
            CallerIdentity::DnsName(n) => f.debug_tuple("DnsName").field(n).finish(),
        }
    }
}

/// `rate_limit = "50/s"` with `burst = 100`: a token bucket refilled with
/// `count` tokens every `per`, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl fmt::Debug for CallerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerConfig")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("terminals", &self.terminals)
            .field("rate_limit", &self.rate_limit)
            .field("rpcs", &self.rpcs)
            .finish_non_exhaustive()
    }
}

/// Every problem found in one configuration file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One configuration problem: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key's path, e.g. `credentials[1].api_key_env`; empty for the file as a whole.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}: {}", self.file.display(), p.reason)?;
            } else {
                write!(f, "{}: {}: {}", self.file.display(), p.key, p.reason)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where secrets come from: the process environment in production, a map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Config {
    /// Reads and validates `path`. Relative `api_key_file` paths are resolved
    /// against the configuration file's directory.
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                key: String::new(),
                reason: format!("cannot read the configuration file: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base, env)
    }

    /// Validates configuration text; `file` names it in errors.
    pub fn parse(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: EnvLookup<'_>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_owned(),
            problems,
        };
        let raw: RawConfig = {
            let de = toml::Deserializer::parse(text)
                .map_err(|e| fail(vec![toml_problem("", &e, text)]))?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." { String::new() } else { key };
                fail(vec![toml_problem(&key, e.inner(), text)])
            })?
        };
        let mut v = Validator {
            problems: Vec::new(),
            env,
            base_dir,
        };
        let config = v.config(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(v.problems))
        }
    }
}

/// A TOML error as one line: the message, and where it is when the key path
/// alone does not say (syntax errors, duplicate keys).
fn toml_problem(key: &str, e: &toml::de::Error, text: &str) -> Problem {
    let mut reason = e.message().trim_end().to_owned();
    if let Some(span) = e.span().filter(|_| key.is_empty()) {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let snippet: String = text[span.start.min(text.len())..span.end.min(text.len())]
            .chars()
            .take(60)
            .collect();
        reason = format!("line {line}, column {column}: {reason}");
        if !snippet.trim().is_empty() {
            reason.push_str(&format!(" (`{}`)", snippet.trim()));
        }
    }
    Problem {
        key: key.to_owned(),
        reason,
    }
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    payroc: RawPayroc,
    #[serde(default)]
    credentials: Vec<RawCredential>,
    #[serde(default)]
    callers: Vec<RawCaller>,
    #[serde(default)]
    ext_authz: RawExtAuthz,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExtAuthz {
    #[serde(default)]
    enabled: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
    warm_start_timeout: Option<String>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
    tls: Option<RawTls>,
    forwarded_identity: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    log_format: Option<String>,
    metrics_listen: Option<String>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connection_age: Option<String>,
    max_connections_per_peer: Option<usize>,
    request_timeout: Option<String>,
    max_in_flight_requests: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    require_client_cert: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPayroc {
    environment: Option<String>,
    identity_url: Option<String>,
    api_url: Option<String>,
    lib_version: Option<String>,
    refresh_before_expiry: Option<String>,
    min_token_validity: Option<String>,
    request_timeout: Option<String>,
    max_attempts: Option<u32>,
    #[serde(default)]
    allow_insecure_http: bool,
    max_concurrent_sessions: Option<usize>,
    warm_start_concurrency: Option<usize>,
    warm_start_spread: Option<String>,
    identity_backoff: Option<String>,
    identity_max_backoff: Option<String>,
    max_concurrent_sessions_per_caller: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: String,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    terminals: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    token_env: Option<String>,
    token_sha256: Option<String>,
    spiffe_id: Option<String>,
    dns_name: Option<String>,
    terminals: Vec<String>,
    rpcs: Vec<String>,
    rate_limit: Option<String>,
    burst: Option<u32>,
}

// ---- validation ----------------------------------------------------------

/// Defaults, documented in README's configuration reference.
pub mod defaults {
    use std::time::Duration;
    pub const LISTEN: &str = "127.0.0.1:50051";
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);
    pub const MAX_CONNECTIONS_PER_PEER: usize = 64;
    pub const SERVER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_IN_FLIGHT_REQUESTS: usize = 4096;
    pub const MAX_CONCURRENT_SESSIONS_PER_CALLER: usize = 16;
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    pub const LIB_VERSION: &str = "1.7.0.261457";
    pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
    pub const MIN_TOKEN_VALIDITY: Duration = Duration::from_secs(30);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_ATTEMPTS: u32 = 3;
    pub const WARM_START_TIMEOUT: Duration = Duration::from_secs(5);
    pub const MAX_CONNECTIONS: usize = 1024;
    pub const MAX_CONCURRENT_STREAMS: u32 = 256;
    pub const MAX_CONCURRENT_SESSIONS: usize = 64;
    pub const WARM_START_CONCURRENCY: usize = 4;
    pub const WARM_START_SPREAD: Duration = Duration::from_secs(2);
    pub const IDENTITY_BACKOFF: Duration = Duration::from_secs(1);
    pub const IDENTITY_MAX_BACKOFF: Duration = Duration::from_secs(30);

    /// Loopback only: a sidecar proxy in the same pod or on the same host.
    pub fn trusted_proxies() -> Vec<super::IpNet> {
        use std::net::{Ipv4Addr, Ipv6Addr};
        vec![
            super::IpNet {
                addr: Ipv4Addr::new(127, 0, 0, 0).into(),
                prefix: 8,
            },
            super::IpNet {
                addr: Ipv6Addr::LOCALHOST.into(),
                prefix: 128,
            },
        ]
    }
}

/// Certificate chains and CA bundles larger than this are refused (a full
/// public CA bundle is about 250 KiB).
const MAX_CERT_FILE_BYTES: u64 = 1024 * 1024;
/// Private keys and API keys larger than this are refused (an RSA-4096 PEM
/// key is about 3.3 KiB).
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

struct Validator<'a> {
    problems: Vec<Problem>,
    env: EnvLookup<'a>,
    base_dir: &'a Path,
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let payroc = self.payroc(raw.payroc);
        let credentials = self.credentials(raw.credentials);
        let known: HashSet<&str> = credentials
            .iter()
            .flat_map(|c| c.terminals.iter().map(String::as_str))
            .collect();
        let callers = self.callers(raw.callers, &known);
        Config {
            server,
            payroc,
            credentials,
            callers,
            ext_authz: ExtAuthzConfig {
                enabled: raw.ext_authz.enabled,
            },
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let listen = raw.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen = listen.parse().unwrap_or_else(|e| {
            self.problem(
                "server.listen",
                format!("`{listen}` is not an address like 127.0.0.1:50051 ({e})"),
            );
            SocketAddr::from(([127, 0, 0, 1], 50051))
        });
        let shutdown_grace = self.duration(
            "server.shutdown_grace",
            raw.shutdown_grace,
            defaults::SHUTDOWN_GRACE,
        );
        let warm_start_timeout = self.duration(
            "server.warm_start_timeout",
            raw.warm_start_timeout,
            defaults::WARM_START_TIMEOUT,
        );
        let max_connections = self.positive(
            "server.max_connections",
            raw.max_connections,
            defaults::MAX_CONNECTIONS,
        );
        let max_concurrent_streams = raw
            .max_concurrent_streams
            .unwrap_or(defaults::MAX_CONCURRENT_STREAMS);
        if max_concurrent_streams == 0 {
            self.problem("server.max_concurrent_streams", "must be at least 1");
        }
        let tls = raw.tls.map(|t| self.tls(t));
        let forwarded_identity = match raw.forwarded_identity.as_deref() {
            None | Some("none") => ForwardedIdentity::None,
            Some("xfcc") => ForwardedIdentity::Xfcc,
            Some("l5d-client-id") => ForwardedIdentity::L5dClientId,
            Some(other) => {
                self.problem(
                    "server.forwarded_identity",
                    format!("`{other}` is not one of \"none\", \"xfcc\", \"l5d-client-id\""),
                );
                ForwardedIdentity::None
            }
        };
        let trusted_proxies = match raw.trusted_proxies {
            None => defaults::trusted_proxies(),
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, text) in list.iter().enumerate() {
                    match parse_ip_net(text) {
                        Ok(net) => out.push(net),
                        Err(reason) => self.problem(format!("server.trusted_proxies[{i}]"), reason),
                    }
                }
                out
            }
        };
        let log_format = match raw.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem(
                    "server.log_format",
                    format!("`{other}` is neither \"text\" nor \"json\""),
                );
                LogFormat::Text
            }
        };
        let metrics_listen = raw.metrics_listen.and_then(|text| match text.parse() {
            Ok(addr) if addr == listen => {
                self.problem(
                    "server.metrics_listen",
                    format!("`{text}` is the gRPC address (server.listen); use another port"),
                );
                None
            }
            Ok(addr) => Some(addr),
            Err(e) => {
                self.problem(
                    "server.metrics_listen",
                    format!("`{text}` is not an address like 127.0.0.1:9464 ({e})"),
                );
                None
            }
        });
        let handshake_timeout = self.nonzero_duration(
            "server.handshake_timeout",
            raw.handshake_timeout,
            defaults::HANDSHAKE_TIMEOUT,
        );
        let idle_timeout = self.nonzero_duration(
            "server.idle_timeout",
            raw.idle_timeout,
            defaults::IDLE_TIMEOUT,
        );
        let max_connection_age = self.nonzero_duration(
            "server.max_connection_age",
            raw.max_connection_age,
            defaults::MAX_CONNECTION_AGE,
        );
        let request_timeout = self.nonzero_duration(
            "server.request_timeout",
            raw.request_timeout,
            defaults::SERVER_REQUEST_TIMEOUT,
        );
        let max_connections_per_peer = self.positive(
            "server.max_connections_per_peer",
            raw.max_connections_per_peer,
            defaults::MAX_CONNECTIONS_PER_PEER,
        );
        let max_in_flight_requests = self.positive(
            "server.max_in_flight_requests",
            raw.max_in_flight_requests,
            defaults::MAX_IN_FLIGHT_REQUESTS,
        );
        ServerConfig {
            listen,
            shutdown_grace,
            warm_start_timeout,
            max_connections,
            max_concurrent_streams,
            tls,
            forwarded_identity,
            trusted_proxies,
            log_format,
            metrics_listen,
            handshake_timeout,
            idle_timeout,
            max_connection_age,
            max_connections_per_peer,
            request_timeout,
            max_in_flight_requests,
        }
    }

    /// `[server.tls]`: paths made absolute, and each file checked to be a
    /// readable regular file of sane size now rather than at the first handshake.
    fn tls(&mut self, raw: RawTls) -> TlsConfig {
        let cert_file = self.tls_file("server.tls.cert_file", &raw.cert_file, MAX_CERT_FILE_BYTES);
        let key_file = self.tls_file("server.tls.key_file", &raw.key_file, MAX_KEY_FILE_BYTES);
        let client_ca_file = raw
            .client_ca_file
            .map(|p| self.tls_file("server.tls.client_ca_file", &p, MAX_CERT_FILE_BYTES));
        if raw.require_client_cert && client_ca_file.is_none() {
            self.problem(
                "server.tls.require_client_cert",
                "needs server.tls.client_ca_file to verify client certificates against",
            );
        }
        TlsConfig {
            cert_file,
            key_file,
            client_ca_file,
            require_client_cert: raw.require_client_cert,
        }
    }

    fn tls_file(&mut self, key: &str, path: &Path, cap: u64) -> PathBuf {
        let full = absolute(self.base_dir, path);
        if let Err(reason) = check_regular_file(&full, cap) {
            self.problem(key, reason);
        }
        full
    }

    fn payroc(&mut self, raw: RawPayroc) -> PayrocConfig {
        let environment = match raw.environment.as_deref() {
            None | Some("test") => Environment::Test,
            Some("production") => Environment::Production,
            Some(other) => {
                self.problem(
                    "payroc.environment",
                    format!("`{other}` is neither \"test\" nor \"production\""),
                );
                Environment::Test
            }
        };
        let (identity_default, api_default) = environment.urls();
        let insecure = raw.allow_insecure_http;
        let identity_url = self.url(
            "payroc.identity_url",
            raw.identity_url.as_deref().unwrap_or(identity_default),
            insecure,
        );
        let mut api_url = self.url(
            "payroc.api_url",
            raw.api_url.as_deref().unwrap_or(api_default),
            insecure,
        );
        // Normalise `.../v1/` to `.../v1` so paths are appended one way.
        let trimmed = api_url.path().trim_end_matches('/').to_owned();
        if !trimmed.ends_with("/v1") {
            self.problem(
                "payroc.api_url",
                format!(
                    "the base URL must end in /v1 (got path `{}`)",
                    api_url.path()
                ),
            );
        }
        api_url.set_path(&trimmed);

        let lib_version = raw
            .lib_version
            .unwrap_or_else(|| defaults::LIB_VERSION.to_owned());
        if !payroc::is_valid_lib_version(&lib_version) {
            self.problem(
                "payroc.lib_version",
                format!("`{lib_version}` does not match Payroc's pattern, e.g. 1.7.0.261457"),
            );
        }
        let refresh_before_expiry = self.duration(
            "payroc.refresh_before_expiry",
            raw.refresh_before_expiry,
            defaults::REFRESH_BEFORE_EXPIRY,
        );
        let min_token_validity = self.duration(
            "payroc.min_token_validity",
            raw.min_token_validity,
            defaults::MIN_TOKEN_VALIDITY,
        );
        let request_timeout = self.duration(
            "payroc.request_timeout",
            raw.request_timeout,
            defaults::REQUEST_TIMEOUT,
        );
        if request_timeout.is_zero() {
            self.problem("payroc.request_timeout", "must be longer than zero");
        }
        let max_attempts = raw.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
        if !(1..=10).contains(&max_attempts) {
            self.problem("payroc.max_attempts", "must be between 1 and 10");
        }
        let max_concurrent_sessions = self.positive(
            "payroc.max_concurrent_sessions",
            raw.max_concurrent_sessions,
            defaults::MAX_CONCURRENT_SESSIONS,
        );
        let max_concurrent_sessions_per_caller = self.positive(
            "payroc.max_concurrent_sessions_per_caller",
            raw.max_concurrent_sessions_per_caller,
            defaults::MAX_CONCURRENT_SESSIONS_PER_CALLER,
        );
        let warm_start_concurrency = self.positive(
            "payroc.warm_start_concurrency",
            raw.warm_start_concurrency,
            defaults::WARM_START_CONCURRENCY,
        );
        let warm_start_spread = self.duration(
            "payroc.warm_start_spread",
            raw.warm_start_spread,
            defaults::WARM_START_SPREAD,
        );
        let identity_backoff = self.duration(
            "payroc.identity_backoff",
            raw.identity_backoff,
            defaults::IDENTITY_BACKOFF,
        );
        let identity_max_backoff = self.duration(
            "payroc.identity_max_backoff",
            raw.identity_max_backoff,
            defaults::IDENTITY_MAX_BACKOFF,
        );
        if identity_backoff.is_zero() {
            self.problem("payroc.identity_backoff", "must be longer than zero");
        }
        if identity_max_backoff < identity_backoff {
            self.problem(
                "payroc.identity_max_backoff",
                "must not be shorter than identity_backoff",
            );
        }
        PayrocConfig {
            environment,
            identity_url,
            api_url,
            lib_version,
            refresh_before_expiry,
            min_token_validity,
            request_timeout,
            max_attempts,
            allow_insecure_http: insecure,
            max_concurrent_sessions,
            warm_start_concurrency,
            warm_start_spread,
            identity_backoff,
            identity_max_backoff,
            max_concurrent_sessions_per_caller,
        }
    }

    fn positive(&mut self, key: &str, raw: Option<usize>, default: usize) -> usize {
        match raw {
            Some(0) => {
                self.problem(key, "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        }
    }

    fn nonzero_duration(&mut self, key: &str, raw: Option<String>, default: Duration) -> Duration {
        let d = self.duration(key, raw, default);
        if d.is_zero() {
            self.problem(key, "must be longer than zero");
            return default;
        }
        d
    }

    fn duration(&mut self, key: &str, raw: Option<String>, default: Duration) -> Duration {
        let Some(text) = raw else { return default };
        humantime::parse_duration(&text).unwrap_or_else(|e| {
            self.problem(
                key,
                format!("`{text}` is not a duration like \"30s\" or \"5m\" ({e})"),
            );
            default
        })
    }

    /// Parses a URL and applies the https-only rule: plain http only towards
    /// loopback hosts, unless `allow_insecure_http` says otherwise.
    fn url(&mut self, key: &str, text: &str, allow_insecure: bool) -> Url {
        let placeholder = || Url::parse("https://invalid.invalid/v1").expect("static URL");
        let url = match Url::parse(text) {
            Ok(u) => u,
            Err(e) => {
                self.problem(key, format!("`{text}` is not a URL ({e})"));
                return placeholder();
            }
        };
        match url.scheme() {
            "https" => {}
            "http" if allow_insecure || is_loopback(&url) => {}
            "http" => self.problem(
                key,
                format!(
                    "plain http to the non-loopback host `{}` would expose API keys and tokens; \
                     use https, or set payroc.allow_insecure_http = true",
                    url.host_str().unwrap_or("")
                ),
            ),
            other => self.problem(key, format!("scheme `{other}` is not http or https")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(key, "credentials in the URL are not allowed");
        }
        url
    }

    fn credentials(&mut self, raw: Vec<RawCredential>) -> Vec<CredentialConfig> {
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, c) in raw.into_iter().enumerate() {
            let at = format!("credentials[{i}]");
            if !is_valid_name(&c.name) {
                self.problem(
                    format!("{at}.name"),
                    format!("`{}` must be 1 to 64 of A-Z a-z 0-9 . _ -", c.name),
                );
            } else if !names.insert(c.name.clone()) {
                self.problem(format!("{at}.name"), format!("`{}` is used twice", c.name));
            }
            let api_key = self.secret(&at, "api_key", c.api_key_env, c.api_key_file);
            if c.terminals.is_empty() {
                self.problem(format!("{at}.terminals"), "lists no terminal");
            }
            for (j, t) in c.terminals.iter().enumerate() {
                let key = format!("{at}.terminals[{j}]");
                if !payroc::is_valid_terminal_id(t) {
                    self.problem(key, format!("`{t}` must be 4 to 50 characters"));
                } else if let Some(first) = owner.get(t) {
                    self.problem(
                        key,
                        format!("terminal `{t}` is already served by credential `{first}`"),
                    );
                } else {
                    owner.insert(t.clone(), c.name.clone());
                }
            }
            out.push(CredentialConfig {
                name: c.name,
                api_key: api_key.unwrap_or_else(|| SecretString::from("")),
                terminals: c.terminals,
            });
        }
        if out.is_empty() {
            self.problem("credentials", "no [[credentials]] are configured");
        }
        out
    }

    /// Resolves exactly one of `<what>_env` / `<what>_file`.
    fn secret(
        &mut self,
        at: &str,
        what: &str,
        env_name: Option<String>,
        file: Option<PathBuf>,
    ) -> Option<SecretString> {
        match (env_name, file) {
            (Some(_), Some(_)) | (None, None) => {
                self.problem(
                    format!("{at}.{what}_env"),
                    format!("set exactly one of {what}_env and {what}_file"),
                );
                None
            }
            (Some(var), None) => match (self.env)(&var) {
                Some(v) if !v.trim().is_empty() => Some(SecretString::from(v.trim().to_owned())),
                Some(_) => {
                    self.problem(
                        format!("{at}.{what}_env"),
                        format!("the environment variable `{var}` is empty"),
                    );
                    None
                }
                None => {
                    self.problem(
                        format!("{at}.{what}_env"),
                        format!("the environment variable `{var}` is not set"),
                    );
                    None
                }
            },
            (None, Some(path)) => {
                let full = self.base_dir.join(&path);
                match std::fs::read_to_string(&full) {
                    // Secret files usually end in a newline; the key never does.
                    Ok(v) if !v.trim().is_empty() => Some(SecretString::from(v.trim().to_owned())),
                    Ok(_) => {
                        self.problem(
                            format!("{at}.{what}_file"),
                            format!("`{}` is empty", full.display()),
                        );
                        None
                    }
                    Err(e) => {
                        self.problem(
                            format!("{at}.{what}_file"),
                            format!("cannot read `{}`: {e}", full.display()),
                        );
                        None
                    }
                }
            }
        }
    }

    fn callers(&mut self, raw: Vec<RawCaller>, known: &HashSet<&str>) -> Vec<CallerConfig> {
        let mut names = HashSet::new();
        let mut hashes: HashMap<[u8; 32], String> = HashMap::new();
        let mut workload_ids: HashMap<(&'static str, String), String> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, c) in raw.into_iter().enumerate() {
            let at = format!("callers[{i}]");
            if !is_valid_name(&c.name) {
                self.problem(
                    format!("{at}.name"),
                    format!("`{}` must be 1 to 64 of A-Z a-z 0-9 . _ -", c.name),
                );
            } else if !names.insert(c.name.clone()) {
                self.problem(format!("{at}.name"), format!("`{}` is used twice", c.name));
            }
            let identity = self.caller_identity(&at, &c);
            match &identity {
                Some(CallerIdentity::TokenSha256(h)) => {
                    if let Some(other) = hashes.get(h) {
                        let key = if c.token_env.is_some() {
                            "token_env"
                        } else {
                            "token_sha256"
                        };
                        self.problem(
                            format!("{at}.{key}"),
                            format!("the same token is already given to caller `{other}`"),
                        );
                    } else {
                        hashes.insert(*h, c.name.clone());
                    }
                }
                Some(id @ (CallerIdentity::SpiffeId(s) | CallerIdentity::DnsName(s))) => {
                    let key = match id {
                        CallerIdentity::SpiffeId(_) => "spiffe_id",
                        _ => "dns_name",
                    };
                    if let Some(other) = workload_ids.get(&(key, s.clone())) {
                        self.problem(
                            format!("{at}.{key}"),
                            format!("`{s}` is already the identity of caller `{other}`"),
                        );
                    } else {
                        workload_ids.insert((key, s.clone()), c.name.clone());
                    }
                }
                None => {}
            }
            let rate_limit = self.rate_limit(&at, c.rate_limit.as_deref(), c.burst);
            let terminals = self.allow(&format!("{at}.terminals"), c.terminals, |t| {
                if known.contains(t.as_str()) {
                    Ok(t)
                } else {
                    Err(format!("terminal `{t}` is not served by any credential"))
                }
            });
            let rpcs = self.allow(&format!("{at}.rpcs"), c.rpcs, |r| {
                Rpc::from_name(&r).ok_or_else(|| {
                    format!(
                        "`{r}` is not an RPC name (GetBearerToken, CreateSession, \
                         WatchBearerToken, ExtAuthz)"
                    )
                })
            });
            out.push(CallerConfig {
                name: c.name,
                // Only reached through an error return, which drops it.
                identity: identity.unwrap_or(CallerIdentity::TokenSha256([0; 32])),
                terminals,
                rpcs,
                rate_limit,
            });
        }
        out
    }

    /// Exactly one of `token_env`, `token_sha256`, `spiffe_id`, `dns_name`.
    fn caller_identity(&mut self, at: &str, c: &RawCaller) -> Option<CallerIdentity> {
        let set = [
            c.token_env.is_some(),
            c.token_sha256.is_some(),
            c.spiffe_id.is_some(),
            c.dns_name.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            self.problem(
                at,
                "set exactly one of token_env, token_sha256, spiffe_id and dns_name",
            );
            return None;
        }
        if let Some(var) = &c.token_env {
            return self
                .secret(at, "token", Some(var.clone()), None)
                .map(|t| CallerIdentity::TokenSha256(sha256(t.expose_secret().as_bytes())));
        }
        if let Some(hex) = &c.token_sha256 {
            let parsed = parse_sha256_hex(hex);
            if parsed.is_none() {
                self.problem(
                    format!("{at}.token_sha256"),
                    "must be 64 hexadecimal characters (the SHA-256 of the token)",
                );
            }
            return parsed.map(CallerIdentity::TokenSha256);
        }
        if let Some(id) = &c.spiffe_id {
            return match check_spiffe_id(id) {
                Ok(()) => Some(CallerIdentity::SpiffeId(id.clone())),
                Err(reason) => {
                    self.problem(format!("{at}.spiffe_id"), reason);
                    None
                }
            };
        }
        let name = c.dns_name.as_deref().unwrap_or_default();
        if is_valid_dns_name(name) {
            Some(CallerIdentity::DnsName(name.to_owned()))
        } else {
            self.problem(
                format!("{at}.dns_name"),
                format!(
                    "`{name}` is not a DNS name (dot-separated labels of 1 to 63 letters, \
                     digits and inner hyphens; 253 characters at most)"
                ),
            );
            None
        }
    }

    /// `rate_limit = "N/s"` or `"N/m"`, `burst` defaulting to the per-second
    /// rate (at least 1).
    fn rate_limit(
        &mut self,
        at: &str,
        text: Option<&str>,
        burst: Option<u32>,
    ) -> Option<RateLimit> {
        let Some(text) = text else {
            if burst.is_some() {
                self.problem(format!("{at}.burst"), "needs rate_limit");
            }
            return None;
        };
        let parsed = text.split_once('/').and_then(|(n, unit)| {
            let per = match unit {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                _ => return None,
            };
            // Digits only: no sign, no spaces.
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            n.parse::<u32>().ok().filter(|n| *n > 0).map(|n| (n, per))
        });
        let Some((count, per)) = parsed else {
            self.problem(
                format!("{at}.rate_limit"),
                format!(
                    "`{text}` is not a rate like \"50/s\" or \"600/m\" (a count of at least 1)"
                ),
            );
            return None;
        };
        let per_second = if per == Duration::from_secs(1) {
            count
        } else {
            count / 60
        };
        let burst = match burst {
            Some(0) => {
                self.problem(format!("{at}.burst"), "must be at least 1");
                1
            }
            Some(b) => b,
            None => per_second.max(1),
        };
        Some(RateLimit { count, per, burst })
    }

    fn allow<T>(
        &mut self,
        key: &str,
        items: Vec<String>,
        check: impl Fn(String) -> Result<T, String>,
    ) -> Allow<T> {
        if items.is_empty() {
            self.problem(
                key,
                "is empty, so it allows nothing; use [\"*\"] for everything",
            );
            return Allow::Only(Vec::new());
        }
        if items.iter().any(|i| i == "*") {
            if items.len() > 1 {
                self.problem(key, "\"*\" must stand alone");
            }
            return Allow::All;
        }
        let mut out = Vec::with_capacity(items.len());
        for (j, item) in items.into_iter().enumerate() {
            match check(item) {
                Ok(v) => out.push(v),
                Err(reason) => self.problem(format!("{key}[{j}]"), reason),
            }
        }
        Allow::Only(out)
    }
}

/// `path` against the configuration file's directory, unless absolute.
fn absolute(base_dir: &Path, path: &Path) -> PathBuf {
    let joined = base_dir.join(path);
    if joined.is_absolute() {
        return joined;
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(&joined))
        .unwrap_or(joined)
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

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host). Host bits
/// below the prefix are refused: `10.0.0.1/8` is most likely a typo.
fn parse_ip_net(text: &str) -> Result<IpNet, String> {
    let bad = |why: &str| format!("`{text}` is not a network like 10.0.0.0/8 or ::1/128 ({why})");
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| bad("bad prefix length"))?
        }
        Some(_) => return Err(bad("bad prefix length")),
    };
    if prefix > max {
        return Err(bad(&format!("the prefix length is at most {max}")));
    }
    let net = IpNet { addr, prefix };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    if network != addr {
        return Err(format!(
            "`{text}` has host bits set; the network is {network}/{prefix}"
        ));
    }
    Ok(net)
}

/// A SPIFFE ID: `spiffe://<trust domain>[/<path>]`, trust domain of lower-case
/// letters, digits, `.`, `-`, `_`; path segments of letters, digits, `.`, `-`,
/// `_`, none empty, `.` or `..` (the SPIFFE ID specification).
fn check_spiffe_id(id: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!("`{id}` is not a SPIFFE ID like spiffe://cluster.local/ns/shop/sa/web ({why})")
    };
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("it must start with spiffe://"))?;
    if id.len() > 2048 {
        return Err(bad("longer than 2048 bytes"));
    }
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if domain.is_empty()
        || !domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
    {
        return Err(bad(
            "the trust domain must be lower-case letters, digits, '.', '-' or '_'",
        ));
    }
    if let Some(path) = path {
        for segment in path.split('/') {
            let ok = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err(bad(
                    "path segments must be non-empty letters, digits, '.', '-' or '_'",
                ));
            }
        }
    }
    Ok(())
}

/// A DNS name as it appears in a certificate's DNS SAN (RFC 1123 host name):
/// labels of 1..=63 letters, digits and inner hyphens, 253 characters at
/// most, no trailing dot, no wildcard.
fn is_valid_dns_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Credential and caller names appear in logs, metrics and health service
/// names, so they are kept to a safe alphabet.
fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY_ACME" => Some("acme-secret-key".into()),
            "KEY_OTHER" => Some("other-secret-key".into()),
            "EMPTY" => Some("  ".into()),
            "CALLER_TOKEN" => Some("caller-secret".into()),
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
            CallerIdentity::TokenSha256(sha256(b"caller-secret"))
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
        assert!(
            p[0].contains("credentials[1].api_key_env: the environment variable `EMPTY` is empty")
        );
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
                "broker.toml: credentials[1].api_key_file: cannot read `/nonexistent/acme`"
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
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with(
                "broker.toml: payroc.refresh_before_expiry: `two minutes` is not a duration"
            ),
            "{p:?}"
        );
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
                &format!(
                    "identity_url = \"http://{host}/authorize\"\napi_url = \"http://{host}/v1/\""
                ),
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
                "broker.toml: callers[0].rpcs[0]: `Nope` is not an RPC name (GetBearerToken, CreateSession, WatchBearerToken, ExtAuthz)"
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
            p[0].starts_with("broker.toml: callers[1].token_sha256: must be 64 hexadecimal"),
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
            .replace("\"2m\"", "\"soon\"")
            .replace("KEY_OTHER", "UNSET")
            .replace("\"127.0.0.1:6000\"", "\"nowhere\"");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let p = problems("[server\nlisten = 1");
        assert!(p[0].starts_with("broker.toml: line 1, column "), "{p:?}");
        let p = problems("[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"");
        assert!(
            p[0].starts_with("broker.toml: line 3, column 1: duplicate key (`listen`)"),
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

    #[test]
    fn bad_server_keys_of_part_two_are_all_reported() {
        let p = problems(&with_server(
            r#"forwarded_identity = "envoy"
            trusted_proxies = ["10.0.0.1/8", "10.0.0.0/33", "example.com", "::1/+8"]
            log_format = "xml"
            metrics_listen = "127.0.0.1:6000"
            handshake_timeout = "0s"
            idle_timeout = "forever"
            max_connection_age = "0s"
            max_connections_per_peer = 0
            request_timeout = "0s"
            max_in_flight_requests = 0"#,
        ));
        let keys: Vec<&str> = p
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "server.forwarded_identity",
                "server.trusted_proxies[0]",
                "server.trusted_proxies[1]",
                "server.trusted_proxies[2]",
                "server.trusted_proxies[3]",
                "server.log_format",
                "server.metrics_listen",
                "server.handshake_timeout",
                "server.idle_timeout",
                "server.max_connection_age",
                "server.request_timeout",
                "server.max_connections_per_peer",
                "server.max_in_flight_requests",
            ],
            "{p:#?}"
        );
        assert!(
            p[1].contains("host bits set; the network is 10.0.0.0/8"),
            "{p:?}"
        );
        assert!(p[6].contains("is the gRPC address"), "{p:?}");
        let p = problems(&with_server("metrics_listen = \"nowhere\""));
        assert!(
            p[0].starts_with("broker.toml: server.metrics_listen: `nowhere` is not an address"),
            "{p:?}"
        );
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

        let plain = format!(
            "{GOOD}\n[server.tls]\ncert_file = \"tls/tls.crt\"\nkey_file = \"tls/tls.key\""
        );
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
        assert!(
            p[0].contains(": server.tls.cert_file: cannot read `"),
            "{p:?}"
        );
        assert!(p[0].contains("missing.crt"), "{p:?}");
        assert!(p[1].contains(": server.tls.key_file: `"), "{p:?}");
        assert!(p[1].contains("more than the 16384 allowed"), "{p:?}");
        assert!(p[2].contains(": server.tls.client_ca_file: `"), "{p:?}");
        assert!(p[2].ends_with("adir` is not a regular file"), "{p:?}");

        // A device is refused from its metadata, without reading it.
        let text = format!(
            "{GOOD}\n[server.tls]\ncert_file = \"tls.crt\"\nkey_file = \"/dev/zero\"\n\
             require_client_cert = true"
        );
        let err = dir.parse(&text).unwrap_err().to_string();
        let p: Vec<&str> = err.lines().collect();
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].ends_with("server.tls.key_file: `/dev/zero` is not a regular file"),
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
            .replace("token_env = \"CALLER_TOKEN\"", "dns_name = \"web.shop.svc\"")
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
            "rpcs = [\"GetBearerToken\", \"CreateSession\", \"WatchBearerToken\", \"ExtAuthz\"]",
        ))
        .unwrap();
        assert_eq!(
            c.callers[0].rpcs,
            Allow::Only(vec![
                Rpc::GetBearerToken,
                Rpc::CreateSession,
                Rpc::WatchBearerToken,
                Rpc::ExtAuthz
            ])
        );
        for rpc in [
            Rpc::GetBearerToken,
            Rpc::CreateSession,
            Rpc::WatchBearerToken,
            Rpc::ExtAuthz,
        ] {
            assert_eq!(Rpc::from_name(rpc.name()), Some(rpc));
        }
    }
}
