//! Generates the containerd snapshots gRPC service (strata/proto) with protox, a protobuf
//! compiler in Rust, so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["containerd/snapshots.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .include_file("containerd_api.rs")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
