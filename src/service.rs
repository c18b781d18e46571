//! The `TokenBroker` gRPC service: authenticate, validate, call the broker,
//! convert to proto types. Errors become statuses in `crate::status` only.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    auth::Callers,
    broker::Broker,
    clock::Clock,
    config::Rpc,
    error::{BrokerError, FieldViolation},
    payroc::{self, Scenario, SessionRequest},
    proto::{
        self, CreateSessionRequest, CreateSessionResponse, GetBearerTokenRequest,
        GetBearerTokenResponse,
    },
};

/// The broker gives up a little before the caller's deadline, so that its
/// DEADLINE_EXCEEDED (with a message saying what it was waiting for) reaches
/// the caller before the caller's own timer fires, and before tonic's server
/// timer, which would answer a bare CANCELLED. 5 % of the timeout, within
/// [2 ms, 100 ms].
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(2), Duration::from_millis(100))
}

/// What every RPC reads: swapped whole on reload, so an RPC sees one
/// consistent configuration from start to end.
pub struct State {
    pub broker: Broker,
    pub callers: Callers,
}

/// The gRPC service. Cheap to clone: state is behind `Arc`.
#[derive(Clone)]
pub struct TokenBrokerService {
    state: Arc<ArcSwap<State>>,
    clock: Clock,
}

impl TokenBrokerService {
    pub fn new(state: Arc<ArcSwap<State>>, clock: Clock) -> Self {
        Self { state, clock }
    }

