//! The Payroc-compatible identity endpoint (`[identity_endpoint]`, the
//! contract's part 3): `POST /credentials/{credential}/authorize` answered as
//! Payroc's Identity Service answers `POST /authorize`, with the broker's
//! shared token, so that an official SDK whose identity URL points here uses
//! the broker by configuration alone.
//!
//! The decision, in order:
//! 1. the path and method (any other path 404, another method 405 with
//!    `Allow: POST`);
//! 2. the caller, as on the gRPC port but with the token also read from
//!    `x-api-key` (where an SDK sends its API key), then its rate limit
//!    ([`Source::IDENTITY_ENDPOINT`]);
//! 3. `Authorize` in its `rpcs` and **every** terminal of the credential in
//!    its `terminals`, since the token is good for all of them (403);
//! 4. the credential (404), then a token with at least the configured floor
//!    left from the shared cache: never an identity request of its own.
//!
//! Refusals are RFC 7807 problem documents whose HTTP status follows from the
//! broker error, and whose `code` member is the gRPC code the same outcome has
//! on the gRPC port (the audit event's `code`). The request body, if any, is
//! ignored: read (up to [`MAX_IGNORED_BODY`]) only so that an HTTP/1.1
//! connection can be reused.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full};
use secrecy::ExposeSecret;
use serde::Serialize;
use tonic::{Code, Status, metadata::MetadataMap};

use crate::{
    access::{Evidence, PeerInfo, Source},
    api::{
        call::{self, Origin, Refusal},
        state::State,
    },
    clock::Clock,
    domain::error::BrokerError,
    obs::audit::{Audit, Auditor},
    rpc::{Rpc, code_name},
    trace::TraceParent,
    transport::{Edge, HttpRequest, HttpResponse},
};

/// A body beyond this is left unread (and the connection closed after the
/// answer): the endpoint needs none, and Go's SDK sends a small JSON one.
const MAX_IGNORED_BODY: usize = 64 * 1024;

/// The identity endpoint. Cheap to clone: state is behind `Arc`.
#[derive(Clone)]
pub struct IdentityService {
    state: Arc<ArcSwap<State>>,
    clock: Clock,
    auditor: Auditor,
}

/// Payroc's answer to `POST /authorize`, field for field.
#[derive(Serialize)]
struct Granted<'a> {
    access_token: &'a str,
    token_type: &'a str,
    expires_in: u64,
    scope: String,
}

/// A refused request, as an RFC 7807 problem document.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    /// The gRPC code of the same outcome on the gRPC port.
    code: Code,
    /// Safe to show: the one mapping's message, never a secret.
    detail: String,
    retry_after: Option<std::time::Duration>,
    allow_post: bool,
}

impl Refusal for Problem {
    fn code(&self) -> Code {
        self.code
    }

    fn log(&self) {
        tracing::debug!(
            http_status = self.status.as_u16(),
            reason = self.detail.as_str(),
            "identity request refused"
        );
    }
}

