//! Compiles every `.proto` under `proto/proto/`. Service code (tonic) only with the `grpc` feature.
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("proto");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    // konnectivity.proto's rpc `Connect` collides with the generated client's transport
    // constructor `connect`, so it is compiled on its own without the transport helpers (clients
    // are built from a `tonic::transport::Channel` instead).
    let (konn, rest): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| f.file_name().is_some_and(|n| n == "konnectivity.proto"));
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .compile_protos(&rest, std::slice::from_ref(&root))
        .expect("compile protos (is protoc installed? run scripts/bootstrap.sh)");
    if !konn.is_empty() {
        tonic_prost_build::configure()
            .build_client(grpc)
            .build_server(grpc)
            .build_transport(false)
            // DATA payloads as `Bytes`: decoding slices the received buffer instead of copying.
            .bytes(".")
            // An undecodable frame becomes an empty Packet instead of ending the agent's stream.
            .codec_path("crate::codec::LenientCodec")
            .compile_protos(&konn, &[root])
            .expect("compile konnectivity.proto");
    }
}
