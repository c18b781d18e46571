//! Credential injection for a mesh: Envoy's external authorization
//! (`envoy.service.auth.v3.Authorization/Check`), served on the gRPC port
//! when `[ext_authz] enabled = true`.
//!
//! An Envoy-based egress (Envoy, Istio, Gloo...) in front of Payroc's API
//! asks the broker about each request; the broker answers with the Bearer
//! token to attach, so the application holds no credential at all. The
//! decision, in this order (the contract's, part 2):
//!
//! 1. the request's authority (`attributes.request.http.host`) must be the
//!    host and port of `payroc.api_url` (the port may be left out when it is
//!    the scheme's default), else DENIED 403. This comes first so that a
//!    token is never attached to a request to anywhere else;
//! 2. the terminal is the `{id}` of a path `<api_url path>/processing-terminals/{id}[/...]`
//!    (query string ignored), else the `x-payroc-processing-terminal-id`
//!    request header; neither, or an unusable one: DENIED 400. Paths with dot
//!    segments, empty segments or encoded separators are refused (400) too:
//!    an upstream that normalises them could reach a terminal other than the
//!    one the decision was about;
//! 3. the caller is `attributes.source.principal` matched against a caller's
//!    `spiffe_id`, believed only when the Check call comes from a peer inside
//!    `[server] trusted_proxies` (the principal is just a field of the
//!    request: from anyone else it could be forged); otherwise the Check
//!    call's own identity (client certificate, trusted forwarded identity,
//!    `authorization: Bearer` metadata), as for every RPC. Then the caller's
//!    rate limit (DENIED 429 with `retry-after`), then `ExtAuthz` in its
//!    `rpcs` and the terminal in its `terminals`. No caller, or outside the
//!    allow lists: DENIED 403. With no `[[callers]]`
//!    (`--allow-unauthenticated`) everyone is let in, as for GetBearerToken;
//! 4. unknown terminal: DENIED 404;
//! 5. no usable token (identity service failing, deadline): DENIED 503 with
//!    `retry-after` when the broker knows when to come back;
//! 6. allowed: OK, `authorization: Bearer <token>` set (overwriting whatever
//!    the application sent) and `x-api-key` removed; nothing else changes.
//!
//! A denial carries only the HTTP status, a short plain-text body and, for
//! 429 and 503, `retry-after`: never a token. The token comes from the same
//! cache as GetBearerToken, with the configured floor as minimum validity.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tonic::{Code, Request, Response, Status};
// `rpc::Status` is `google.rpc.Status`, the type build.rs maps the generated
// `CheckResponse.status` to.
use tonic_types::pb as rpc;
use url::{Host, Url};

use crate::{
    access::{Caller, Evidence, Source, peer_of},
    api::{
        call::{self, Origin, Refusal},
        state::State,
    },
    clock::Clock,
    domain::error::BrokerError,
    obs::audit::{Audit, Auditor},
    payroc,
    proto::envoy::{
        config::core::v3::{
            HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
        },
        service::auth::v3::{
            AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
            attribute_context::HttpRequest,
            authorization_server::{Authorization, AuthorizationServer},
            check_response::HttpResponse,
        },
        r#type::v3::{HttpStatus, StatusCode as HttpStatusCode},
    },
    rpc::Rpc,
};

/// The request header naming the terminal when the path does not.
pub const TERMINAL_HEADER: &str = "x-payroc-processing-terminal-id";

/// Check requests carry the request's headers (Envoy's default limit is
/// 60 KiB) and, only if Envoy is told to, part of its body, which the broker
/// does not need.
const MAX_CHECK_REQUEST: usize = 256 * 1024;

/// The `Authorization` service. Cheap to clone: state is behind `Arc`.
#[derive(Clone)]
pub struct ExtAuthzService {
    state: Arc<ArcSwap<State>>,
    clock: Clock,
    auditor: Auditor,
}

