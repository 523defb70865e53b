//! tarn-proto: gRPC schemas and generated code, nothing else.
//!
//! - [`containerd::services::snapshots::v1`]: containerd's Snapshots API,
//!   wire-identical to containerd 1.6's, served by `tarn-snapshotter` as a
//!   proxy plugin.
//! - [`containerd::types`]: containerd's `Mount`.
//! - [`tarn::v1`]: tarn's admin API (mounted layers, fetch and cache stats).

#![allow(missing_docs, clippy::all)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub mod tarn {
    pub mod v1 {
        tonic::include_proto!("tarn.v1");
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
pub use tarn::v1 as admin;
