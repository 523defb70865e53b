//! Credentials passed through CRI. containerd does not hand a pull's auth
//! to snapshotters, so tarn serves CRI's image service in front of
//! containerd's ([`proxy`]): the kubelet pulls through tarn, tarn keeps
//! each `PullImage`'s credentials per repository ([`store`], persisted in
//! a root-only file so they survive a restart) and forwards every call
//! unchanged. The registry client asks the store for a repository's
//! credentials when it resolves and fetches lazily.
//!
//! Off unless `[cri] image_service_socket` is set.

pub mod proxy;
pub mod store;

pub use proxy::ImageProxy;
pub use store::{CriCredentials, Secret};

#[cfg(test)]
mod tests;
