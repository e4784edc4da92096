//! Generates the tonic/prost code from `proto/`. Needs `protoc` (Debian's
//! `protobuf-compiler`, installed by `deploy/install-deps.sh`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ferro/agent/v1/agent.proto",
        "proto/ferro/agent/v1/instance.proto",
        "proto/ferro/agent/v1/image.proto",
        "proto/ferro/agent/v1/host.proto",
        "proto/ferro/raft/v1/raft.proto",
        "proto/ferro/compute/v1/compute.proto",
        "proto/ferro/compute/v1/common.proto",
        "proto/ferro/compute/v1/cluster.proto",
        "proto/ferro/compute/v1/instance.proto",
        "proto/ferro/compute/v1/host.proto",
        "proto/ferro/compute/v1/image.proto",
        "proto/ferro/compute/v1/keypair.proto",
        "proto/ferro/compute/v1/vpc.proto",
        "proto/ferro/compute/v1/volume.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
