//! Configuration: parse the TOML file, validate every rule, resolve secrets.
//!
//! The output, [`Config`], is fully checked: URLs obey the https-only rule,
//! every terminal belongs to exactly one credential, API keys and caller tokens
//! have been read (into redacting secret types). Nothing downstream re-checks
//! or re-reads.
//!
//! One file per section (`server`, `tls`, `payroc`, `credentials`,
//! `callers`, `telemetry`); each holds its public type, what serde reads it from, and the
//! rules serde cannot express. Reading happens in two phases:
//!
//! 1. serde reads the file into typed values: durations (humantime form),
//!    addresses, enums and defaults. A value of the wrong type or form stops
//!    this phase at the first one, reported with its key path.
//! 2. Each section then checks its rules (ranges, cross-key rules, secrets,
//!    files, URLs) against a shared [`Checker`], which collects every problem,
//!    so all of them are reported at once, each naming the file, the key's
//!    path (`credentials[1].api_key_env`) and the reason.

mod callers;
mod credentials;
mod env;
mod payroc;
pub mod secret_file;
mod server;
mod telemetry;
mod tls;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use callers::{Allow, CallerConfig, CallerIdentity, RateLimit};
pub use credentials::CredentialConfig;
pub use env::{CapturedEnv, SecretEnv, TokenDigest};
pub use payroc::{Environment, PayrocConfig};
pub use server::{ForwardedIdentity, IpNet, LogFormat, ServerConfig};
pub use telemetry::TelemetryConfig;
pub use tls::TlsConfig;

/// The environment variable that names the configuration file when
/// `--config` is not given.
pub const CONFIG_ENV: &str = "PAYROC_BROKER_CONFIG";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub payroc: PayrocConfig,
    pub credentials: Vec<CredentialConfig>,
    pub callers: Vec<CallerConfig>,
    pub ext_authz: ExtAuthzConfig,
    /// `None`: the section is absent and the endpoint off.
    pub identity_endpoint: Option<IdentityEndpointConfig>,
    pub telemetry: TelemetryConfig,
}

/// `[identity_endpoint]`: the Payroc-compatible identity endpoint that the
/// official SDKs call (`POST /credentials/{credential}/authorize`), on a port
/// of its own with `[server]`'s TLS and limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityEndpointConfig {
    pub listen: std::net::SocketAddr,
}

/// `[ext_authz]`: Envoy's `envoy.service.auth.v3.Authorization/Check` on the gRPC port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtAuthzConfig {
    pub enabled: bool,
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

/// A plain lookup function: one kind of [`SecretEnv`] (the process
/// environment for `check-config`, a map in tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

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

impl Config {
    /// Reads and validates `path`. Relative paths in it (`api_key_file`,
    /// `[server.tls]`) are resolved against the configuration file's directory.
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        Self::load_with(path, &env)
    }

    /// As [`Config::load`], with secrets from any [`SecretEnv`] (`serve`
    /// passes its [`CapturedEnv`]).
    pub fn load_with(path: &Path, env: &dyn SecretEnv) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                key: String::new(),
                reason: format!("cannot read the configuration file: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_with(&text, path, base, env)
    }

    /// Validates configuration text; `file` names it in errors.
    pub fn parse(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: EnvLookup<'_>,
    ) -> Result<Config, ConfigError> {
        Self::parse_with(text, file, base_dir, &env)
    }

    /// As [`Config::parse`], with secrets from any [`SecretEnv`].
    pub fn parse_with(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn SecretEnv,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_owned(),
            problems,
        };
        // Phase 1: serde. Stops at the first value it cannot read.
        let raw: RawConfig = {
            let de = toml::Deserializer::parse(text)
                .map_err(|e| fail(vec![toml_problem("", &e, text)]))?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." { String::new() } else { key };
                fail(vec![toml_problem(&key, e.inner(), text)])
            })?
        };
        // Phase 2: every rule of every section, all problems collected.
        let mut check = Checker {
            problems: Vec::new(),
            env,
            base_dir,
        };
        let config = raw.check(&mut check);
        if check.problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(check.problems))
        }
    }
}

