//! The HTTP client: one pooled reqwest client (rustls) for both endpoints.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use reqwest::{
    Url,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    Attempt, AttemptObserver, AttemptTrace, Endpoint, SESSION_LIFETIME, UpstreamError,
    problem::Problem,
    retry::{self, RetryPolicy},
};
use crate::{
    clock::{Clock, SharedEntropy},
    trace::{TRACEPARENT, TraceParent},
};

/// Bodies larger than this are cut off: Payroc's answers are a few hundred
/// bytes, and an unbounded read is a memory hazard.
const MAX_BODY: usize = 64 * 1024;

/// A Bearer token as the identity service issued it.
pub struct IdentityToken {
    pub access_token: SecretString,
    pub token_type: String,
    /// `expires_in`, counted from `requested_at`.
    pub expires_in: Duration,
    /// When the request that obtained the token was sent: expiry is counted
    /// from here, so network latency can only make the broker more cautious.
    pub requested_at: Instant,
    pub scopes: Vec<String>,
    /// The HTTP status the identity service answered with.
    pub status: u16,
}

/// What a Hosted Fields session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Payment,
    Tokenization,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Payment => "payment",
            Scenario::Tokenization => "tokenization",
        }
    }
}

/// A session request, before it is sent.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub processing_terminal_id: String,
    pub scenario: Scenario,
    pub lib_version: String,
    pub secure_token_id: Option<String>,
    pub idempotency_key: Uuid,
}

/// A session request with its URL and body fixed, so every retry (transport,
/// 5xx, or after a 401 refresh) resends exactly the same key, URI and body, as
/// Payroc's idempotency matching requires.
#[derive(Debug, Clone)]
pub struct PreparedSession {
    pub request: SessionRequest,
    url: Url,
    body: bytes::Bytes,
    idempotency_key: HeaderValue,
}

/// A session token, as Payroc issued it.
pub struct Session {
    pub processing_terminal_id: String,
    pub token: SecretString,
    pub expires_at: SystemTime,
    /// The HTTP status the sessions endpoint answered with.
    pub status: u16,
}

/// What the client needs to know: where Payroc is and how patiently to ask.
/// Built from the `[payroc]` configuration (`config` depends on `payroc`,
/// never the other way round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub identity_url: Url,
    /// Base URL, ending in `/v1`.
    pub api_url: Url,
    /// One HTTP attempt (and connection set-up) at most.
    pub request_timeout: Duration,
    /// Attempts per upstream request, the first included.
    pub max_attempts: u32,
}

/// Payroc's API, over one connection pool.
pub struct PayrocClient {
    http: reqwest::Client,
    identity_url: Url,
    api_url: Url,
    request_timeout: Duration,
    retry: RetryPolicy,
    /// As `retry`, but a long Retry-After ends the fetch at once: the fetch
    /// is shared, so sleeping in it would hold every waiter past its
    /// deadline; the token cache's backoff honours the wait instead.
    identity_retry: RetryPolicy,
    clock: Clock,
    entropy: SharedEntropy,
    /// Told of each HTTP attempt, when someone counts them.
    observer: Option<Arc<dyn AttemptObserver>>,
}