impl Problem {
    fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            allow_post: false,
        }
    }

    /// The problem for a broker error: code, message and `RetryInfo` from
    /// the one mapping (`crate::api::status`); the HTTP status the
    /// contract's part 3 table gives the situation.
    pub fn from_error(e: BrokerError) -> Self {
        let kind = http_status(&e);
        let status = Status::from(e);
        let http = kind.unwrap_or_else(|| match status.code() {
            // Payroc answered, but not with a token the broker can hand out:
            // the key was rejected (FAILED_PRECONDITION), or the answer was
            // malformed or too short-lived for the floor.
            Code::FailedPrecondition
            | Code::Internal
            | Code::InvalidArgument
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::NotFound => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        });
        let retry_after = match http {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                call::retry_info(&status)
            }
            _ => None,
        };
        Self {
            status: http,
            code: status.code(),
            detail: status.message().to_owned(),
            retry_after,
            allow_post: false,
        }
    }

    fn into_response(self) -> HttpResponse {
        #[derive(Serialize)]
        struct Document<'a> {
            r#type: &'a str,
            title: &'a str,
            status: u16,
            detail: &'a str,
            code: &'a str,
        }
        let body = serde_json::to_vec(&Document {
            r#type: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
            code: code_name(self.code),
        })
        .unwrap_or_default();
        let mut response = answer(self.status, "application/problem+json", body);
        let headers = response.headers_mut();
        if let Some(wait) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(call::retry_after_seconds(wait)),
            );
        }
        if self.allow_post {
            headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// The HTTP status of the errors whose situation the contract names; `None`:
/// decided by the gRPC code (an upstream failure).
fn http_status(e: &BrokerError) -> Option<StatusCode> {
    Some(match e {
        BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        BrokerError::PeerThrottled { .. } | BrokerError::CallerRateLimited { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
        BrokerError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
        BrokerError::UnknownCredential(_) | BrokerError::UnknownTerminal(_) => {
            StatusCode::NOT_FOUND
        }
        BrokerError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        BrokerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        BrokerError::Upstream(_)
        | BrokerError::UpstreamBackingOff { .. }
        | BrokerError::SessionUnauthorizedAfterRefresh(_)
        | BrokerError::OutOfRange { .. } => return None,
        BrokerError::CallerSessionsLimited { .. }
        | BrokerError::DeadlineExceeded
        | BrokerError::RequestTimeout
        | BrokerError::Overloaded(_)
        | BrokerError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    })
}

/// A response with a body, never cached: it holds a token or says why not.
fn answer(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> HttpResponse {
    let mut response = http::Response::new(tonic::body::Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The `{credential}` of `/credentials/{credential}/authorize`; `None` for
/// any other path.
fn credential_in(path: &str) -> Option<&str> {
    let name = path
        .strip_prefix("/credentials/")?
        .strip_suffix("/authorize")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

impl IdentityService {
    pub fn new(state: Arc<ArcSwap<State>>, clock: Clock, auditor: Auditor) -> Self {
        Self {
            state,
            clock,
            auditor,
        }
    }

    async fn handle(self, req: HttpRequest) -> HttpResponse {
        let (parts, body) = req.into_parts();
        // The headers move into a MetadataMap: no copy. Nothing else reads
        // them.
        let metadata = MetadataMap::from_headers(parts.headers);
        let peer = parts.extensions.get::<PeerInfo>();
        let origin = Origin {
            peer: peer.map(|p| p.remote),
            trace: TraceParent::from_metadata(&metadata),
        };
        let name = credential_in(parts.uri.path());
        let rpc = name.map(|_| Rpc::Authorize);
        let outcome = call::run(&self.auditor, rpc, origin, async |audit| {
            // A Bearer token is for every terminal of its credential: the
            // event's terminal is empty (the contract's part 3).
            audit.terminal("");
            let Some(name) = name else {
                return Err(Problem::new(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    "no such resource; the identity endpoint is POST /credentials/{credential}/authorize",
                ));
            };
            if parts.method != Method::POST {
                return Err(Problem {
                    allow_post: true,
                    ..Problem::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        Code::Unimplemented,
                        "only POST is served here",
                    )
                });
            }
            let evidence = Evidence {
                metadata: &metadata,
                peer,
                envoy_principal: None,
            };
            self.authorize(name, &evidence, audit).await.map_err(|e| {
                audit.error(&e);
                Problem::from_error(e)
            })
        })
        .await;
        match outcome {
            Ok(granted) => {
                // Read (and drop) what the client sent, so the connection
                // can carry its next request; a larger body is left unread.
                drain(body).await;
                granted
            }
            Err(problem) => problem.into_response(),
        }
    }

    /// The shared token of credential `name` for the caller `evidence`
    /// names, as Payroc's JSON answer.
    async fn authorize(
        &self,
        name: &str,
        evidence: &Evidence<'_>,
        audit: &mut Audit,
    ) -> Result<HttpResponse, BrokerError> {
        // One configuration from start to end, as for every RPC.
        let state = self.state.load_full();
        // The audit event names a configured credential even when the caller
        // is refused (who tried for which key); the answer does not.
        let found = state.broker.credential_named(name);
        if let Ok((credential, _)) = &found {
            audit.credential(&credential.name);
        }
        let caller = state
            .callers
            .admit_with(Source::IDENTITY_ENDPOINT, evidence)?;
        audit.caller(caller.shared_name());
        // The allow lists before the name: a caller without `Authorize`
        // learns nothing of which credentials exist.
        let terminals = found.as_ref().map_or(&[][..], |(_, t)| t);
        caller.authorize_all(Rpc::Authorize, terminals)?;
        let (credential, _) = found?;
        // No deadline: HTTP carries none; the wait is bounded by the
        // upstream's own timeouts and attempts.
        let grant = state.broker.bearer(credential, None, None).await?;
        audit.upstream_status(grant.upstream_status);
        let token = &grant.token;
        let access_token = token.access_token.expose_secret();
        audit.token(token.fingerprint);
        // Whole seconds left, rounded down (never more than Payroc granted);
        // at least 1, as the floor guarantees.
        let left = token.remaining(self.clock.now()).min(token.lifetime);
        let body = serde_json::to_vec(&Granted {
            access_token,
            token_type: &token.token_type,
            expires_in: left.as_secs().max(1),
            scope: token.scopes.join(" "),
        })
        .map_err(|e| BrokerError::Internal(format!("cannot encode the answer: {e}")))?;
        Ok(answer(StatusCode::OK, "application/json", body))
    }
}

/// Reads `body` to its end, up to [`MAX_IGNORED_BODY`] bytes; errors (the
/// request timeout, a reset) end it too.
async fn drain(mut body: tonic::body::Body) {
    let mut read = 0;
    while read <= MAX_IGNORED_BODY {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            _ => return,
        }
    }
}

impl tower_service::Service<HttpRequest> for IdentityService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

impl Edge for IdentityService {
    fn overloaded(&self, e: BrokerError) -> HttpResponse {
        Problem::from_error(e).into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_the_authorize_path_names_a_credential() {
        assert_eq!(credential_in("/credentials/acme/authorize"), Some("acme"));
        for other in [
            "/credentials//authorize",
            "/credentials/a/b/authorize",
            "/credentials/acme/authorize/",
            "/credentials/acme",
            "/authorize",
            "/",
        ] {
            assert_eq!(credential_in(other), None, "{other}");
        }
    }

    #[test]
    fn errors_take_the_contracts_http_status_and_the_grpc_code() {
        let cases = [
            (
                BrokerError::Unauthenticated("unknown caller token"),
                401,
                Code::Unauthenticated,
            ),
            (
                BrokerError::PeerThrottled {
                    retry_in: Duration::from_secs(30),
                },
                429,
                Code::Unauthenticated,
            ),
            (
                BrokerError::CallerRateLimited {
                    caller: "web".into(),
                    retry_in: Duration::from_millis(1500),
                },
                429,
                Code::ResourceExhausted,
            ),
            (
                BrokerError::PermissionDenied {
                    caller: "web".into(),
                    reason: "may not call Authorize".into(),
                },
                403,
                Code::PermissionDenied,
            ),
            (
                BrokerError::UnknownCredential("nope".into()),
                404,
                Code::NotFound,
            ),
        ];
        for (e, http, code) in cases {
            let p = Problem::from_error(e);
            assert_eq!((p.status.as_u16(), p.code), (http, code), "{p:?}");
        }
    }

    #[test]
    fn a_429_says_when_to_come_back_and_a_403_does_not() {
        let p = Problem::from_error(BrokerError::CallerRateLimited {
            caller: "web".into(),
            retry_in: Duration::from_millis(1500),
        });
        let r = p.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let r = Problem::from_error(BrokerError::PermissionDenied {
            caller: "web".into(),
            reason: "no".into(),
        })
        .into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
