//! Server reflection serves what a generic client (grpcurl, Postman, an IDE)
//! needs to decode every answer: the broker's API and the `google.rpc` error
//! detail types its errors carry, with every import they need, through both
//! reflection versions.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::Harness;
use prost::Message;
use prost_types::FileDescriptorProto;
use tokio_stream::StreamExt;

/// One reflection exchange per version (the generated types differ per
/// version, the exchange does not): the files answering a symbol or a file
/// name lookup, decoded.
macro_rules! reflection_client {
    ($module:ident, $version:ident) => {
        mod $module {
            use super::*;
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };

            pub enum Lookup {
                Symbol(&'static str),
                File(String),
            }

            pub async fn files(
                h: &Harness,
                lookup: Lookup,
            ) -> Result<Vec<FileDescriptorProto>, String> {
                let mut c = ServerReflectionClient::new(h.channel.clone());
                let message_request = Some(match lookup {
                    Lookup::Symbol(s) => MessageRequest::FileContainingSymbol(s.to_owned()),
                    Lookup::File(f) => MessageRequest::FileByFilename(f),
                });
                let req = ServerReflectionRequest {
                    host: String::new(),
                    message_request,
                };
                let mut stream = c
                    .server_reflection_info(tokio_stream::iter([req]))
                    .await
                    .unwrap()
                    .into_inner();
                // tonic-reflection answers an unknown name with a NOT_FOUND
                // status, other servers with an ErrorResponse: both are "no".
                let answer = match stream.next().await.unwrap() {
                    Ok(answer) => answer,
                    Err(status) => return Err(format!("{status:?}")),
                };
                match answer.message_response {
                    Some(MessageResponse::FileDescriptorResponse(r)) => Ok(r
                        .file_descriptor_proto
                        .iter()
                        .map(|b| FileDescriptorProto::decode(b.as_slice()).unwrap())
                        .collect()),
                    Some(MessageResponse::ErrorResponse(e)) => Err(e.error_message),
                    other => panic!("unexpected reflection answer {other:?}"),
                }
            }
        }
    };
}
reflection_client!(v1, v1);
reflection_client!(v1alpha, v1alpha);

/// Resolves `symbol` as grpcurl does: the file that defines it, then every
/// import by file name, transitively. Returns the files by name.
macro_rules! resolve {
    ($module:ident, $h:expr, $symbol:expr) => {{
        let mut files: HashMap<String, FileDescriptorProto> = HashMap::new();
        let mut pending: Vec<FileDescriptorProto> =
            $module::files($h, $module::Lookup::Symbol($symbol))
                .await
                .unwrap_or_else(|e| panic!("{} is not resolvable: {e}", $symbol));
        while let Some(f) = pending.pop() {
            for dep in &f.dependency {
                if !files.contains_key(dep) && !pending.iter().any(|p| p.name() == dep) {
                    let got = $module::files($h, $module::Lookup::File(dep.clone()))
                        .await
                        .unwrap_or_else(|e| panic!("import {dep} is not served: {e}"));
                    pending.extend(got);
                }
            }
            files.insert(f.name().to_owned(), f);
        }
        files
    }};
}

fn messages(f: &FileDescriptorProto) -> BTreeSet<&str> {
    f.message_type.iter().map(|m| m.name()).collect()
}

fn assert_error_details(files: &HashMap<String, FileDescriptorProto>) {
    // The canonical file name: clients that also hold Google's own copy
    // (grpcio-status, googleapis-common-protos) see one file, not two
    // conflicting definitions of google.rpc.ErrorInfo.
    let details = files
        .get("google/rpc/error_details.proto")
        .unwrap_or_else(|| panic!("no google/rpc/error_details.proto in {:?}", files.keys()));
    assert_eq!(details.package(), "google.rpc");
    let names = messages(details);
    for m in ["ErrorInfo", "BadRequest", "RetryInfo"] {
        assert!(names.contains(m), "{m} missing from {names:?}");
    }
    // RetryInfo.retry_delay is a Duration: its file must be served too.
    assert!(
        files.contains_key("google/protobuf/duration.proto"),
        "{:?}",
        files.keys()
    );
}

#[tokio::test]
async fn error_detail_types_resolve_through_reflection_v1() {
    let h = Harness::start().await;
    for symbol in [
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
    ] {
        assert_error_details(&resolve!(v1, &h, symbol));
    }
}

#[tokio::test]
async fn error_detail_types_resolve_through_reflection_v1alpha() {
    let h = Harness::start().await;
    for symbol in [
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
    ] {
        assert_error_details(&resolve!(v1alpha, &h, symbol));
    }
}

#[tokio::test]
async fn the_api_resolves_with_its_documentation() {
    let h = Harness::start().await;
    let files = resolve!(v1, &h, "payroc.broker.v1.TokenBroker");
    let api = &files["payroc/broker/v1/token_broker.proto"];
    assert!(files.contains_key("google/protobuf/timestamp.proto"));
    // Comments travel with the descriptor (source info), so reflection
    // clients show the proto's documentation.
    let comments: Vec<&str> = api
        .source_code_info
        .as_ref()
        .expect("source info is served")
        .location
        .iter()
        .filter_map(|l| l.leading_comments.as_deref())
        .collect();
    assert!(
        comments
            .iter()
            .any(|c| c.contains("hands out Payroc credentials")),
        "{comments:?}"
    );
    // An unknown symbol is an error answer, not a crash or an empty file.
    assert!(
        v1::files(&h, v1::Lookup::Symbol("google.rpc.NoSuchThing"))
            .await
            .is_err()
    );
}