impl PayrocClient {
    pub fn new(
        settings: impl Into<Settings>,
        clock: Clock,
        entropy: SharedEntropy,
    ) -> Result<Self, reqwest::Error> {
        let settings: Settings = settings.into();
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            // A redirect could carry the API key to another host: never follow.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("payroc-broker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            identity_url: settings.identity_url,
            api_url: settings.api_url,
            request_timeout: settings.request_timeout,
            retry: RetryPolicy::new(settings.max_attempts),
            identity_retry: RetryPolicy {
                max_retry_after: Duration::from_secs(2),
                ..RetryPolicy::new(settings.max_attempts)
            },
            clock,
            entropy,
            observer: None,
        })
    }

    /// Tells `observer` of every HTTP attempt (status and time).
    pub fn with_observer(mut self, observer: Arc<dyn AttemptObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Fixes the URL and body of a session request.
    pub fn prepare_session(&self, request: SessionRequest) -> PreparedSession {
        let mut url = self.api_url.clone();
        url.path_segments_mut()
            .expect("api_url is an http(s) URL")
            .pop_if_empty()
            // `push` percent-encodes, so an id can never change the path.
            .extend([
                "processing-terminals",
                &request.processing_terminal_id,
                "hosted-fields-sessions",
            ]);
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            lib_version: &'a str,
            scenario: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            secure_token_id: Option<&'a str>,
        }
        let body = serde_json::to_vec(&Body {
            lib_version: &request.lib_version,
            scenario: request.scenario.as_str(),
            secure_token_id: request.secure_token_id.as_deref(),
        })
        .expect("serialising strings cannot fail");
        let idempotency_key =
            HeaderValue::from_str(&request.idempotency_key.hyphenated().to_string())
                .expect("a UUID is a valid header value");
        PreparedSession {
            request,
            url,
            body: body.into(),
            idempotency_key,
        }
    }

    /// Buys a Bearer token with an API key, retrying transient failures.
    /// `deadline` bounds the whole exchange when given; `trace` is the trace
    /// of the RPC that asked for the token, if any.
    pub async fn fetch_bearer(
        &self,
        api_key: &SecretString,
        deadline: Option<Instant>,
        trace: Option<TraceParent>,
    ) -> Result<IdentityToken, UpstreamError> {
        retry::run(
            &self.identity_retry,
            &self.clock,
            &*self.entropy,
            self.request_timeout,
            deadline,
            Endpoint::Identity,
            |_| self.identity_once(api_key, trace),
        )
        .await
    }

    async fn identity_once(
        &self,
        api_key: &SecretString,
        trace: Option<TraceParent>,
    ) -> Result<IdentityToken, UpstreamError> {
        const EP: Endpoint = Endpoint::Identity;
        let requested_at = self.clock.now();
        let req = self
            .http
            .post(self.identity_url.clone())
            .header("x-api-key", sensitive(api_key.expose_secret())?)
            .header(reqwest::header::ACCEPT, "application/json");
        let (status, _, body) = self
            .exchange(EP, req, &[api_key.expose_secret()], trace)
            .await?;
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            expires_in: u64,
            token_type: String,
            #[serde(default)]
            scope: Option<String>,
        }
        let a: Answer = parse_json(EP, &body)?;
        if a.access_token.is_empty() {
            return Err(malformed(EP, "access_token is empty"));
        }
        if a.expires_in == 0 {
            return Err(malformed(EP, "expires_in is zero"));
        }
        if !a.token_type.eq_ignore_ascii_case("bearer") {
            return Err(malformed(
                EP,
                format!("token_type is `{}`, not Bearer", a.token_type),
            ));
        }
        Ok(IdentityToken {
            access_token: SecretString::from(a.access_token),
            token_type: "Bearer".to_owned(),
            expires_in: Duration::from_secs(a.expires_in),
            requested_at,
            scopes: a
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            status,
        })
    }

    /// Creates a session token, retrying transient failures with the same
    /// Idempotency-Key and body. A 401 is returned to the caller (who owns the
    /// token cache) rather than retried here. Sent from the RPC's task, so
    /// it carries the RPC's trace ([`crate::trace::current`]).
    pub async fn create_session(
        &self,
        bearer: &SecretString,
        prepared: &PreparedSession,
        deadline: Option<Instant>,
    ) -> Result<Session, UpstreamError> {
        let trace = crate::trace::current();
        retry::run(
            &self.retry,
            &self.clock,
            &*self.entropy,
            self.request_timeout,
            deadline,
            Endpoint::Sessions,
            |_| self.session_once(bearer, prepared, trace),
        )
        .await
    }

    async fn session_once(
        &self,
        bearer: &SecretString,
        prepared: &PreparedSession,
        trace: Option<TraceParent>,
    ) -> Result<Session, UpstreamError> {
        const EP: Endpoint = Endpoint::Sessions;
        let auth = format!("Bearer {}", bearer.expose_secret());
        let req = self
            .http
            .post(prepared.url.clone())
            .header(AUTHORIZATION, sensitive(&auth)?)
            .header(CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .header("idempotency-key", prepared.idempotency_key.clone())
            .body(prepared.body.clone());
        let (status, _, body) = self
            .exchange(EP, req, &[bearer.expose_secret()], trace)
            .await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            processing_terminal_id: Option<String>,
            token: String,
            expires_at: Option<String>,
        }
        let a: Answer = parse_json(EP, &body)?;
        if a.token.is_empty() {
            return Err(malformed(EP, "token is empty"));
        }
        let expires_at = match a.expires_at.as_deref() {
            Some(text) => text
                .parse::<prost_types::Timestamp>()
                .ok()
                .and_then(|t| SystemTime::try_from(t).ok())
                .ok_or_else(|| {
                    malformed(
                        EP,
                        format!("expiresAt `{text}` is not an ISO 8601 date-time"),
                    )
                })?,
            // Documented as required, optional in every official SDK: fall
            // back to the documented lifetime, counted from now (cautious).
            None => self.clock.wall(self.clock.now()) + SESSION_LIFETIME,
        };
        Ok(Session {
            processing_terminal_id: a
                .processing_terminal_id
                .unwrap_or_else(|| prepared.request.processing_terminal_id.clone()),
            token: SecretString::from(a.token),
            expires_at,
            status,
        })
    }

    /// Sends one request and reads a bounded body. Non-2xx answers become
    /// `UpstreamError::Status` with the problem document (redacted of
    /// `secrets`) and any `Retry-After`. With `trace`, the request carries a
    /// `traceparent` of that trace with a span id of its own. Counted in the
    /// observer however it ends, a timeout (this future dropped) included.
    async fn exchange(
        &self,
        endpoint: Endpoint,
        mut req: reqwest::RequestBuilder,
        secrets: &[&str],
        trace: Option<TraceParent>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>), UpstreamError> {
        let trace = trace.map(|parent| AttemptTrace {
            parent,
            sent: parent.child(&*self.entropy),
        });
        if let Some(t) = trace {
            req = req.header(TRACEPARENT, t.sent.to_string());
        }
        let mut attempt = Observed {
            observer: self.observer.as_deref(),
            clock: &self.clock,
            endpoint,
            started: self.clock.now(),
            status: None,
            trace,
        };
        let transport = |e: reqwest::Error| UpstreamError::Transport {
            endpoint,
            // Without the URL: it is ours, not news to anyone, and keeps
            // messages short. reqwest errors carry no header values.
            message: crate::chain::error_chain(&e.without_url()),
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        attempt.status = Some(status);
        let headers = std::mem::take(resp.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(malformed(
                    endpoint,
                    format!("body larger than {MAX_BODY} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            return Ok((status, headers, body));
        }
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let mut problem = Problem::parse(content_type, &body);
        if let Some(p) = problem.as_mut() {
            for s in secrets {
                p.redact(s);
            }
        }
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, self.clock.wall(self.clock.now())));
        Err(UpstreamError::Status {
            endpoint,
            status,
            problem: problem.map(Box::new),
            retry_after,
        })
    }
}

/// One HTTP attempt, reported to the observer when it ends, however it
/// ends: with a status, or none if no response came.
struct Observed<'a> {
    observer: Option<&'a dyn AttemptObserver>,
    clock: &'a Clock,
    endpoint: Endpoint,
    started: Instant,
    status: Option<u16>,
    trace: Option<AttemptTrace>,
}

