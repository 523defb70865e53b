//! Why a Prepare of an image layer was not served lazily, and a count of
//! each cause for the admin API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tarn_fs::disk::DiskError;
use tarn_fs::fetch::{FetchError, OpenError};
use tarn_fs::layer::LayerError;
use tarn_fs::registry::RegistryError;

use crate::labels::Unfit;
use crate::obd::{DiskMountError, ObdLabelError, StackLabelError};
use crate::seams::{MountError, ResolveError, TocMismatch};

/// Why an image layer fell back to an ordinary Prepare.
#[derive(Debug, thiserror::Error)]
pub enum Fallback {
    /// Its labels do not describe a layer tarn can serve.
    #[error(transparent)]
    Labels(#[from] Unfit),
    #[error("not resolved within the resolve timeout ({0:?})")]
    ResolveTimeout(Duration),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    TocMismatch(#[from] TocMismatch),
    #[error(transparent)]
    Mount(#[from] MountError),
    /// An overlaybd layer's labels name no layer tarn can serve.
    #[error(transparent)]
    ObdLabels(#[from] ObdLabelError),
    #[error("overlaybd stack")]
    ObdStack(#[from] StackLabelError),
    /// An overlaybd layer over a parent tarn does not serve as a disk: its
    /// disk would lack the layers below.
    #[error("overlaybd layer on parent {0:?}, which is not an overlaybd disk served by tarn")]
    ObdParent(String),
    #[error(transparent)]
    DiskMount(#[from] DiskMountError),
}

/// The kinds of [`Fallback`] counted apart, each named in the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    NoImageRef,
    NoLayerDigest,
    BadLabel,
    /// No TOC digest: not eStargz, or unverifiable.
    NoTocDigest,
    /// Prepared without its parent (containerd 2.x's parallel unpack).
    NoParent,
    ResolveTimeout,
    /// The registry could not be reached or timed out.
    RegistryUnreachable,
    /// The registry refused tarn's credentials, or tarn has none for it:
    /// a lazy layer would fail its reads, so containerd pulls it in full.
    Auth,
    /// The registry answered, but not with the layer (not found, ...).
    Registry,
    NotInImage,
    TocMismatch,
    /// The blob is not a layer tarn can read (footer, TOC).
    BadLayer,
    Mount,
    /// An overlaybd layer whose parent is not an overlaybd disk.
    ObdParent,
    Internal,
}

impl Cause {
    pub const ALL: [Cause; 15] = [
        Cause::NoImageRef,
        Cause::NoLayerDigest,
        Cause::BadLabel,
        Cause::NoTocDigest,
        Cause::NoParent,
        Cause::ResolveTimeout,
        Cause::RegistryUnreachable,
        Cause::Auth,
        Cause::Registry,
        Cause::NotInImage,
        Cause::TocMismatch,
        Cause::BadLayer,
        Cause::Mount,
        Cause::ObdParent,
        Cause::Internal,
    ];

    /// The name the admin API and `tarn status` show.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NoImageRef => "no-image-ref",
            Cause::NoLayerDigest => "no-layer-digest",
            Cause::BadLabel => "bad-label",
            Cause::NoTocDigest => "no-toc-digest",
            Cause::NoParent => "no-parent",
            Cause::ResolveTimeout => "resolve-timeout",
            Cause::RegistryUnreachable => "registry-unreachable",
            Cause::Auth => "auth",
            Cause::Registry => "registry",
            Cause::NotInImage => "not-in-image",
            Cause::TocMismatch => "toc-mismatch",
            Cause::BadLayer => "bad-layer",
            Cause::Mount => "mount",
            Cause::ObdParent => "obd-parent",
            Cause::Internal => "internal",
        }
    }
}

impl Fallback {
    pub fn cause(&self) -> Cause {
        match self {
            Fallback::Labels(u) => match u {
                Unfit::NoImageRef => Cause::NoImageRef,
                Unfit::NoLayerDigest => Cause::NoLayerDigest,
                Unfit::BadLayerDigest(_) | Unfit::BadTocDigest(_) => Cause::BadLabel,
                Unfit::NoTocDigest => Cause::NoTocDigest,
                Unfit::NoParent(_) => Cause::NoParent,
            },
            Fallback::ResolveTimeout(_) => Cause::ResolveTimeout,
            Fallback::Resolve(e) => match e {
                ResolveError::Registry(r) => registry_cause(r),
                ResolveError::NotInImage { .. } => Cause::NotInImage,
                ResolveError::Open(l) => layer_cause(l),
                ResolveError::Disk(d) => match &**d {
                    DiskError::Layer(l) => layer_cause(l),
                    _ => Cause::BadLayer,
                },
                ResolveError::Task(_) | ResolveError::NoDisks => Cause::Internal,
            },
            Fallback::TocMismatch(_) => Cause::TocMismatch,
            Fallback::Mount(_) | Fallback::DiskMount(_) => Cause::Mount,
            Fallback::ObdLabels(_) | Fallback::ObdStack(_) => Cause::BadLabel,
            Fallback::ObdParent(_) => Cause::ObdParent,
        }
    }
}

fn layer_cause(l: &LayerError) -> Cause {
    match l {
        LayerError::Open(OpenError::Source(r)) => registry_cause(r),
        LayerError::Fetch(FetchError::Source { error, .. }) => registry_cause(error),
        _ => Cause::BadLayer,
    }
}

fn registry_cause(e: &RegistryError) -> Cause {
    match e {
        _ if e.is_transient() => Cause::RegistryUnreachable,
        RegistryError::InvalidReference { .. } => Cause::BadLabel,
        RegistryError::Auth { .. } => Cause::Auth,
        _ => Cause::Registry,
    }
}

/// Fallbacks since start, by cause.
#[derive(Debug, Default)]
pub struct Fallbacks([AtomicU64; Cause::ALL.len()]);

impl Fallbacks {
    pub fn count(&self, cause: Cause) {
        self.0[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Every cause with its count, happened or not.
    pub fn counts(&self) -> Vec<(Cause, u64)> {
        Cause::ALL
            .iter()
            .map(|&c| (c, self.0[c as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// The causes that happened, by name.
    pub fn by_cause(&self) -> BTreeMap<&'static str, u64> {
        Cause::ALL
            .iter()
            .map(|&c| (c.as_str(), self.0[c as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_slot_and_name() {
        for (i, c) in Cause::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} out of place in Cause::ALL");
        }
        let names: std::collections::HashSet<_> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Cause::ALL.len());
        let f = Fallbacks::default();
        f.count(Cause::Mount);
        f.count(Cause::Mount);
        f.count(Cause::NoTocDigest);
        assert_eq!(f.total(), 3);
        assert_eq!(
            f.by_cause(),
            BTreeMap::from([("mount", 2), ("no-toc-digest", 1)])
        );
    }
}
