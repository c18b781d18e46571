//! The broker's domain logic: which credential serves a terminal, Bearer
//! tokens from the shared cache, and session tokens with the one
//! refresh-and-retry on a 401.
//!
//! It speaks domain types and [`BrokerError`]; gRPC lives in `api`.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};
use uuid::Uuid;

use crate::{
    clock::{Clock, SharedEntropy},
    config::{Config, PayrocConfig},
    domain::error::BrokerError,
    domain::tokens::{BearerToken, CredentialTokens, TokenPolicy, Tokens, TokensSetup},
    payroc::{AttemptObserver, PayrocClient, Scenario, Session, SessionRequest, UpstreamError},
};

/// A credential's token cache backed by Payroc.
pub type Credential = CredentialTokens<Arc<PayrocClient>>;

/// A Bearer token and the credential it belongs to.
pub struct BearerGrant {
    pub credential: Arc<str>,
    pub token: Arc<BearerToken>,
    /// The identity answer's HTTP status, when this call waited for one.
    pub upstream_status: Option<u16>,
}

/// The start of a WatchBearerToken stream: the first token, and the
/// subscription its replacements arrive on.
pub struct WatchStart {
    pub first: Arc<BearerToken>,
    pub changes: watch::Receiver<Option<Arc<BearerToken>>>,
    /// The validity every token sent must have: the request's, else the floor.
    pub min_validity: Duration,
}

/// A valid CreateSession request, before the defaults are filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionQuery {
    pub processing_terminal_id: String,
    pub scenario: Scenario,
    /// `None`: the configured default.
    pub lib_version: Option<String>,
    pub secure_token_id: Option<String>,
    /// `None`: generate one.
    pub idempotency_key: Option<Uuid>,
}

/// A session token and what was sent to obtain it.
pub struct SessionGrant {
    pub session: Session,
    pub idempotency_key: Uuid,
    pub lib_version: String,
}

/// The `[payroc]` settings a token cache fetches and schedules with; the
/// others (API URL, libVersion, limits) do not touch Bearer tokens.
fn identity_settings(p: &PayrocConfig) -> impl PartialEq + use<> {
    (
        p.identity_url.clone(),
        p.request_timeout,
        p.max_attempts,
        p.refresh_before_expiry,
        p.min_token_validity,
        p.identity_backoff,
        p.identity_max_backoff,
    )
}

/// Shared state behind every RPC. A reload builds a new one (keeping the
/// token caches of unchanged credentials) and swaps it in; RPCs in flight
/// finish on the one they started with.
pub struct Broker {
    tokens: Tokens<Arc<PayrocClient>>,
    client: Arc<PayrocClient>,
    payroc: PayrocConfig,
    /// Bulkhead: session requests in flight towards Payroc.
    sessions_gate: Arc<Semaphore>,
    /// Default `libVersion` for CreateSession.
    pub lib_version: String,
    /// Validity a token must have left when the caller names none.
    pub floor: Duration,
    entropy: SharedEntropy,
}

impl Broker {
    /// Builds the broker for `config`. With `previous` (a reload), credentials
    /// whose name and API key are unchanged keep their cached tokens, unless
    /// a setting they fetch with changed (identity URL, timeouts, refresh
    /// timing): a new libVersion or API URL keeps every token. Each upstream
    /// HTTP attempt is told to `observer`.
    pub fn new(
        config: &Config,
        clock: Clock,
        entropy: SharedEntropy,
        previous: Option<&Broker>,
        observer: Arc<dyn AttemptObserver>,
    ) -> Result<Self, reqwest::Error> {
        // Token caches survive when what they fetch with is unchanged; the
        // HTTP client, when nothing in [payroc] changed; the session bulkhead,
        // when its limit did not (a new one would admit a second full load
        // beside the requests still holding the old one).
        let same_identity =
            previous.filter(|p| identity_settings(&p.payroc) == identity_settings(&config.payroc));
        let same_gate = previous
            .filter(|p| p.payroc.max_concurrent_sessions == config.payroc.max_concurrent_sessions);
        let previous = previous.filter(|p| p.payroc == config.payroc);
        let client = match previous {
            Some(p) => Arc::clone(&p.client),
            None => Arc::new(
                PayrocClient::new(&config.payroc, clock.clone(), Arc::clone(&entropy))?
                    .with_observer(observer),
            ),
        };
        let p = &config.payroc;
        let tokens = Tokens::new(
            &config.credentials,
            TokensSetup {
                source: Arc::clone(&client),
                policy: TokenPolicy {
                    refresh_before_expiry: p.refresh_before_expiry,
                    floor: p.min_token_validity,
                    failure_backoff: p.identity_backoff,
                    max_failure_backoff: p.identity_max_backoff,
                },
                clock: &clock,
                entropy: &entropy,
                warm_start_concurrency: p.warm_start_concurrency,
                warm_start_spread: p.warm_start_spread,
            },
            same_identity.map(|p| &p.tokens),
        );
        Ok(Self {
            tokens,
            client,
            payroc: config.payroc.clone(),
            sessions_gate: match same_gate {
                Some(prev) => Arc::clone(&prev.sessions_gate),
                None => Arc::new(Semaphore::new(p.max_concurrent_sessions)),
            },
            lib_version: p.lib_version.clone(),
            floor: p.min_token_validity,
            entropy,
        })
    }

