// Compiles api/proto/prism/v1/router.proto (and node.proto, which it imports) and the Open
// Inference Protocol's api/proto/inference/grpc_service.proto with a vendored protoc, so building
// needs no system packages.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../api/proto");
    let router = root.join("prism/v1/router.proto");
    println!("cargo:rerun-if-changed={}", router.display());
    println!("cargo:rerun-if-changed={}", root.join("prism/v1/node.proto").display());
    let oip = root.join("inference/grpc_service.proto");
    println!("cargo:rerun-if-changed={}", oip.display());
    tonic_prost_build::configure().build_client(true).build_server(true).compile_protos(&[router, oip], &[root])?;
    Ok(())
}
