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
//! | 8 | [`app`], `fuzzing` | assembly and the CLI's policy: serve, reload, health probe, sandbox; the fuzz harnesses' entry points |
//! | 7 | [`api`] | the gRPC edge: handlers, request validation, the one mapping to `tonic::Status` |
//! | 6 | [`obs`] | what operators see: audit events, Prometheus metrics, log lines, trace spans (feature `otlp`) |
//! | 5 | [`access`] | who is calling: certificates, forwarded identities, tokens; allow lists and per-caller limits |
//! | 4 | [`transport`] | the port: accept loop, TLS and reload, connection and request limits |
//! | 3 | [`domain`] | terminal -> credential, the shared token caches, sessions, the error enum |
//! | 2 | [`config`] | parse and validate the TOML file; secrets resolved |
//! | 1 | [`payroc`] | HTTP client for Payroc: identity, sessions, problem documents, retries |
//! | 0 | [`chain`], [`clock`], [`rpc`], [`sync`], [`trace`], [`proto`] | an error's causes on one line, injected time and randomness, the list of RPCs, the one poison-tolerant lock, W3C `traceparent`, generated code |
//!
//! `trace` sits at the bottom rather than with observability: the Payroc
//! client sends the caller's `traceparent` upstream, so the value type must
//! be below it.

pub(crate) mod access;
pub(crate) mod api;
pub mod app;
pub(crate) mod chain;
pub mod clock;
pub mod config;
pub(crate) mod domain;
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
pub mod obs;
pub(crate) mod payroc;
pub mod proto;
pub(crate) mod rpc;
pub(crate) mod sync;
pub(crate) mod trace;
pub mod transport;
