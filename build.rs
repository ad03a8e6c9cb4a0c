//! Compiles `proto/jitbroker/v1/*.proto` with tonic-prost-build, using the protoc shipped by
//! `protoc-bin-vendored` so that a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/jitbroker/v1/broker.proto",
        "proto/jitbroker/v1/verifier.proto",
        "proto/jitbroker/v1/admin.proto",
        "proto/spiffe/workload.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let mut prost = prost_build::Config::new();
    prost.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("jitbroker_descriptor.bin"))
        .compile_with_config(
            prost,
            &protos.map(PathBuf::from),
            &[PathBuf::from("proto"), protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