/// The gRPC server for `service`, with its message size limit.
pub fn server(service: ExtAuthzService) -> AuthorizationServer<ExtAuthzService> {
    AuthorizationServer::new(service).max_decoding_message_size(MAX_CHECK_REQUEST)
}

/// Why a request is refused, as Envoy is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The HTTP status Envoy answers the application with.
    pub http: HttpStatusCode,
    /// `CheckResponse.status`; never OK.
    pub code: Code,
    /// Safe to show: it goes to the application as the response body.
    pub message: String,
    /// `retry-after`, when known.
    pub retry_after: Option<Duration>,
}

impl Refusal for Denial {
    fn code(&self) -> Code {
        self.code
    }

    /// The reason as a field: text from the request in it is escaped.
    fn log(&self) {
        tracing::debug!(
            http_status = self.http as i32,
            reason = self.message.as_str(),
            "check denied"
        );
    }
}

impl Denial {
    fn new(http: HttpStatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            http,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The denial for a broker error: the gRPC status comes from the one
    /// mapping (`crate::api::status`), with its message and `RetryInfo`; the HTTP
    /// status is the contract's for ext_authz.
    fn from_error(e: BrokerError) -> Self {
        let (http, code) = match &e {
            BrokerError::Unauthenticated(_) | BrokerError::PeerThrottled { .. } => {
                (HttpStatusCode::Forbidden, None)
            }
            BrokerError::PermissionDenied { .. } => (HttpStatusCode::Forbidden, None),
            BrokerError::CallerRateLimited { .. } => (HttpStatusCode::TooManyRequests, None),
            BrokerError::InvalidArgument(_) => (HttpStatusCode::BadRequest, None),
            BrokerError::UnknownTerminal(_) => (HttpStatusCode::NotFound, None),
            // Everything else is about getting a token: no usable token. One
            // code for all of them, whatever Payroc said (the message tells).
            _ => (HttpStatusCode::ServiceUnavailable, Some(Code::Unavailable)),
        };
        let status = Status::from(e);
        let retry_after = match http {
            // A 403 is not worth retrying, whatever the failing-peer throttle says.
            HttpStatusCode::TooManyRequests | HttpStatusCode::ServiceUnavailable => {
                call::retry_info(&status)
            }
            _ => None,
        };
        Self {
            http,
            code: code.unwrap_or(status.code()),
            message: status.message().to_owned(),
            retry_after,
        }
    }

    fn into_response(self) -> CheckResponse {
        let mut headers = Vec::new();
        if let Some(wait) = self.retry_after {
            headers.push(header(
                "retry-after",
                call::retry_after_seconds(wait).to_string(),
            ));
        }
        CheckResponse {
            status: Some(rpc::Status {
                code: self.code as i32,
                message: self.message.clone(),
                details: Vec::new(),
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: self.http as i32,
                }),
                headers,
                body: self.message,
            })),
            dynamic_metadata: None,
        }
    }
}

/// A header for Envoy to set, replacing any value the request had.
fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        // `append` (deprecated) stays unset: Envoy refuses both at once.
        ..HeaderValueOption::default()
    }
}

/// What an allowed request gets: the token to attach and the API key header
/// to strip. Holds the token: never logged (no Debug).
struct Allowed {
    authorization: String,
}

impl Allowed {
    fn into_response(self) -> CheckResponse {
        CheckResponse {
            status: Some(rpc::Status {
                code: Code::Ok as i32,
                message: String::new(),
                details: Vec::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![header("authorization", self.authorization)],
                headers_to_remove: vec!["x-api-key".to_owned()],
                ..OkHttpResponse::default()
            })),
            dynamic_metadata: None,
        }
    }
}

impl ExtAuthzService {
    pub fn new(state: Arc<ArcSwap<State>>, clock: Clock, auditor: Auditor) -> Self {
        Self {
            state,
            clock,
            auditor,
        }
    }

