// Compiles api/proto/prism/v1/node.proto with a vendored protoc so building needs no system packages.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free in edition 2021: build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    let proto_root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../api/proto");
    let node = proto_root.join("prism/v1/node.proto");
    println!("cargo:rerun-if-changed={}", node.display());
    tonic_prost_build::configure().compile_protos(&[node], &[proto_root])?;
    Ok(())
}