impl Drop for Observed<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.observer {
            o.attempt(&Attempt {
                endpoint: self.endpoint,
                status: self.status,
                took: self.clock.now().saturating_duration_since(self.started),
                trace: self.trace,
            });
        }
    }
}

/// A header value marked sensitive: HTTP/2 sends it never-indexed and its
/// `Debug` prints `Sensitive`, so no trace log can show it.
fn sensitive(value: &str) -> Result<HeaderValue, UpstreamError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| UpstreamError::Malformed {
        endpoint: Endpoint::Identity,
        reason: "a credential contains characters not allowed in an HTTP header".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_json<T: serde::de::DeserializeOwned>(
    endpoint: Endpoint,
    body: &[u8],
) -> Result<T, UpstreamError> {
    // serde_json's messages can quote the offending value; keep only the
    // category and position so a mistyped credential can never be echoed.
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not valid JSON",
            serde_json::error::Category::Data => "JSON of the wrong shape",
            serde_json::error::Category::Eof => "truncated JSON",
        };
        malformed(
            endpoint,
            format!("{what} at line {} column {}", e.line(), e.column()),
        )
    })
}

fn malformed(endpoint: Endpoint, reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Malformed {
        endpoint,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn malformed_json_errors_never_quote_values() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            n: u64,
        }
        let e = parse_json::<T>(Endpoint::Identity, br#"{"n": "secret-value-123"}"#).unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains("secret-value-123"), "{msg}");
        assert!(msg.contains("wrong shape"), "{msg}");
    }

    #[test]
    fn session_requests_are_fixed_once() {
        let client = PayrocClient::new(
            Settings {
                identity_url: Url::parse("http://127.0.0.1:1/authorize").unwrap(),
                api_url: Url::parse("http://127.0.0.1:1/base/v1").unwrap(),
                request_timeout: Duration::from_secs(1),
                max_attempts: 1,
            },
            Clock::system(),
            std::sync::Arc::new(crate::clock::OsEntropy),
        )
        .unwrap();
        let p = client.prepare_session(SessionRequest {
            processing_terminal_id: "12/34?x".into(),
            scenario: Scenario::Payment,
            lib_version: "1.7.0.261457".into(),
            secure_token_id: None,
            idempotency_key: Uuid::nil(),
        });
        assert_eq!(
            p.url.as_str(),
            "http://127.0.0.1:1/base/v1/processing-terminals/12%2F34%3Fx/hosted-fields-sessions"
        );
        assert_eq!(
            &p.body[..],
            br#"{"libVersion":"1.7.0.261457","scenario":"payment"}"#
        );
        let mut with_secure = p.request.clone();
        with_secure.secure_token_id = Some("MREF_1".into());
        with_secure.scenario = Scenario::Tokenization;
        let p = client.prepare_session(with_secure);
        assert_eq!(
            &p.body[..],
            br#"{"libVersion":"1.7.0.261457","scenario":"tokenization","secureTokenId":"MREF_1"}"#
        );
    }
}