    /// Completes once every credential's first fetch has finished.
    pub async fn warmed(&self) {
        self.tokens.warmed().await;
    }

    /// The credential serving `terminal`.
    pub fn credential(&self, terminal: &str) -> Result<&Arc<Credential>, BrokerError> {
        self.tokens
            .for_terminal(terminal)
            .ok_or_else(|| BrokerError::UnknownTerminal(terminal.to_owned()))
    }

    /// The credential configured as `name`, and the terminals it serves.
    pub fn credential_named(
        &self,
        name: &str,
    ) -> Result<(&Arc<Credential>, &[String]), BrokerError> {
        self.tokens
            .named(name)
            .ok_or_else(|| BrokerError::UnknownCredential(name.to_owned()))
    }

    /// `payroc.api_url`: ext_authz attaches tokens to requests for it only.
    pub fn api_url(&self) -> &url::Url {
        &self.payroc.api_url
    }

    /// Every configured credential.
    pub fn credentials(&self) -> &[Arc<Credential>] {
        self.tokens.credentials()
    }

    /// Session requests to Payroc in flight now (the bulkhead's use).
    pub fn sessions_in_flight(&self) -> usize {
        self.payroc
            .max_concurrent_sessions
            .saturating_sub(self.sessions_gate.available_permits())
    }

    /// The session request for `query`, with the defaults filled in: the
    /// configured `libVersion`, and a fresh random Idempotency-Key.
    pub fn session_request(&self, query: SessionQuery) -> SessionRequest {
        SessionRequest {
            processing_terminal_id: query.processing_terminal_id,
            scenario: query.scenario,
            lib_version: query
                .lib_version
                .unwrap_or_else(|| self.lib_version.clone()),
            secure_token_id: query.secure_token_id,
            idempotency_key: query
                .idempotency_key
                .unwrap_or_else(|| self.entropy.uuid_v4()),
        }
    }

    /// A Bearer token of `credential` (looked up once, by the caller, with
    /// [`Broker::credential`]) with at least `min_validity` left (default:
    /// the configured floor).
    pub async fn bearer(
        &self,
        credential: &Arc<Credential>,
        min_validity: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<BearerGrant, BrokerError> {
        let (token, upstream_status) = credential
            .bearer_observed(min_validity.unwrap_or(self.floor), deadline)
            .await?;
        Ok(BearerGrant {
            credential: Arc::clone(&credential.name),
            token,
            upstream_status,
        })
    }

    /// Starts watching `credential`'s token with at least `min_validity`
    /// left (default: the floor). Also returns the identity answer's HTTP
    /// status when this call waited for one, even when the watch is then
    /// refused: the audit records it either way.
    pub async fn watch(
        &self,
        credential: &Arc<Credential>,
        min_validity: Option<Duration>,
        deadline: Option<Instant>,
    ) -> (Option<u16>, Result<WatchStart, BrokerError>) {
        let min_validity = min_validity.unwrap_or(self.floor);
        // Subscribed before the first token is had, so no replacement slips
        // between the two.
        let changes = credential.subscribe();
        let (first, upstream_status) =
            match credential.bearer_observed(min_validity, deadline).await {
                Ok(got) => got,
                Err(e) => return (None, Err(e.into())),
            };
        let start = credential
            .check_watchable(min_validity, &first)
            .map(|()| WatchStart {
                first,
                changes,
                min_validity,
            })
            .map_err(BrokerError::from);
        (upstream_status, start)
    }

    /// Creates a session. A 401 means Payroc no longer accepts the cached
    /// Bearer token (revoked early, or clocks disagree): drop it (only if it is
    /// still the cached one, so concurrent 401s cause one refresh), fetch a new
    /// one and retry once with the same Idempotency-Key and body.
    pub async fn session(
        &self,
        credential: &Arc<Credential>,
        request: SessionRequest,
        deadline: Option<Instant>,
    ) -> Result<SessionGrant, BrokerError> {
        // Shed rather than queue: a queue in front of a slow Payroc only turns
        // into timeouts later, with more memory held.
        let _permit = self.sessions_gate.try_acquire().map_err(|_| {
            BrokerError::Overloaded(format!(
                "{} session requests to Payroc are already in flight",
                self.payroc.max_concurrent_sessions
            ))
        })?;
        let prepared = self.client.prepare_session(request);
        let token = credential.bearer(self.floor, deadline).await?;
        let session = match self
            .client
            .create_session(&token.access_token, &prepared, deadline)
            .await
        {
            Err(UpstreamError::Status { status: 401, .. }) => {
                credential.invalidate(&token);
                let fresh = credential.bearer(self.floor, deadline).await?;
                match self
                    .client
                    .create_session(&fresh.access_token, &prepared, deadline)
                    .await
                {
                    Err(e @ UpstreamError::Status { status: 401, .. }) => {
                        return Err(BrokerError::SessionUnauthorizedAfterRefresh(e));
                    }
                    other => other?,
                }
            }
            other => other?,
        };
        Ok(SessionGrant {
            session,
            idempotency_key: prepared.request.idempotency_key,
            lib_version: prepared.request.lib_version,
        })
    }
}
