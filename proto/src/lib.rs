//! tarn-proto: gRPC schemas and generated code, nothing else.
//!
//! - [`containerd::services::snapshots::v1`]: containerd's Snapshots API,
//!   wire-identical to containerd 2.x's (a superset of 1.6's: 2.x adds
//!   `CommitSnapshotRequest.parent`), served by `tarn-snapshotter` as a
//!   proxy plugin.
//! - [`containerd::types`]: containerd's `Mount`.
//! - [`tarn::v1`]: tarn's admin API (mounted layers, fetch and cache stats).
//! - [`cri`]: Kubernetes CRI's `PullImageRequest` (`runtime.v1`), only the
//!   image and auth fields, which tarn's CRI proxy reads from a copy of the
//!   bytes it forwards.

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

pub mod k8s {
    pub mod cri {
        pub mod v1 {
            tonic::include_proto!("runtime.v1");
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
pub use k8s::cri::v1 as cri;
pub use tarn::v1 as admin;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Field numbers and enum values are containerd's wire contract; a
    /// renumbering would still compile, so pin the bytes.
    #[test]
    fn wire_layout_matches_containerd() {
        let info = snapshots::Info {
            name: "n".into(),
            parent: "p".into(),
            kind: snapshots::Kind::Committed.into(),
            ..Default::default()
        };
        // 1:"n", 2:"p", 3:varint 3
        assert_eq!(info.encode_to_vec(), b"\x0a\x01n\x12\x01p\x18\x03");
        assert_eq!(snapshots::Kind::View as i32, 1);
        assert_eq!(snapshots::Kind::Active as i32, 2);

        let m = Mount {
            r#type: "bind".into(),
            source: "/s".into(),
            target: String::new(),
            options: vec!["ro".into()],
        };
        // 1:"bind", 2:"/s", 4:"ro"
        assert_eq!(m.encode_to_vec(), b"\x0a\x04bind\x12\x02/s\x22\x02ro");

        let c = snapshots::CommitSnapshotRequest {
            snapshotter: "t".into(),
            name: "n".into(),
            key: "k".into(),
            ..Default::default()
        };
        assert_eq!(c.encode_to_vec(), b"\x0a\x01t\x12\x01n\x1a\x01k");
        // containerd 2.x's rebase: 5:"p"; absent when empty, so 1.6 sees
        // the bytes it always saw.
        let rebase = snapshots::CommitSnapshotRequest {
            parent: "p".into(),
            ..c
        };
        assert_eq!(
            rebase.encode_to_vec(),
            b"\x0a\x01t\x12\x01n\x1a\x01k\x2a\x01p"
        );
        let u = snapshots::UsageResponse { size: 1, inodes: 2 };
        assert_eq!(u.encode_to_vec(), b"\x08\x01\x10\x02");
    }

    /// The CRI's field numbers: image = 1, auth = 2; username 1 ...
    /// registry_token 6. A field tarn does not declare (sandbox_config = 3)
    /// is skipped by a decode.
    #[test]
    fn cri_pull_layout_matches_the_cri() {
        // 1:{1:"i"} 2:{1:"u" 2:"p" 6:"t"} 3:{...}
        let bytes = b"\x0a\x03\x0a\x01i\x12\x09\x0a\x01u\x12\x01p\x32\x01t\x1a\x02\x08\x01";
        let req = cri::PullImageRequest::decode(&bytes[..]).unwrap();
        assert_eq!(req.image.unwrap().image, "i");
        let auth = req.auth.unwrap();
        assert_eq!(
            (
                auth.username.as_str(),
                auth.password.as_str(),
                auth.registry_token.as_str()
            ),
            ("u", "p", "t")
        );
    }
}
