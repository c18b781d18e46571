//! The domain: which credential serves a terminal, the shared Bearer token
//! caches, session tokens with the one refresh-and-retry, and every way a
//! call can fail, as data.
//!
//! It speaks domain types and [`error::BrokerError`]; it knows nothing of
//! gRPC, HTTP servers, callers' identities or metrics.

pub mod broker;
pub mod cell;
pub mod error;
pub mod fingerprint;
pub mod tokens;
