//! The `TokenBroker` gRPC service: authenticate, validate, call the broker,
//! convert to proto types. Errors become statuses in `crate::api::status` only.
//!
//! Identification and the rate limit run on the request headers, before the
//! body is read, in [`TokenBrokerService::admission`] (called by
//! `access::layer::Admission` in front of the service); handlers take the
//! result from the request's extensions with [`TokenBrokerService::admitted`].
//!
//! Every call is audited once ([`crate::obs::audit`]): by the admission when it
//! refuses the call, otherwise by the handler's wrapper in the trait impl,
//! which also runs the handler in the call's span and trace scope.

use std::{pin::Pin, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream as Signal;
use tonic::{Extensions, Request, Response, Status, metadata::MetadataMap};

use crate::{
    access::{Caller, peer_of},
    api::{
        call::{self, Origin},
        state::{Admitted, State},
        validate,
    },
    clock::Clock,
    domain::broker::WatchStart,
    domain::error::BrokerError,
    domain::fingerprint::Fingerprint,
    domain::tokens::{BearerToken, WatchTimer},
    obs::audit::{Audit, Auditor},
    proto::{
        self, BearerReply, CreateSessionRequest, CreateSessionResponse, GetBearerTokenRequest,
        GetBearerTokenResponse, WatchBearerTokenRequest,
    },
    rpc::Rpc,
};

/// The stream of tokens a WatchBearerToken call answers with.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<BearerReply, Status>> + Send>>;

/// The gRPC service. Cheap to clone: state is behind `Arc`.
#[derive(Clone)]
pub struct TokenBrokerService {
    state: Arc<ArcSwap<State>>,
    clock: Clock,
    signals: Arc<Signals>,
    auditor: Auditor,
}

/// What long-lived streams react to, set by the server: shutdown, and
/// reloads (which may remove a watched terminal).
struct Signals {
    shutdown: watch::Sender<bool>,
    /// Bumped after each reload swapped the state.
    reloads: watch::Sender<u64>,
}

/// A Bearer token request that passed every check before the upstream.
struct BearerChecked<'a> {
    state: Arc<State>,
    caller: Caller,
    query: validate::BearerQuery<'a>,
    credential: Arc<crate::domain::broker::Credential>,
}

impl TokenBrokerService {
    pub fn new(state: Arc<ArcSwap<State>>, clock: Clock, auditor: Auditor) -> Self {
        Self {
            state,
            clock,
            auditor,
            signals: Arc::new(Signals {
                shutdown: watch::Sender::new(false),
                reloads: watch::Sender::new(0),
            }),
        }
    }

    /// Shutdown began: open WatchBearerToken streams end with UNAVAILABLE
    /// (graceful shutdown waits for open streams, and these never end).
    pub fn begin_shutdown(&self) {
        self.signals.shutdown.send_replace(true);
    }

