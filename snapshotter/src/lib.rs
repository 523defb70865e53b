//! tarn-snapshotter: the daemon containerd talks to (a proxy snapshotter).
//!
//! - [`service`]: the gRPC edge (containerd's Snapshots API, tarn's admin
//!   API); proto <-> domain and errors -> status codes, no logic.
//! - [`snapshotter`]: Prepare/View/Commit/... with containerd's overlayfs
//!   snapshotter semantics.
//! - [`metastore`]: the persisted state machine in redb: kinds, parents,
//!   labels, ids, and every legal transition.
//! - [`mounts`]: snapshot + parents -> mount specs, pure.
//! - [`filters`]: containerd's List filter syntax.
//! - [`remote`]: the remote-layer decision around the snapshotter: lazy
//!   Prepare answering ALREADY_EXISTS, fallbacks, restore on start.
//! - [`layers`]: FUSE mounts of remote layers, one per layer digest.
//! - [`resolve`]: manifest, footer and TOC of remote layers, once each, all
//!   of an image's layers at once.
//! - [`labels`]: the remote-snapshot protocol's labels, pure.
//! - [`locks`]: keyed mutex and singleflight for duplicate suppression.
//! - [`config`], [`server`]: configuration file, sockets and serving.

pub mod config;
pub mod filters;
pub mod labels;
pub mod layers;
pub mod locks;
pub mod metastore;
pub mod mounts;
pub mod remote;
pub mod resolve;
pub mod server;
pub mod service;
pub mod snapshotter;
