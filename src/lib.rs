//! payroc-broker: a gRPC credentials broker in front of Payroc's auth.
//!
//! Internal services call `payroc.broker.v1.TokenBroker` for Payroc Bearer
//! tokens and Hosted Fields session tokens; the broker holds the API keys,
//! shares one refreshed Bearer token per key across every caller, and never
//! lets a secret reach a log or an error.
//!
//! Layout (data flows down):
//!
//! | module | what it is for |
//! |---|---|
//! | [`config`] | parse and validate the TOML file; secrets resolved |
//! | [`payroc`] | HTTP client for Payroc: identity, sessions, problem documents, retries |
//! | [`cell`] | the single-flight cell: one shared value, one load at a time, lock-free reads |
//! | [`tokens`] | per-credential Bearer token cache: refresh-ahead, floor, invalidation |
//! | [`broker`] | domain logic: terminal -> credential, the 401 refresh-and-retry |
//! | [`identity`] | who is calling: certificates, forwarded identities, tokens; allow lists and per-caller limits |
//! | [`validate`] | request validation: proto messages in, domain values or field violations out |
//! | [`service`] | gRPC handlers: authenticate, validate, call the broker, proto conversion |
//! | [`ext_authz`] | Envoy's external authorization: attach a Bearer token to requests bound for Payroc |
//! | [`error`], [`status`] | the error enum, and its one mapping to `tonic::Status` |
//! | [`server`] | assembly: health, reflection, graceful shutdown |
//! | [`reload`], [`file_watch`] | when `serve` reloads: SIGHUP, or a changed config, key or TLS file |
//! | [`audit`] | one audit event per call, and the RPC metrics |
//! | [`metrics`] | Prometheus counters, gauges read at scrape time, `/metrics` |
//! | [`logging`] | text or JSON log lines through a bounded queue, never blocking |
//! | [`trace`] | W3C `traceparent`: kept for the RPC, passed on to Payroc |
//! | [`transport`] | the port: accept loop, TLS and reload, connection and request limits |
//! | [`probe`] | `payroc-broker health`: one gRPC health check, as an exit status |
//! | `sandbox` | the broker wired to the simulator, for trying it out (feature `sandbox`) |
//! | [`clock`] | injected time and randomness |
//! | [`proto`] | generated code, quarantined |

pub mod audit;
pub mod broker;
pub mod cell;
pub mod clock;
pub mod config;
pub mod error;
pub mod ext_authz;
pub mod file_watch;
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod payroc;
pub mod probe;
pub mod proto;
pub mod reload;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod server;
pub mod service;
pub mod status;
pub mod tokens;
pub mod trace;
pub mod transport;
pub mod validate;