    async fn decide(
        &self,
        req: &Request<CheckRequest>,
        audit: &mut Audit,
    ) -> Result<Allowed, Denial> {
        // The audit learns what an error says (upstream status, caller,
        // rate limit) before it becomes a denial.
        let deny = |e: BrokerError, audit: &mut Audit| {
            audit.error(&e);
            Denial::from_error(e)
        };
        let deadline = call::deadline(req.metadata(), &self.clock);
        // One configuration from start to end, as for every RPC.
        let state = self.state.load_full();
        let api_url = state.broker.api_url();
        let attributes = req.get_ref().attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let Some(http) = http.filter(|h| authority_is(&h.host, api_url)) else {
            return Err(Denial::new(
                HttpStatusCode::Forbidden,
                Code::PermissionDenied,
                "the request's authority is not the host and port of the broker's payroc.api_url",
            ));
        };
        let terminal = terminal_of(http, api_url.path())
            .map_err(|why| Denial::new(HttpStatusCode::BadRequest, Code::InvalidArgument, why))?;
        audit.terminal(&terminal);

        let caller = Self::caller(&state, req, attributes).map_err(|e| deny(e, audit))?;
        audit.caller(caller.shared_name());
        caller
            .authorize(Rpc::ExtAuthz, &terminal)
            .map_err(|e| deny(e, audit))?;
        let credential = state
            .broker
            .credential(&terminal)
            .map_err(|e| deny(e, audit))?;
        audit.credential(&credential.name);
        let grant = state
            .broker
            .bearer(credential, None, deadline)
            .await
            .map_err(|e| deny(e, audit))?;
        audit.upstream_status(grant.upstream_status);
        let token = secrecy::ExposeSecret::expose_secret(&grant.token.access_token);
        audit.token(grant.token.fingerprint);
        Ok(Allowed {
            authorization: format!("Bearer {token}"),
        })
    }

    /// The caller: the downstream workload Envoy names (when the Check call
    /// comes from a trusted proxy and the name is a caller's `spiffe_id`),
    /// otherwise whoever makes the Check call; then its rate limit.
    fn caller(
        state: &State,
        req: &Request<CheckRequest>,
        attributes: Option<&AttributeContext>,
    ) -> Result<Caller, BrokerError> {
        let peer = peer_of(req.extensions());
        let evidence = Evidence {
            metadata: req.metadata(),
            peer: peer.as_ref(),
            envoy_principal: attributes
                .and_then(|a| a.source.as_ref())
                .map(|s| s.principal.as_str())
                .filter(|p| !p.is_empty()),
        };
        state.callers.admit_with(Source::EXT_AUTHZ, &evidence)
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // One audit event per Check (code: the decision's), in the same
        // frame as the TokenBroker RPCs.
        let origin = Origin::of(&request);
        let decision = call::run(&self.auditor, Some(Rpc::ExtAuthz), origin, async |audit| {
            self.decide(&request, audit).await
        })
        .await;
        let response = match decision {
            Ok(allowed) => allowed.into_response(),
            Err(denial) => denial.into_response(),
        };
        Ok(Response::new(response))
    }
}

/// Whether `authority` (Envoy's `attributes.request.http.host`: the
/// request's `:authority` or `Host`) is the host and port of `api_url`. The
/// port may be left out when `api_url` uses its scheme's default port. Host
/// names compare case-insensitively, IP literals by address; anything
/// malformed (user info, an unbracketed IPv6 address, an empty or overlong
/// port, a zone id) does not match.
pub fn authority_is(authority: &str, api_url: &Url) -> bool {
    let (Some(host), Some(port)) = (api_url.host(), api_url.port_or_known_default()) else {
        return false;
    };
    let Some((given_host, given_port)) = split_authority(authority) else {
        return false;
    };
    let port_matches = match given_port {
        // `Url::port` is None exactly when the port is the scheme's default.
        None => api_url.port().is_none(),
        Some(p) => p == port,
    };
    let host_matches = match (host, given_host) {
        (Host::Domain(d), AuthorityHost::Name(n)) => d.eq_ignore_ascii_case(n),
        (Host::Ipv4(a), AuthorityHost::Name(n)) => n.parse::<std::net::Ipv4Addr>() == Ok(a),
        (Host::Ipv6(a), AuthorityHost::Ipv6(n)) => n.parse::<std::net::Ipv6Addr>() == Ok(a),
        _ => false,
    };
    port_matches && host_matches
}

