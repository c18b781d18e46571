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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
    warm_start_timeout: Option<String>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
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
    terminals: Vec<String>,
    rpcs: Vec<String>,
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
}

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
            ext_authz: ExtAuthzConfig::default(),
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
        ServerConfig {
            listen,
            shutdown_grace,
            warm_start_timeout,
            max_connections,
            max_concurrent_streams,
            tls: None,
            forwarded_identity: ForwardedIdentity::None,
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Text,
            metrics_listen: None,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_connection_age: defaults::MAX_CONNECTION_AGE,
            max_connections_per_peer: defaults::MAX_CONNECTIONS_PER_PEER,
            request_timeout: defaults::SERVER_REQUEST_TIMEOUT,
            max_in_flight_requests: defaults::MAX_IN_FLIGHT_REQUESTS,
        }
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
            max_concurrent_sessions_per_caller: defaults::MAX_CONCURRENT_SESSIONS_PER_CALLER,
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
            let token_sha256 = match (c.token_env, c.token_sha256) {
                (Some(var), None) => self
                    .secret(&at, "token", Some(var), None)
                    .map(|t| sha256(t.expose_secret().as_bytes())),
                (None, Some(hex)) => parse_sha256_hex(&hex).or_else(|| {
                    self.problem(
                        format!("{at}.token_sha256"),
                        "must be 64 hexadecimal characters (the SHA-256 of the token)",
                    );
                    None
                }),
                _ => {
                    self.problem(
                        format!("{at}.token_env"),
                        "set exactly one of token_env and token_sha256",
                    );
                    None
                }
            };
            if let Some(h) = token_sha256 {
                if let Some(other) = hashes.get(&h) {
                    self.problem(
                        format!("{at}.token_env"),
                        format!("the same token is already given to caller `{other}`"),
                    );
                } else {
                    hashes.insert(h, c.name.clone());
                }
            }
            let terminals = self.allow(&format!("{at}.terminals"), c.terminals, |t| {
                if known.contains(t.as_str()) {
                    Ok(t)
                } else {
                    Err(format!("terminal `{t}` is not served by any credential"))
                }
            });
            let rpcs = self.allow(&format!("{at}.rpcs"), c.rpcs, |r| {
                Rpc::from_name(&r).ok_or_else(|| {
                    format!("`{r}` is not an RPC of TokenBroker (GetBearerToken, CreateSession)")
                })
            });
            out.push(CallerConfig {
                name: c.name,
                identity: CallerIdentity::TokenSha256(token_sha256.unwrap_or([0; 32])),
                terminals,
                rpcs,
                rate_limit: None,
            });
        }
        out
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
                "broker.toml: callers[0].rpcs[0]: `Nope` is not an RPC of TokenBroker (GetBearerToken, CreateSession)"
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
}
