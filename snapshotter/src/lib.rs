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
//! - [`seams`]: the traits remote goes through, "resolve this layer" and
//!   "mount it / unmount it / is it mounted", so it is unit-tested with
//!   fakes; [`resolve`] and [`mounter`] are the real ones.
//! - [`layers`]: the table of remote layers, one mount per layer digest.
//! - [`resolve`]: manifest, footer and TOC of remote layers, once each, all
//!   of an image's layers at once.
//! - [`mounter`]: remote layers as FUSE mounts, handed over to a
//!   successor process through [`holder`].
//! - [`obd`]: overlaybd layers: their labels, and a stacked disk mounted
//!   as a tree (FUSE file, read-only loop device, ext4 `ro,noload`).
//! - [`disks`]: the overlaybd stacks served, one disk mount per stack.
//! - [`holder`]: the process that keeps every mount's /dev/fuse fd across
//!   restarts of the daemon.
//! - [`mountinfo`]: this namespace's mounts, read without touching them.
//! - [`fallback`]: why a layer was not lazy, counted by cause.
//! - [`metrics`]: the Prometheus endpoint; reads the counters above and
//!   tarn-fs's at each scrape.
//! - [`peers`]: built-in peers (`[peers]`): the block server, the blocks
//!   this node owns (fetched once, kept in memory), the settings.
//! - [`labels`]: the remote-snapshot protocol's labels, pure.
//! - [`errors`]: an error and its causes in one line.
//! - [`locks`]: keyed mutex and singleflight for duplicate suppression.
//! - [`cri`]: CRI's image service as a proxy to containerd's, capturing
//!   the credentials of the kubelet's pulls (persisted per repository).
//! - [`config`], [`server`]: configuration file, sockets and serving;
//!   [`httpd`]: the loop of the small HTTP endpoints (metrics, peers).

pub mod config;
pub mod cri;
pub mod disks;
pub mod errors;
pub mod fallback;
pub mod filters;
pub mod holder;
pub mod httpd;
pub mod labels;
pub mod layers;
pub mod locks;
pub mod metastore;
pub mod metrics;
pub mod mounter;
pub mod mountinfo;
pub mod mounts;
pub mod obd;
pub mod peers;
pub mod profiles;
pub mod remote;
pub mod resolve;
pub mod seams;
pub mod server;
pub mod service;
pub mod snapshotter;
#[cfg(test)]
mod testing;
