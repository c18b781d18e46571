//! The edge: decode, call the domain, encode. Every handler runs in one
//! [`call`] frame (audit, span, trace scope, deadline); request validation
//! turns proto messages into domain values, and [`status`] is the one place
//! where a [`crate::domain::error::BrokerError`] becomes a `tonic::Status`.

pub(crate) mod call;
pub mod ext_authz;
pub mod identity;
pub mod state;
pub mod status;
pub mod token_broker;
pub mod validate;