impl Config {
    /// Things worth a warning that are not errors (`check-config` prints
    /// them, `serve` logs them), each starting with the key path it is about.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(endpoint) = &self.identity_endpoint
            && self.server.tls.is_none()
            && !endpoint.listen.ip().is_loopback()
        {
            out.push(format!(
                "identity_endpoint.listen: `{}` is not a loopback address and [server.tls] is not \
                 set, so caller tokens and Bearer tokens would cross the network in clear; set \
                 [server.tls], or make sure a mesh sidecar encrypts this port (then this warning is \
                 expected)",
                endpoint.listen
            ));
        }
        out.extend(callers::bearer_scope_warnings(
            &self.callers,
            &self.credentials,
        ));
        if self.identity_endpoint.is_some() {
            out.extend(callers::authorize_scope_warnings(
                &self.callers,
                &self.credentials,
            ));
        }
        out
    }
}

/// The file as serde reads it; sections not written take their defaults.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    server: ServerConfig,
    payroc: payroc::RawPayroc,
    credentials: Vec<credentials::RawCredential>,
    callers: Vec<callers::RawCaller>,
    ext_authz: ExtAuthzConfig,
    identity_endpoint: Option<IdentityEndpointConfig>,
    telemetry: TelemetryConfig,
}

impl RawConfig {
    fn check(self, c: &mut Checker<'_>) -> Config {
        let mut server = self.server;
        server.check(c);
        let payroc = self.payroc.check(c);
        let credentials = credentials::check(self.credentials, c);
        let callers = callers::check(self.callers, &credentials, c);
        self.telemetry.check(c);
        if let Some(endpoint) = &self.identity_endpoint {
            let taken = [
                (Some(server.listen), "the gRPC address (server.listen)"),
                (
                    server.metrics_listen,
                    "the metrics address (server.metrics_listen)",
                ),
            ];
            for (addr, what) in taken {
                if addr == Some(endpoint.listen) && endpoint.listen.port() != 0 {
                    c.problem(
                        "identity_endpoint.listen",
                        format!("`{}` is {what}; use another port", endpoint.listen),
                    );
                }
            }
        }
        Config {
            server,
            payroc,
            credentials,
            callers,
            ext_authz: self.ext_authz,
            identity_endpoint: self.identity_endpoint,
            telemetry: self.telemetry,
        }
    }
}

/// What the sections' checks share: where problems go, where secrets and
/// relative paths come from.
struct Checker<'a> {
    problems: Vec<Problem>,
    env: &'a dyn SecretEnv,
    base_dir: &'a Path,
}

impl Checker<'_> {
    fn problem(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// `path` against the configuration file's directory, unless absolute.
    fn absolute(&self, path: &Path) -> PathBuf {
        let joined = self.base_dir.join(path);
        if joined.is_absolute() {
            return joined;
        }
        std::env::current_dir()
            .map(|cwd| cwd.join(&joined))
            .unwrap_or(joined)
    }

    /// The secret in environment variable `var`, named by `key`, trimmed.
    fn env_secret(&mut self, key: &str, var: &str) -> Option<SecretString> {
        if !self.env_name(key, var) {
            return None;
        }
        let Some(value) = self.env.secret(var) else {
            self.problem(key, format!("the environment variable `{var}` is not set"));
            return None;
        };
        let trimmed = value.expose_secret().trim();
        if trimmed.is_empty() {
            self.problem(key, format!("the environment variable `{var}` is empty"));
            return None;
        }
        Some(SecretString::from(trimmed))
    }

    /// The caller token in environment variable `var`, as its digest.
    fn env_token(&mut self, key: &str, var: &str) -> Option<TokenDigest> {
        if !self.env_name(key, var) {
            return None;
        }
        match self.env.token(var) {
            None => {
                self.problem(key, format!("the environment variable `{var}` is not set"));
                None
            }
            Some(d) if d.chars == 0 => {
                self.problem(key, format!("the environment variable `{var}` is empty"));
                None
            }
            Some(d) => Some(d),
        }
    }

    /// Whether `var` looks like a variable name. If not it is not echoed: it
    /// may be the secret itself, typed where its name belongs.
    fn env_name(&mut self, key: &str, var: &str) -> bool {
        let ok = is_env_name(var);
        if !ok {
            self.problem(
                key,
                "the value is not a valid environment variable name (A-Z, 0-9 and _, not \
                 starting with a digit); was the secret typed where its name belongs?",
            );
        }
        ok
    }

    /// The secret in file `path` (relative to the configuration's
    /// directory), read by [`secret_file::read`]. Surrounding whitespace is
    /// dropped: secret files usually end in a newline, secrets never do.
    fn file_secret(&mut self, key: &str, path: &Path) -> Option<SecretString> {
        let full = self.base_dir.join(path);
        let bytes = match secret_file::read(&full, secret_file::MAX_SECRET_FILE_BYTES) {
            Ok(b) => b,
            Err(e) => {
                self.problem(key, e.to_string());
                return None;
            }
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            self.problem(key, format!("`{}` is not UTF-8 text", full.display()));
            return None;
        };
        if text.trim().is_empty() {
            self.problem(key, format!("`{}` is empty", full.display()));
            return None;
        }
        Some(SecretString::from(text.trim()))
    }

    /// A count that must be at least 1.
    fn at_least_one(&mut self, key: &str, n: usize) {
        if n == 0 {
            self.problem(key, "must be at least 1");
        }
    }

    /// A duration that must be longer than zero.
    fn nonzero(&mut self, key: &str, d: std::time::Duration) {
        if d.is_zero() {
            self.problem(key, "must be longer than zero");
        }
    }
}

