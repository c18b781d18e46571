//! `[payroc]`: which Payroc to talk to, and how (timeouts, retries, bulkheads,
//! token renewal). Also builds the HTTP client's own [`crate::payroc::Settings`],
//! so that `payroc` does not depend on `config`.

use std::{net::IpAddr, time::Duration};

use reqwest::Url;
use serde::Deserialize;

use super::{Checker, defaults};

/// Payroc's environments and their published URLs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// UAT.
    #[default]
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

impl From<&PayrocConfig> for crate::payroc::Settings {
    fn from(p: &PayrocConfig) -> Self {
        crate::payroc::Settings {
            identity_url: p.identity_url.clone(),
            api_url: p.api_url.clone(),
            request_timeout: p.request_timeout,
            max_attempts: p.max_attempts,
        }
    }
}

/// `[payroc]` as written: the URLs stay text until the environment they
/// default from is known and the https-only rule is applied.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawPayroc {
    environment: Environment,
    identity_url: Option<String>,
    api_url: Option<String>,
    lib_version: String,
    #[serde(with = "humantime_serde")]
    refresh_before_expiry: Duration,
    #[serde(with = "humantime_serde")]
    min_token_validity: Duration,
    #[serde(with = "humantime_serde")]
    request_timeout: Duration,
    max_attempts: u32,
    allow_insecure_http: bool,
    max_concurrent_sessions: usize,
    warm_start_concurrency: usize,
    #[serde(with = "humantime_serde")]
    warm_start_spread: Duration,
    #[serde(with = "humantime_serde")]
    identity_backoff: Duration,
    #[serde(with = "humantime_serde")]
    identity_max_backoff: Duration,
    max_concurrent_sessions_per_caller: usize,
}

impl Default for RawPayroc {
    fn default() -> Self {
        RawPayroc {
            environment: Environment::Test,
            identity_url: None,
            api_url: None,
            lib_version: defaults::LIB_VERSION.to_owned(),
            refresh_before_expiry: defaults::REFRESH_BEFORE_EXPIRY,
            min_token_validity: defaults::MIN_TOKEN_VALIDITY,
            request_timeout: defaults::REQUEST_TIMEOUT,
            max_attempts: defaults::MAX_ATTEMPTS,
            allow_insecure_http: false,
            max_concurrent_sessions: defaults::MAX_CONCURRENT_SESSIONS,
            warm_start_concurrency: defaults::WARM_START_CONCURRENCY,
            warm_start_spread: defaults::WARM_START_SPREAD,
            identity_backoff: defaults::IDENTITY_BACKOFF,
            identity_max_backoff: defaults::IDENTITY_MAX_BACKOFF,
            max_concurrent_sessions_per_caller: defaults::MAX_CONCURRENT_SESSIONS_PER_CALLER,
        }
    }
}

impl RawPayroc {
    pub(super) fn check(self, c: &mut Checker<'_>) -> PayrocConfig {
        let (identity_default, api_default) = self.environment.urls();
        let insecure = self.allow_insecure_http;
        let identity_url = url(
            c,
            "payroc.identity_url",
            self.identity_url.as_deref().unwrap_or(identity_default),
            insecure,
        );
        let mut api_url = url(
            c,
            "payroc.api_url",
            self.api_url.as_deref().unwrap_or(api_default),
            insecure,
        );
        // Normalise `.../v1/` to `.../v1` so paths are appended one way.
        let trimmed = api_url.path().trim_end_matches('/').to_owned();
        if !trimmed.ends_with("/v1") {
            c.problem(
                "payroc.api_url",
                format!(
                    "the base URL must end in /v1 (got path `{}`)",
                    api_url.path()
                ),
            );
        }
        api_url.set_path(&trimmed);

        if !crate::payroc::is_valid_lib_version(&self.lib_version) {
            c.problem(
                "payroc.lib_version",
                format!(
                    "`{}` does not match Payroc's pattern, e.g. 1.7.0.261457",
                    self.lib_version
                ),
            );
        }
        c.nonzero("payroc.request_timeout", self.request_timeout);
        if !(1..=10).contains(&self.max_attempts) {
            c.problem("payroc.max_attempts", "must be between 1 and 10");
        }
        c.at_least_one(
            "payroc.max_concurrent_sessions",
            self.max_concurrent_sessions,
        );
        c.at_least_one(
            "payroc.max_concurrent_sessions_per_caller",
            self.max_concurrent_sessions_per_caller,
        );
        c.at_least_one("payroc.warm_start_concurrency", self.warm_start_concurrency);
        c.nonzero("payroc.identity_backoff", self.identity_backoff);
        if self.identity_max_backoff < self.identity_backoff {
            c.problem(
                "payroc.identity_max_backoff",
                "must not be shorter than identity_backoff",
            );
        }
        PayrocConfig {
            environment: self.environment,
            identity_url,
            api_url,
            lib_version: self.lib_version,
            refresh_before_expiry: self.refresh_before_expiry,
            min_token_validity: self.min_token_validity,
            request_timeout: self.request_timeout,
            max_attempts: self.max_attempts,
            allow_insecure_http: insecure,
            max_concurrent_sessions: self.max_concurrent_sessions,
            warm_start_concurrency: self.warm_start_concurrency,
            warm_start_spread: self.warm_start_spread,
            identity_backoff: self.identity_backoff,
            identity_max_backoff: self.identity_max_backoff,
            max_concurrent_sessions_per_caller: self.max_concurrent_sessions_per_caller,
        }
    }
}

/// Parses a URL and applies the https-only rule: plain http only towards
/// loopback hosts, unless `allow_insecure_http` says otherwise.
fn url(c: &mut Checker<'_>, key: &str, text: &str, allow_insecure: bool) -> Url {
    let placeholder = || Url::parse("https://invalid.invalid/v1").expect("static URL");
    let url = match Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            c.problem(key, format!("`{text}` is not a URL ({e})"));
            return placeholder();
        }
    };
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure || is_loopback(&url) => {}
        "http" => c.problem(
            key,
            format!(
                "plain http to the non-loopback host `{}` would expose API keys and tokens; \
                 use https, or set payroc.allow_insecure_http = true",
                url.host_str().unwrap_or("")
            ),
        ),
        other => c.problem(key, format!("scheme `{other}` is not http or https")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        c.problem(key, "credentials in the URL are not allowed");
    }
    url
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}