    async fn bearer(
        &self,
        req: Request<GetBearerTokenRequest>,
    ) -> Result<GetBearerTokenResponse, BrokerError> {
        let deadline = deadline(&req, &self.clock);
        let state = self.state.load_full();
        let caller = state.callers.authenticate(req.metadata())?;
        let msg = req.get_ref();
        let mut bad = Vec::new();
        check_terminal(&msg.processing_terminal_id, &mut bad);
        let min_validity = match msg.min_validity {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                bad.push(FieldViolation::new("min_validity", "must not be negative"));
                None
            }
            Some(d) => match Duration::try_from(d) {
                Ok(d) => Some(d),
                Err(_) => {
                    bad.push(FieldViolation::new(
                        "min_validity",
                        "is not a valid duration",
                    ));
                    None
                }
            },
        };
        if !bad.is_empty() {
            return Err(BrokerError::InvalidArgument(bad));
        }
        let terminal = msg.processing_terminal_id.as_str();
        caller.authorize(Rpc::GetBearerToken, terminal)?;
        let grant = state
            .broker
            .bearer(terminal, min_validity, deadline)
            .await?;
        tracing::info!(
            rpc = "GetBearerToken",
            caller = caller.name(),
            terminal,
            credential = %grant.credential,
            "issued a Bearer token"
        );
        let t = &grant.token;
        Ok(GetBearerTokenResponse {
            access_token: secrecy::ExposeSecret::expose_secret(&t.access_token).to_owned(),
            token_type: t.token_type.clone(),
            expires_at: Some(t.expires_at_wall.into()),
            scopes: t.scopes.clone(),
            credential: grant.credential.to_string(),
        })
    }

    async fn session(
        &self,
        req: Request<CreateSessionRequest>,
    ) -> Result<CreateSessionResponse, BrokerError> {
        let deadline = deadline(&req, &self.clock);
        let state = self.state.load_full();
        let caller = state.callers.authenticate(req.metadata())?;
        let msg = req.into_inner();
        let mut bad = Vec::new();
        check_terminal(&msg.processing_terminal_id, &mut bad);
        let scenario = match proto::Scenario::try_from(msg.scenario) {
            Ok(proto::Scenario::Payment) => Some(Scenario::Payment),
            Ok(proto::Scenario::Tokenization) => Some(Scenario::Tokenization),
            Ok(proto::Scenario::Unspecified) => {
                bad.push(FieldViolation::new(
                    "scenario",
                    "is required: SCENARIO_PAYMENT or SCENARIO_TOKENIZATION",
                ));
                None
            }
            Err(_) => {
                bad.push(FieldViolation::new(
                    "scenario",
                    format!("{} is not a Scenario value", msg.scenario),
                ));
                None
            }
        };
        if !msg.lib_version.is_empty() && !payroc::is_valid_lib_version(&msg.lib_version) {
            bad.push(FieldViolation::new(
                "lib_version",
                format!(
                    "`{}` does not match Payroc's pattern (digits like 1.7.0.261457, optionally 1.2.0-beta.135020)",
                    msg.lib_version.chars().take(64).collect::<String>()
                ),
            ));
        }
        if !msg.secure_token_id.is_empty()
            && !payroc::is_valid_secure_token_id(&msg.secure_token_id)
        {
            bad.push(FieldViolation::new(
                "secure_token_id",
                "must be 1 to 200 characters",
            ));
        }
        let idempotency_key = if msg.idempotency_key.is_empty() {
            None
        } else {
            match Uuid::try_parse(&msg.idempotency_key) {
                Ok(u) if u.get_version_num() == 4 && u.get_variant() == uuid::Variant::RFC4122 => {
                    Some(u)
                }
                _ => {
                    bad.push(FieldViolation::new(
                        "idempotency_key",
                        "must be a UUID v4, or empty to have one generated",
                    ));
                    None
                }
            }
        };
        let Some(scenario) = scenario.filter(|_| bad.is_empty()) else {
            return Err(BrokerError::InvalidArgument(bad));
        };
        caller.authorize(Rpc::CreateSession, &msg.processing_terminal_id)?;
        // Unknown terminals fail before a key is generated or a token fetched.
        state.broker.credential(&msg.processing_terminal_id)?;

        let request = SessionRequest {
            processing_terminal_id: msg.processing_terminal_id,
            scenario,
            lib_version: if msg.lib_version.is_empty() {
                state.broker.lib_version.clone()
            } else {
                msg.lib_version
            },
            secure_token_id: Some(msg.secure_token_id).filter(|s| !s.is_empty()),
            idempotency_key: idempotency_key.unwrap_or_else(|| state.broker.new_idempotency_key()),
        };
        let grant = state.broker.session(request, deadline).await?;
        tracing::info!(
            rpc = "CreateSession",
            caller = caller.name(),
            terminal = %grant.session.processing_terminal_id,
            idempotency_key = %grant.idempotency_key,
            "created a Hosted Fields session"
        );
        Ok(CreateSessionResponse {
            processing_terminal_id: grant.session.processing_terminal_id,
            session_token: secrecy::ExposeSecret::expose_secret(&grant.session.token).to_owned(),
            expires_at: Some(grant.session.expires_at.into()),
            idempotency_key: grant.idempotency_key.hyphenated().to_string(),
            lib_version: grant.lib_version,
        })
    }
}

fn check_terminal(id: &str, bad: &mut Vec<FieldViolation>) {
    if id.is_empty() {
        bad.push(FieldViolation::new("processing_terminal_id", "is required"));
    } else if !payroc::is_valid_terminal_id(id) {
        bad.push(FieldViolation::new(
            "processing_terminal_id",
            format!("must be 4 to 50 characters (got {})", id.chars().count()),
        ));
    }
}

/// The caller's deadline, from the `grpc-timeout` header.
fn deadline<T>(req: &Request<T>, clock: &Clock) -> Option<Instant> {
    let raw = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(raw)?;
    Some(clock.now() + timeout.saturating_sub(deadline_margin(timeout)))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl proto::token_broker_server::TokenBroker for TokenBrokerService {
    async fn get_bearer_token(
        &self,
        request: Request<GetBearerTokenRequest>,
    ) -> Result<Response<GetBearerTokenResponse>, Status> {
        self.bearer(request)
            .await
            .map(Response::new)
            .map_err(log_error("GetBearerToken"))
    }

    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        self.session(request)
            .await
            .map(Response::new)
            .map_err(log_error("CreateSession"))
    }
}

fn log_error(rpc: &'static str) -> impl FnOnce(BrokerError) -> Status {
    move |e| {
        let status = Status::from(e);
        tracing::info!(rpc, code = ?status.code(), message = status.message(), "RPC failed");
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5s"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }
}