    /// A reload swapped the state: watchers check their terminal is still
    /// served.
    pub fn reloaded(&self) {
        self.signals.reloads.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Identifies the caller and takes one call from its rate limit, from
    /// request headers and connection alone.
    pub fn admit(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
    ) -> Result<Admitted, BrokerError> {
        let state = self.state.load_full();
        let peer = peer_of(extensions);
        let caller = state.callers.admit(metadata, peer.as_ref())?;
        Ok(Admitted { state, caller })
    }

    /// [`Self::admit`] for the admission layer, given the request path: a
    /// refusal is audited here, since no handler will run for it.
    pub fn admission(
        &self,
        path: &str,
        metadata: &MetadataMap,
        extensions: &Extensions,
    ) -> Result<Admitted, Status> {
        self.admit(metadata, extensions).map_err(|e| {
            let origin = Origin::from_parts(metadata, extensions);
            call::refuse_early(&self.auditor, Rpc::from_path(path), origin, e)
        })
    }

    /// The admission of `req`; admits it now if nothing did before (a
    /// service used without the admission layer is no less checked).
    pub fn admitted<T>(&self, req: &Request<T>) -> Result<Admitted, BrokerError> {
        match req.extensions().get::<Admitted>() {
            Some(a) => Ok(a.clone()),
            None => self.admit(req.metadata(), req.extensions()),
        }
    }

    /// The checks GetBearerToken and WatchBearerToken share, in the
    /// contract's order: admission (authentication, rate limit), request
    /// fields, allow lists for `rpc`, terminal known. One piece of code, so
    /// the two RPCs cannot drift apart.
    fn check_bearer<'a, T>(
        &self,
        req: &Request<T>,
        rpc: Rpc,
        processing_terminal_id: &'a str,
        min_validity: Option<prost_types::Duration>,
        audit: &mut Audit,
    ) -> Result<BearerChecked<'a>, BrokerError> {
        let Admitted { state, caller } = self.admitted(req)?;
        audit.caller(caller.shared_name());
        audit.terminal(processing_terminal_id);
        let query = validate::bearer(processing_terminal_id, min_validity)
            .map_err(BrokerError::InvalidArgument)?;
        caller.authorize(rpc, query.processing_terminal_id)?;
        let credential = Arc::clone(state.broker.credential(query.processing_terminal_id)?);
        audit.credential(&credential.name);
        Ok(BearerChecked {
            state,
            caller,
            query,
            credential,
        })
    }

    async fn bearer(
        &self,
        req: Request<GetBearerTokenRequest>,
        audit: &mut Audit,
    ) -> Result<BearerReply, BrokerError> {
        let deadline = call::deadline(req.metadata(), &self.clock);
        let msg = req.get_ref();
        let checked = self.check_bearer(
            &req,
            Rpc::GetBearerToken,
            &msg.processing_terminal_id,
            msg.min_validity,
            audit,
        )?;
        let grant = checked
            .state
            .broker
            .bearer(&checked.credential, checked.query.min_validity, deadline)
            .await?;
        audit.upstream_status(grant.upstream_status);
        let response = bearer_response(&grant.token, &grant.credential);
        audit.token(grant.token.fingerprint);
        Ok(response)
    }

    /// The audit of a WatchBearerToken call covers its start: the first
    /// token handed out (or the refusal). How the stream ends later is
    /// logged at DEBUG, not as a second audit event.
    async fn watch(
        &self,
        req: Request<WatchBearerTokenRequest>,
        audit: &mut Audit,
    ) -> Result<WatchStream, BrokerError> {
        let deadline = call::deadline(req.metadata(), &self.clock);
        let msg = req.get_ref();
        let BearerChecked {
            state,
            caller,
            query,
            credential,
        } = self.check_bearer(
            &req,
            Rpc::WatchBearerToken,
            &msg.processing_terminal_id,
            msg.min_validity,
            audit,
        )?;
        let (upstream_status, start) = state
            .broker
            .watch(&credential, query.min_validity, deadline)
            .await;
        audit.upstream_status(upstream_status);
        let WatchStart {
            first,
            changes,
            min_validity,
        } = start?;
        let response = bearer_response(&first, &credential.name);
        audit.token(first.fingerprint);
        let watcher = Watcher {
            service: self.clone(),
            caller,
            terminal: query.processing_terminal_id.to_owned(),
            credential,
            changes,
            last: first,
            min_validity,
        };
        Ok(watcher.into_stream(response))
    }

    async fn session(
        &self,
        req: Request<CreateSessionRequest>,
        audit: &mut Audit,
    ) -> Result<CreateSessionResponse, BrokerError> {
        let deadline = call::deadline(req.metadata(), &self.clock);
        let Admitted { state, caller } = self.admitted(&req)?;
        audit.caller(caller.shared_name());
        audit.terminal(&req.get_ref().processing_terminal_id);
        let query = validate::session(req.into_inner()).map_err(BrokerError::InvalidArgument)?;
        caller.authorize(Rpc::CreateSession, &query.processing_terminal_id)?;
        // Unknown terminals fail before a key is generated or a token fetched.
        let credential = Arc::clone(state.broker.credential(&query.processing_terminal_id)?);
        audit.credential(&credential.name);
        // The caller's share of the session bulkhead, held until Payroc answers.
        let _slot = caller.session_slot()?;

        let request = state.broker.session_request(query);
        audit.idempotency_key(request.idempotency_key);
        let grant = state.broker.session(&credential, request, deadline).await?;
        audit.upstream_status(Some(grant.session.status));
        let session_token = secrecy::ExposeSecret::expose_secret(&grant.session.token);
        // Each session token is new: its fingerprint is computed here, once.
        audit.token(Fingerprint::of(session_token));
        Ok(CreateSessionResponse {
            processing_terminal_id: grant.session.processing_terminal_id,
            session_token: session_token.to_owned(),
            expires_at: Some(grant.session.expires_at.into()),
            idempotency_key: grant.idempotency_key.hyphenated().to_string(),
            lib_version: grant.lib_version,
        })
    }
}

