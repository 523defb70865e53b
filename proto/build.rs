//! Generates the gRPC code for containerd's Snapshots API and tarn's admin
//! API, and the messages of the CRI's PullImage that the CRI proxy reads. protoc comes from protoc-bin-vendored so a build needs no system
//! protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let include_str = include.to_str().ok_or("protoc include path is not utf-8")?;
    // SAFETY: build scripts run single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = [
        "proto/containerd/types/mount.proto",
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/tarn/v1/admin.proto",
        "proto/k8s/cri/v1/pull.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto", include_str])?;
    Ok(())
}