/// A TOML error as one line: the message, and where it is when the key path
/// alone does not say (syntax errors, duplicate keys): line, column, and the
/// table and key it is in. The text at the error is never quoted: a broken
/// line is often a secret pasted without its quotes.
fn toml_problem(key: &str, e: &toml::de::Error, text: &str) -> Problem {
    let mut reason = without_string_values(e.message().trim_end()).replace('\n', "; ");
    if let Some(span) = e.span().filter(|_| key.is_empty()) {
        let start = floor_char_boundary(text, span.start);
        let before = &text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..start].chars().count() + 1;
        let mut place = format!("line {line}, column {column}");
        let within = [table_at(before), key_at(text, line_start)];
        let within: Vec<String> = within.into_iter().flatten().collect();
        if !within.is_empty() {
            place.push_str(&format!(" ({})", within.join(", ")));
        }
        reason = format!("{place}: {reason}");
    }
    Problem {
        key: key.to_owned(),
        reason,
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `in [server]`: the last table header before the error, when it reads as
/// one (a header is a key path, never a value).
fn table_at(before: &str) -> Option<String> {
    let header = before
        .lines()
        .rev()
        .skip(1)
        .map(str::trim)
        .find(|l| l.starts_with('['))?;
    let name = header.trim_start_matches('[').split(']').next()?.trim();
    is_bare_key_path(name).then(|| {
        if header.starts_with("[[") {
            format!("in [[{name}]]")
        } else {
            format!("in [{name}]")
        }
    })
}

/// `at key `listen``: the key of the line the error is on, when the line
/// starts with one followed by `=`.
fn key_at(text: &str, line_start: usize) -> Option<String> {
    let line = text[line_start..].lines().next()?;
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    is_bare_key_path(k).then(|| format!("at key `{k}`"))
}

/// `a`, `a.b_c-d`: TOML bare keys joined by dots, 64 characters at most.
fn is_bare_key_path(k: &str) -> bool {
    (1..=64).contains(&k.len())
        && k.split('.').all(|part| {
            let part = part.trim();
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// `[A-Z_][A-Z0-9_]*`: the portable form of an environment variable name.
fn is_env_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| !b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// serde quotes the string it could not use (`invalid type: string "…",
/// expected …`); that string may be a secret typed under the wrong key, so it
/// becomes `a string`. The key path says where to look.
fn without_string_values(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(QUOTED) {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        // Skip to the closing quote; `\"` and `\\` are escapes (Debug form).
        let mut chars = rest[start + QUOTED.len()..].char_indices();
        let mut end = None;
        while let Some((i, ch)) = chars.next() {
            match ch {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(start + QUOTED.len() + i + 1);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            // Unterminated: drop the rest rather than echo it.
            return out;
        };
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
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

#[cfg(test)]
mod tests;