/// `t`'s answer, encoded the first time `t` is handed out and kept with it.
/// `credential` is the one `t` was fetched for, the same every time.
fn bearer_response(t: &BearerToken, credential: &str) -> BearerReply {
    BearerReply::from_encoded(t.encoded.get_or_init(|| {
        BearerReply::encode(&GetBearerTokenResponse {
            access_token: secrecy::ExposeSecret::expose_secret(&t.access_token).to_owned(),
            token_type: t.token_type.clone(),
            expires_at: Some(t.expires_at_wall.into()),
            scopes: t.scopes.clone(),
            credential: credential.to_owned(),
        })
    }))
}

/// One WatchBearerToken stream after its first token.
struct Watcher {
    service: TokenBrokerService,
    /// Re-authorized after each reload: a caller whose access a reload took
    /// away stops receiving tokens.
    caller: Caller,
    terminal: String,
    credential: Arc<crate::domain::broker::Credential>,
    changes: watch::Receiver<Option<Arc<BearerToken>>>,
    last: Arc<BearerToken>,
    min_validity: Duration,
}

/// Where a watch stream is: its first token still to send, following the
/// cache, or ended.
enum Follow {
    First(BearerReply, Box<Following>),
    Next(Box<Following>),
    Ended,
}

/// A watcher and the signals it follows besides its credential's cache.
///
/// The signals are streams, not receivers: a stream keeps its wait (and its
/// place in the sender's list of waiters) from one token to the next, where
/// `changed()` per token joined and left both lists for every watcher each
/// time a token was sent to them all.
struct Following {
    watcher: Watcher,
    /// The flag's value now, then each change.
    shutdown: Signal<bool>,
    /// Each reload after the stream began.
    reloads: Signal<u64>,
    timer: WatchTimer,
}

impl Watcher {
    /// The stream itself follows the cache, when tonic polls it: no task
    /// and no channel per watcher, and a client that does not read is not
    /// read for (tonic polls for the next token only once h2 has taken the
    /// last). Ends with the error that ended it, or when the client goes
    /// away (the stream is dropped).
    fn into_stream(self, first: BearerReply) -> WatchStream {
        let following = Following {
            shutdown: Signal::new(self.service.signals.shutdown.subscribe()),
            reloads: Signal::from_changes(self.service.signals.reloads.subscribe()),
            timer: None,
            watcher: self,
        };
        let start = Follow::First(first, Box::new(following));
        Box::pin(futures_util::stream::unfold(start, |state| async move {
            match state {
                Follow::First(first, f) => Some((Ok(first), Follow::Next(f))),
                Follow::Next(mut f) => match f.next().await {
                    Ok(token) => Some((Ok(token), Follow::Next(f))),
                    Err(end) => {
                        let status = Status::from(end);
                        tracing::debug!(code = ?status.code(), error = status.message(), "watch stream ended");
                        Some((Err(status), Follow::Ended))
                    }
                },
                Follow::Ended => None,
            }
        }))
    }
}