/// The host part of an authority.
#[derive(Debug, PartialEq, Eq)]
enum AuthorityHost<'a> {
    /// A name or IPv4 address.
    Name(&'a str),
    /// The text between the brackets of an IPv6 literal.
    Ipv6(&'a str),
}

/// `host[:port]` or `[v6][:port]`; `None` when malformed.
fn split_authority(authority: &str) -> Option<(AuthorityHost<'_>, Option<u16>)> {
    if authority.is_empty() || authority.contains(['@', '/', '?', '#', '%', ' ']) {
        return None;
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (v6, rest) = inner.split_once(']')?;
        let port = match rest {
            "" => None,
            _ => Some(rest.strip_prefix(':')?),
        };
        (AuthorityHost::Ipv6(v6), port)
    } else {
        // A second colon (an unbracketed IPv6 address) leaves a port that is
        // not all digits, or an empty name: refused below.
        let (name, port) = match authority.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (authority, None),
        };
        if name.is_empty() {
            return None;
        }
        (AuthorityHost::Name(name), port)
    };
    let port = match port {
        None => None,
        Some(digits) => {
            if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            Some(digits.parse::<u16>().ok()?)
        }
    };
    Some((host, port))
}

/// The terminal a request is about: the `{id}` of its path, else the
/// `x-payroc-processing-terminal-id` header. `Err` says why there is no
/// usable one (the request's own text is not echoed).
pub fn terminal_of(http: &HttpRequest, base_path: &str) -> Result<String, &'static str> {
    if let Some(id) = terminal_in_path(&http.path, base_path)? {
        return Ok(id.to_owned());
    }
    terminal_header(http)?.ok_or(
        "no processing terminal: the path is not .../processing-terminals/{id}/... \
         and there is no `x-payroc-processing-terminal-id` header",
    )
}

/// The `{id}` of a request target `<base_path>/processing-terminals/{id}[/...]`
/// (`base_path` is `payroc.api_url`'s path, `/v1`), query string and fragment
/// ignored; `Ok(None)` for any other path. Dot segments, empty segments,
/// backslashes and percent-encoded dots, slashes or backslashes are refused
/// anywhere in the path: Envoy passes the target on undecoded, and an
/// upstream that normalises `/v1/processing-terminals/A/../B` would serve
/// terminal B on a decision made for A.
pub fn terminal_in_path<'a>(
    target: &'a str,
    base_path: &str,
) -> Result<Option<&'a str>, &'static str> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let lower = path.to_ascii_lowercase();
    let sneaky = path.contains('\\')
        || path.contains("//")
        || path.split('/').any(|s| s == "." || s == "..")
        || ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e));
    if sneaky {
        return Err("the request path has dot segments, empty segments or encoded separators");
    }
    let prefix = format!("{}/processing-terminals/", base_path.trim_end_matches('/'));
    // Case-insensitive, for an upstream that routes that way.
    let Some(rest) = lower
        .starts_with(&prefix.to_ascii_lowercase())
        .then(|| &path[prefix.len()..])
    else {
        return Ok(None);
    };
    let id = rest.split('/').next().unwrap_or_default();
    if !payroc::is_valid_terminal_id(id) {
        return Err(
            "the processing terminal id in the path is not valid: A-Z a-z 0-9 _ - (4 to 50 characters)",
        );
    }
    Ok(Some(id))
}

