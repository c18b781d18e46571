//! Generated protobuf and gRPC code, quarantined here. The rest of the crate
//! converts to domain types at the edge (`service`), so regenerated code never
//! leaks into logic.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("payroc.broker.v1");

/// Encoded `FileDescriptorSet` of the broker's proto and its imports, served by
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("token_broker_descriptor");
