//! Compiles `proto/` with protox (no system `protoc` needed) and writes the
//! encoded file descriptor sets that server reflection serves: the broker's
//! API, and Google's rich error details (vendored in `third_party/`), so that
//! reflection clients such as grpcurl decode `BadRequest`, `ErrorInfo` and
//! `RetryInfo` in error trailers; also Envoy's ext_authz service (vendored in
//! `third_party/envoy-protos`), so that grpcurl can send a `Check` with a JSON
//! body. The same ext_authz compile also generates its Rust code (server for
//! the crate, client for the tests), see `src/proto.rs`.

use std::{env, path::PathBuf};

const PROTO: &str = "proto/payroc/broker/v1/token_broker.proto";
const GOOGLEAPIS: &str = "third_party/googleapis";
const ERROR_DETAILS: &str = "google/rpc/error_details.proto";
const ENVOY_PROTOS: &str = "third_party/envoy-protos";
const EXT_AUTHZ: &str = "envoy/service/auth/v3/external_auth.proto";
/// The packages of the ext_authz import closure that get Rust code: those
/// with messages or services that `Check` reaches. The rest (`validate`,
/// `udpa.annotations`, `xds.annotations.v3`, `envoy.annotations`) only define
/// options, which nothing reads at run time.
const ENVOY_CODEGEN_PACKAGES: &[&str] = &[
    "envoy.service.auth.v3",
    "envoy.config.core.v3",
    "envoy.type.v3",
    // `config.core.v3.Node.dynamic_parameters`.
    "xds.core.v3",
    // Mapped to existing Rust types (no code is generated for them), but
    // prost-build must see their messages to choose the derives of the
    // messages that contain them: `google.protobuf` is prost-types',
    // `google.rpc` tonic-types' (see below).
    "google.protobuf",
    "google.rpc",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed={GOOGLEAPIS}");
    println!("cargo:rerun-if-changed={ENVOY_PROTOS}");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(PROTO)?;
    std::fs::write(
        out_dir.join("token_broker_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    // Descriptor only: the Rust types come from tonic-types.
    let mut details = protox::Compiler::new([GOOGLEAPIS])?;
    details.include_imports(true).include_source_info(true);
    details.open_file(ERROR_DETAILS)?;
    std::fs::write(
        out_dir.join("error_details_descriptor.bin"),
        details.encode_file_descriptor_set(),
    )?;

    // The messages and the client, as prost and tonic make them.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        // Prost's codec with smaller buffers (see `proto::Codec`).
        .codec_path("crate::proto::Codec")
        .compile_fds(compiler.file_descriptor_set())?;
    // The server, on its own: it uses the messages above, except that it
    // answers GetBearerToken and WatchBearerToken with a token's reply
    // encoded once (`proto::BearerReply`), not a message built and encoded
    // per call.
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&server_dir)
        .codec_path("crate::proto::Codec")
        .extern_path(".payroc.broker.v1", "crate::proto")
        .extern_path(
            ".payroc.broker.v1.GetBearerTokenResponse",
            "crate::proto::BearerReply",
        )
        .compile_fds(compiler.file_descriptor_set())?;

    // Descriptor only, without source info: reflection clients need the
    // types, and Envoy's comments would triple the size.
    let mut envoy = protox::Compiler::new([ENVOY_PROTOS])?;
    envoy.include_imports(true).include_source_info(false);
    envoy.open_file(EXT_AUTHZ)?;
    std::fs::write(
        out_dir.join("envoy_ext_authz_descriptor.bin"),
        envoy.encode_file_descriptor_set(),
    )?;

    // Code from the same descriptors, for the packages above only. No source
    // info: no doc comments in the generated code (Envoy's are long, and
    // their examples would become doctests).
    let mut ext_authz = envoy.file_descriptor_set();
    ext_authz
        .file
        .retain(|f| ENVOY_CODEGEN_PACKAGES.contains(&f.package()));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `CheckResponse.status` is a `google.rpc.Status`: tonic-types (a
        // dependency already, for rich errors) has it, generated from the same
        // `google/rpc/status.proto`, so it is mapped there rather than
        // generated a second time.
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_fds(ext_authz)?;
    Ok(())
}
