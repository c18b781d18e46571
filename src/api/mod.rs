//! The gRPC edge: decode, call the domain, encode. Request validation turns
//! proto messages into domain values, and [`status`] is the one place where
//! a [`crate::domain::error::BrokerError`] becomes a `tonic::Status`.

pub mod ext_authz;
pub mod status;
pub mod token_broker;
pub mod validate;