impl Following {
    /// The next token to send, or the error that ends the stream.
    async fn next(&mut self) -> Result<BearerReply, BrokerError> {
        let Following {
            watcher: this,
            shutdown,
            reloads,
            timer,
        } = self;
        loop {
            tokio::select! {
                biased;
                down = shutdown.next() => {
                    // Ended: the server is going away all the same.
                    if down != Some(false) {
                        return Err(BrokerError::ShuttingDown);
                    }
                }
                reloaded = reloads.next() => {
                    if reloaded.is_none() {
                        return Err(BrokerError::ShuttingDown);
                    }
                    let state = this.service.state.load_full();
                    // The checks of a new call, in the same order.
                    let Some(caller) = state.callers.by_name(this.caller.name(), this.caller.via()) else {
                        return Err(BrokerError::Unauthenticated(
                            "the caller is no longer configured",
                        ));
                    };
                    caller.authorize(Rpc::WatchBearerToken, &this.terminal)?;
                    this.caller = caller;
                    match state.broker.credential(&this.terminal) {
                        Err(e) => return Err(e),
                        // Another credential (or the same one with a new
                        // key) serves it now: follow that cache; its token
                        // differs from the last one sent, so it goes out.
                        Ok(c) if !Arc::ptr_eq(c, &this.credential) => {
                            this.credential = Arc::clone(c);
                            this.changes = this.credential.subscribe();
                        }
                        Ok(_) => {}
                    }
                }
                next = this.credential.replacement(&mut this.changes, &this.last, this.min_validity, timer) => {
                    let token = next?;
                    let response = bearer_response(&token, &this.credential.name);
                    this.last = token;
                    return Ok(response);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl proto::token_broker_server::TokenBroker for TokenBrokerService {
    async fn get_bearer_token(
        &self,
        request: Request<GetBearerTokenRequest>,
    ) -> Result<Response<BearerReply>, Status> {
        let origin = Origin::of(&request);
        call::run(
            &self.auditor,
            Some(Rpc::GetBearerToken),
            origin,
            async |audit| {
                self.bearer(request, audit)
                    .await
                    .map_err(|e| call::refused(audit, e))
            },
        )
        .await
        .map(Response::new)
    }

    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        let origin = Origin::of(&request);
        call::run(
            &self.auditor,
            Some(Rpc::CreateSession),
            origin,
            async |audit| {
                self.session(request, audit)
                    .await
                    .map_err(|e| call::refused(audit, e))
            },
        )
        .await
        .map(Response::new)
    }

    type WatchBearerTokenStream = WatchStream;

    async fn watch_bearer_token(
        &self,
        request: Request<WatchBearerTokenRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let origin = Origin::of(&request);
        call::run(
            &self.auditor,
            Some(Rpc::WatchBearerToken),
            origin,
            async |audit| {
                self.watch(request, audit)
                    .await
                    .map_err(|e| call::refused(audit, e))
            },
        )
        .await
        .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::testing::{FLOOR, Script, allocations, creds};

    /// What the broker adds to a cached GetBearerToken past the cache hit
    /// (which allocates nothing either, see `domain::tokens`): the reply,
    /// the same shared bytes each time once the token's first call encoded
    /// them.
    #[tokio::test(start_paused = true)]
    async fn a_cached_tokens_reply_is_encoded_once_and_then_allocates_nothing() {
        let script = Script::answers(&[Ok(3600)]);
        let c = creds(&script, 300);
        let token = c.bearer(FLOOR, None).await.unwrap();
        let (first, n) = allocations(|| bearer_response(&token, "acme"));
        assert!(n > 0, "the first reply is encoded, which allocates");
        let (same, n) = allocations(|| {
            (0..100)
                .map(|_| bearer_response(&token, "acme"))
                .all(|r| r == first)
        });
        assert!(same, "every reply is the first one's bytes");
        assert_eq!(n, 0, "allocations for 100 replies of a cached token");
    }
}
