//! payroc-broker: a gRPC credentials broker in front of Payroc's auth.
//!
//! Internal services call `payroc.broker.v1.TokenBroker` for Payroc Bearer
//! tokens and Hosted Fields session tokens; the broker holds the API keys,
//! shares one refreshed Bearer token per key across every caller, and never
//! lets a secret reach a log or an error.
//!
//! Layers (data flows down): a module uses only modules of its own layer or
//! below, and no two modules import each other. `.ci/lib/check_layers.py`
//! reads this table and fails CI on an upward import or a cycle.
//!
//! | layer | module | what it is for |
//! |---|---|---|
//! | 8 | [`server`], [`reload`], [`file_watch`], [`probe`], `sandbox`, `sim`, `fuzzing` | assembly and the CLI's policy: serve, reload, health probe, sandbox |
//! | 7 | [`service`], [`ext_authz`], [`validate`], [`status`] | the gRPC edge: handlers, request validation, the one mapping to `tonic::Status` |
//! | 6 | [`audit`], [`metrics`], [`logging`] | what the broker tells operators: audit events, Prometheus metrics, log lines |
//! | 5 | [`identity`] | who is calling: certificates, forwarded identities, tokens; allow lists and per-caller limits |
//! | 4 | [`transport`] | the port: accept loop, TLS and reload, connection and request limits |
//! | 3 | [`broker`], [`tokens`], [`cell`], [`error`] | the domain: terminal -> credential, the shared token caches, the error enum |
//! | 2 | [`config`] | parse and validate the TOML file; secrets resolved |
//! | 1 | [`payroc`] | HTTP client for Payroc: identity, sessions, problem documents, retries |
//! | 0 | [`clock`], [`rpc`], [`trace`], [`proto`] | injected time and randomness, the list of RPCs, W3C `traceparent`, generated code |

pub mod audit;
pub mod broker;
pub mod cell;
pub mod clock;
pub mod config;
pub mod error;
pub mod ext_authz;
pub mod file_watch;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod payroc;
pub mod probe;
pub mod proto;
pub mod reload;
pub mod rpc;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod server;
pub mod service;
#[cfg(feature = "sandbox")]
pub mod sim;
pub mod status;
pub mod tokens;
pub mod trace;
pub mod transport;
pub mod validate;
