//! Generates the gRPC code for `proto/crabbox/v1` with a protoc the build itself supplies
//! (`protoc-bin-vendored`), so no system protoc is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/crabbox/v1/crabbox.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The protoc binary comes from a crate; tonic-prost-build's builder has no setter for it,
    // prost-build's Config does.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Maps as BTreeMap: a lease's labels go out sorted (the same bytes for the same lease,
    // a stable order in every client), and building and encoding them hashes nothing
    // (`List` of 500 leases: 17 labels each).
    config.btree_map(["."]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("crabbox_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;
    // The CLI starts for every command: linked at a fixed address, the loader has none of
    // its 19,000 relative relocations to apply (and no page of them to copy), about 0.1 ms
    // and 60 page faults of each start (bench/sync_bench.py: `crabbox --version`). The
    // daemon and the sim stay position-independent (ASLR: they hold credentials and serve).
    println!("cargo:rustc-link-arg-bin=crabbox=-no-pie");
    Ok(())
}
