//! Image references, manifests, auth and ranged GETs: all of tarn's HTTP.
//!
//! Seen from the fetcher, this module is "a blob from an ordered list of
//! sources" ([`Sources`] of [`BlobSource`]s); the registry is the one
//! source today, mirrors and peers are more. By job:
//!
//! - [`source`]: [`BlobSource`], the seam the fetcher reads blobs through,
//!   [`Sources`] (try each in turn) and [`RemoteBlob`] (a registry blob).
//! - [`reference`]: `[registry[:port]/]repo[:tag][@digest]` with Docker Hub
//!   defaults.
//! - [`manifest`]: OCI and Docker v2 manifests and indexes, parsed; the
//!   entry for the node's [`Platform`] ([`platform`]) chosen from an index.
//! - [`config`]: the image config's program ([`Entrypoint`]).
//! - [`client`]: [`RegistryClient`], one handle for every registry the
//!   process talks to: the one GET with auth and redirects; [`blob`] and
//!   [`resolve`] are what it asks for (blobs, manifests).
//! - [`http`]: connection pools, settings ([`RegistryConfig`]), retries.
//! - [`hosts`]: containerd's `hosts.toml` (mirrors and server of a
//!   registry), parsed; [`mirror`]: a blob from those hosts in order
//!   ([`RegistryClient::blob_source`]).
//! - [`push`]: blob uploads (streamed from a file, chunked when large)
//!   and manifest PUTs, for `tarn convert`.
//! - [`auth`]: challenges, the docker config and its credential helpers,
//!   the token flow.

pub mod auth;
pub mod blob;
pub mod client;
pub mod config;
mod endpoint;
pub mod error;
pub mod hosts;
pub mod http;
pub mod manifest;
pub mod mirror;
pub mod platform;
pub mod push;
pub mod reference;
pub mod referrers;
pub mod resolve;
pub mod source;

pub use client::RegistryClient;
pub use config::Entrypoint;
pub use error::RegistryError;
pub use http::{ClientStats, RegistryConfig};
pub use manifest::{Descriptor, ResolvedImage};
pub use platform::Platform;
pub use reference::{Reference, Repository};
pub use source::{BlobSource, RemoteBlob, Sources};
