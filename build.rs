//! Compiles `proto/` with protox (no system `protoc` needed) and writes the
//! encoded file descriptor set that server reflection serves.

use std::{env, path::PathBuf};

const PROTO: &str = "proto/payroc/broker/v1/token_broker.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(PROTO)?;
    std::fs::write(
        out_dir.join("token_broker_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