/// The `x-payroc-processing-terminal-id` header, from `headers` (Envoy's
/// default: lower-case keys, repeated headers joined with commas) or
/// `header_map` (`encode_raw_headers: true`: repeated headers kept apart,
/// values in `raw_value`). Several different values are refused.
fn terminal_header(http: &HttpRequest) -> Result<Option<String>, &'static str> {
    const NOT_UTF8: &str = "the `x-payroc-processing-terminal-id` header is not UTF-8";
    let mut values: Vec<&str> = http
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(TERMINAL_HEADER))
        .map(|(_, v)| v.trim())
        .collect();
    for h in http.header_map.iter().flat_map(|m| &m.headers) {
        if h.key.eq_ignore_ascii_case(TERMINAL_HEADER) {
            let v = if h.raw_value.is_empty() {
                h.value.as_str()
            } else {
                std::str::from_utf8(&h.raw_value).map_err(|_| NOT_UTF8)?
            };
            values.push(v.trim());
        }
    }
    let Some((first, others)) = values.split_first() else {
        return Ok(None);
    };
    if others.iter().any(|v| v != first) {
        return Err("more than one `x-payroc-processing-terminal-id` header");
    }
    if !payroc::is_valid_terminal_id(first) {
        return Err(
            "the `x-payroc-processing-terminal-id` header is not a valid processing terminal id: \
             A-Z a-z 0-9 _ - (4 to 50 characters)",
        );
    }
    Ok(Some((*first).to_owned()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::proto::envoy::config::core::v3::HeaderMap;

    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn the_authority_must_be_the_api_hosts_and_port() {
        let payroc = url("https://api.payroc.com/v1");
        for ok in [
            "api.payroc.com",
            "api.payroc.com:443",
            "API.Payroc.COM",
            "Api.payroc.com:443",
        ] {
            assert!(authority_is(ok, &payroc), "{ok}");
        }
        for no in [
            "",
            "api.payroc.com:80",
            "api.payroc.com:8443",
            "api.payroc.com.",
            "api.payroc.com.evil.example",
            "evil.example",
            "evil.example:443",
            "api.payroc.com:",
            "api.payroc.com:0443x",
            "api.payroc.com:443:443",
            "user@api.payroc.com",
            "api.payroc.com@evil.example",
            "api.payroc.com/",
            "api.payroc.com:4430000",
            ":443",
            " api.payroc.com",
        ] {
            assert!(!authority_is(no, &payroc), "{no:?}");
        }

        // A port that is not the scheme's default must be given.
        let sim = url("http://127.0.0.1:8123/v1");
        assert!(authority_is("127.0.0.1:8123", &sim));
        for no in [
            "127.0.0.1",
            "127.0.0.1:80",
            "127.0.0.2:8123",
            "localhost:8123",
            "127.1:8123",
        ] {
            assert!(!authority_is(no, &sim), "{no}");
        }

        // The default port may be written out or left out, per scheme.
        let plain = url("http://payroc.internal/v1");
        assert!(authority_is("payroc.internal", &plain));
        assert!(authority_is("payroc.internal:80", &plain));
        assert!(!authority_is("payroc.internal:443", &plain));
        let explicit_default = url("https://api.payroc.com:443/v1");
        assert!(authority_is("api.payroc.com", &explicit_default));
    }

    #[test]
    fn ipv6_authorities_are_bracketed_and_compared_by_address() {
        let v6 = url("http://[::1]:8123/v1");
        for ok in [
            "[::1]:8123",
            "[0:0::1]:8123",
            "[0000:0000:0000:0000:0000:0000:0000:0001]:8123",
        ] {
            assert!(authority_is(ok, &v6), "{ok}");
        }
        for no in [
            "::1:8123",
            "[::1]",
            "[::1]8123",
            "[::2]:8123",
            "[::1%25lo]:8123",
            "[::1]:",
            "[::1",
        ] {
            assert!(!authority_is(no, &v6), "{no}");
        }
        let v6_default = url("https://[2001:db8::7]/v1");
        assert!(authority_is("[2001:db8::7]", &v6_default));
        assert!(authority_is("[2001:DB8::7]:443", &v6_default));
        assert!(!authority_is("2001:db8::7", &v6_default));
        // An IPv4 API host is not matched by a name, and a name not by an IP.
        assert!(!authority_is(
            "[::1]:8123",
            &url("http://127.0.0.1:8123/v1")
        ));
        assert!(!authority_is(
            "127.0.0.1:443",
            &url("https://api.payroc.com/v1")
        ));
    }

    #[test]
    fn the_terminal_is_taken_from_the_path_under_the_api_base() {
        for (target, id) in [
            ("/v1/processing-terminals/1234001/refunds", "1234001"),
            ("/v1/processing-terminals/1234001", "1234001"),
            ("/v1/processing-terminals/1234001/", "1234001"),
            (
                "/v1/processing-terminals/1234001?x=/v1/processing-terminals/9999",
                "1234001",
            ),
            (
                "/v1/processing-terminals/ab_C-9/hosted-fields-sessions",
                "ab_C-9",
            ),
            ("/V1/Processing-Terminals/1234001/x", "1234001"),
        ] {
            assert_eq!(terminal_in_path(target, "/v1"), Ok(Some(id)), "{target}");
        }
        for other in [
            "/v1/payments",
            "/v1/processing-terminals",
            "/v2/processing-terminals/1234001/x",
            "/processing-terminals/1234001/x",
            "/v1/payments?terminal=/v1/processing-terminals/1234001/",
            "",
            "*",
        ] {
            assert_eq!(terminal_in_path(other, "/v1"), Ok(None), "{other}");
        }
        // Another base path (a Payroc test environment behind a prefix).
        assert_eq!(
            terminal_in_path("/payroc/v1/processing-terminals/1234001/x", "/payroc/v1"),
            Ok(Some("1234001"))
        );
        assert_eq!(
            terminal_in_path("/v1/processing-terminals/1234001/x", "/payroc/v1"),
            Ok(None)
        );
    }

    #[test]
    fn paths_that_could_reach_another_terminal_are_refused() {
        for bad in [
            "/v1/processing-terminals/1234001/../5678001/x",
            "/v1/processing-terminals/1234001/./x",
            "/v1/processing-terminals/1234001/%2e%2e/5678001",
            "/v1/processing-terminals/1234001%2F..%2F5678001/x",
            "/v1/processing-terminals/1234001%2f..%2f5678001/x",
            "/v1/processing-terminals/1234001\\..\\5678001",
            "/v1/processing-terminals/1234001%5c..",
            "/v1//processing-terminals/1234001/x",
            "/v1/processing-terminals//1234001/x",
            "/v1/payments/..",
            // A valid-looking prefix with no usable id.
            "/v1/processing-terminals/",
            "/v1/processing-terminals/123/x",
            "/v1/processing-terminals/12%33001/x",
            "/v1/processing-terminals/1234 001/x",
        ] {
            assert!(terminal_in_path(bad, "/v1").is_err(), "{bad}");
        }
    }

    fn http(path: &str, headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            host: "api.payroc.com".into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            ..HttpRequest::default()
        }
    }

    fn raw(headers: &[(&str, &[u8])]) -> HttpRequest {
        HttpRequest {
            path: "/v1/payments".into(),
            header_map: Some(HeaderMap {
                headers: headers
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).to_owned(),
                        value: String::new(),
                        raw_value: v.to_vec(),
                    })
                    .collect(),
            }),
            ..HttpRequest::default()
        }
    }

    #[test]
    fn the_path_wins_then_the_header_then_nothing() {
        let both = http(
            "/v1/processing-terminals/1234001/x",
            &[(TERMINAL_HEADER, "5678001")],
        );
        assert_eq!(terminal_of(&both, "/v1").unwrap(), "1234001");
        let header = http("/v1/payments", &[(TERMINAL_HEADER, " 5678001 ")]);
        assert_eq!(terminal_of(&header, "/v1").unwrap(), "5678001");
        let upper = http(
            "/v1/payments",
            &[("X-Payroc-Processing-Terminal-Id", "5678001")],
        );
        assert_eq!(terminal_of(&upper, "/v1").unwrap(), "5678001");
        assert!(terminal_of(&http("/v1/payments", &[]), "/v1").is_err());
        assert!(terminal_of(&http("/v1/payments", &[("x-terminal", "1234001")]), "/v1").is_err());
        // A bad path is not rescued by a header.
        let sneaky = http(
            "/v1/processing-terminals/1234001/../5678001",
            &[(TERMINAL_HEADER, "1234001")],
        );
        assert!(terminal_of(&sneaky, "/v1").is_err());
    }

    #[test]
    fn header_values_are_checked_and_raw_headers_read() {
        for bad in ["", "1234001,5678001", "12", "1234001\r\nx: y", "../1234001"] {
            let r = http("/v1/payments", &[(TERMINAL_HEADER, bad)]);
            assert!(terminal_of(&r, "/v1").is_err(), "{bad:?}");
        }
        // encode_raw_headers: values in raw_value, repeats kept apart.
        assert_eq!(
            terminal_of(&raw(&[(TERMINAL_HEADER, b"1234002")]), "/v1").unwrap(),
            "1234002"
        );
        assert_eq!(
            terminal_of(
                &raw(&[(TERMINAL_HEADER, b"1234002"), (TERMINAL_HEADER, b"1234002")]),
                "/v1"
            )
            .unwrap(),
            "1234002"
        );
        assert!(
            terminal_of(
                &raw(&[(TERMINAL_HEADER, b"1234002"), (TERMINAL_HEADER, b"5678001")]),
                "/v1"
            )
            .is_err()
        );
        assert!(terminal_of(&raw(&[(TERMINAL_HEADER, b"\xff1234002")]), "/v1").is_err());
        // `value` is read when `raw_value` is empty.
        let mut r = raw(&[]);
        r.header_map.as_mut().unwrap().headers.push(HeaderValue {
            key: TERMINAL_HEADER.into(),
            value: "5678001".into(),
            raw_value: Vec::new(),
        });
        assert_eq!(terminal_of(&r, "/v1").unwrap(), "5678001");
    }

    #[test]
    fn denials_carry_no_header_but_retry_after() {
        let d =
            Denial::new(HttpStatusCode::Forbidden, Code::PermissionDenied, "no").into_response();
        assert_eq!(
            d.status.as_ref().unwrap().code,
            Code::PermissionDenied as i32
        );
        let Some(HttpResponse::DeniedResponse(denied)) = d.http_response else {
            panic!("{d:?}")
        };
        assert_eq!(denied.status.unwrap().code, 403);
        assert!(denied.headers.is_empty());

        let limited = Denial::from_error(BrokerError::CallerRateLimited {
            caller: "web".into(),
            retry_in: Duration::from_millis(1500),
        });
        assert_eq!(limited.http, HttpStatusCode::TooManyRequests);
        assert_eq!(limited.code, Code::ResourceExhausted);
        assert_eq!(limited.retry_after, Some(Duration::from_millis(1500)));
        let Some(HttpResponse::DeniedResponse(denied)) = limited.into_response().http_response
        else {
            panic!()
        };
        let h = denied.headers[0].header.as_ref().unwrap();
        assert_eq!((h.key.as_str(), h.value.as_str()), ("retry-after", "2"));

        let throttled = Denial::from_error(BrokerError::PeerThrottled {
            retry_in: Duration::from_secs(5),
        });
        assert_eq!(throttled.http, HttpStatusCode::Forbidden);
        assert_eq!(throttled.retry_after, None);
        assert_eq!(
            Denial::from_error(BrokerError::UnknownTerminal("1234009".into())).http,
            HttpStatusCode::NotFound
        );
        let late = Denial::from_error(BrokerError::DeadlineExceeded);
        assert_eq!(
            (late.http, late.code),
            (HttpStatusCode::ServiceUnavailable, Code::Unavailable)
        );
    }
}
