//! The broker's domain logic: which credential serves a terminal, Bearer
//! tokens from the shared cache, and session tokens with the one
//! refresh-and-retry on a 401.
//!
//! It speaks domain types and [`BrokerError`]; gRPC lives in `service`.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    clock::{Clock, SharedEntropy},
    config::Config,
    error::BrokerError,
    payroc::{PayrocClient, Session, SessionRequest, UpstreamError},
    tokens::{BearerToken, CredentialTokens, TokenPolicy, Tokens},
};

/// A credential's token cache backed by Payroc.
pub type Credential = CredentialTokens<Arc<PayrocClient>>;

/// A Bearer token and the credential it belongs to.
pub struct BearerGrant {
    pub credential: Arc<str>,
    pub token: Arc<BearerToken>,
}

/// A session token and what was sent to obtain it.
pub struct SessionGrant {
    pub session: Session,
    pub idempotency_key: Uuid,
    pub lib_version: String,
}

/// Shared state behind every RPC.
pub struct Broker {
    tokens: Tokens<Arc<PayrocClient>>,
    client: Arc<PayrocClient>,
    /// Default `libVersion` for CreateSession.
    pub lib_version: String,
    /// Validity a token must have left when the caller names none.
    pub floor: Duration,
    entropy: SharedEntropy,
}

impl Broker {
    pub fn new(
        config: &Config,
        clock: Clock,
        entropy: SharedEntropy,
    ) -> Result<Self, reqwest::Error> {
        let client = Arc::new(PayrocClient::new(
            &config.payroc,
            clock.clone(),
            Arc::clone(&entropy),
        )?);
        let policy = TokenPolicy {
            refresh_before_expiry: config.payroc.refresh_before_expiry,
        };
        Ok(Self {
            tokens: Tokens::new(&config.credentials, Arc::clone(&client), policy, &clock),
            client,
            lib_version: config.payroc.lib_version.clone(),
            floor: config.payroc.min_token_validity,
            entropy,
        })
    }

    /// The credential serving `terminal`.
    pub fn credential(&self, terminal: &str) -> Result<&Arc<Credential>, BrokerError> {
        self.tokens
            .for_terminal(terminal)
            .ok_or_else(|| BrokerError::UnknownTerminal(terminal.to_owned()))
    }

    /// Every configured credential.
    pub fn credentials(&self) -> &[Arc<Credential>] {
        self.tokens.credentials()
    }

    /// A fresh random Idempotency-Key.
    pub fn new_idempotency_key(&self) -> Uuid {
        self.entropy.uuid_v4()
    }

    /// A Bearer token for `terminal` with at least `min_validity` left
    /// (default: the configured floor).
    pub async fn bearer(
        &self,
        terminal: &str,
        min_validity: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<BearerGrant, BrokerError> {
        let credential = self.credential(terminal)?;
        let token = credential
            .bearer(min_validity.unwrap_or(self.floor), deadline)
            .await?;
        Ok(BearerGrant {
            credential: Arc::clone(&credential.name),
            token,
        })
    }

    /// Creates a session. A 401 means Payroc no longer accepts the cached
    /// Bearer token (revoked early, or clocks disagree): drop it (only if it is
    /// still the cached one, so concurrent 401s cause one refresh), fetch a new
    /// one and retry once with the same Idempotency-Key and body.
    pub async fn session(
        &self,
        request: SessionRequest,
        deadline: Option<Instant>,
    ) -> Result<SessionGrant, BrokerError> {
        let credential = self.credential(&request.processing_terminal_id)?;
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
