//! Generated protobuf and gRPC code, quarantined here. The rest of the crate
//! converts to domain types at the edge (`api`), so regenerated code never
//! leaks into logic.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("payroc.broker.v1");

/// Encoded `FileDescriptorSet` of the broker's proto and its imports, served by
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("token_broker_descriptor");

/// Encoded `FileDescriptorSet` of `google/rpc/error_details.proto` (and its
/// import `google/protobuf/duration.proto`), served by reflection so that
/// clients can decode the rich error details the broker sends.
pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("error_details_descriptor");

/// Encoded `FileDescriptorSet` of Envoy's `envoy.service.auth.v3` (ext_authz)
/// and its imports, served by reflection when ext_authz is on. The Rust types
/// come from `envoy-types`; see `third_party/envoy-protos/README.md`.
pub const ENVOY_EXT_AUTHZ_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_ext_authz_descriptor");
