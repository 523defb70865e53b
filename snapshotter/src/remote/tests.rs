//! The remote path over fake seams: decisions, fallbacks, sharing and
//! restore, without root or a registry.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::cache::Cache;
use tarn_fs::registry::RegistryError;

use super::*;
use crate::fallback::Cause;
use crate::labels::*;
use crate::metastore::Kind;
use crate::seams::ResolveError;
use crate::testing::{Call, FakeMounter, FakeResolver, Outcome};

type Fake = RemoteSnapshotter<FakeResolver, FakeMounter>;

const IMAGE: &str = "127.0.0.1:5000/app:1";

fn digest(c: char) -> Digest {
    format!("sha256:{}", c.to_string().repeat(64))
        .parse()
        .unwrap()
}

fn options() -> RemoteOptions {
    RemoteOptions {
        // Generous: only the hanging fakes wait for these.
        resolve_timeout: Duration::from_secs(30),
        restore_timeout: Duration::from_secs(30),
        allow_unverified: false,
        warm: Warm::default(),
        loop_io: LoopIo::default(),
    }
}

async fn open_at(
    root: &Path,
    resolver: &FakeResolver,
    mounter: &FakeMounter,
    options: RemoteOptions,
) -> Fake {
    let r = root.to_owned();
    let sn = Arc::new(blocking(move || Snapshotter::open(&r)).await.unwrap());
    let cache = Arc::new(Cache::open(&root.join("cache")).unwrap());
    RemoteSnapshotter::with_parts(sn, cache, resolver.clone(), mounter.clone(), options)
        .await
        .unwrap()
}

struct Bed {
    dir: tempfile::TempDir,
    rs: Fake,
    resolver: FakeResolver,
    mounter: FakeMounter,
}

impl Bed {
    async fn new() -> Bed {
        Bed::with(FakeResolver::default(), FakeMounter::default(), options()).await
    }

    async fn with(resolver: FakeResolver, mounter: FakeMounter, options: RemoteOptions) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let rs = open_at(dir.path(), &resolver, &mounter, options).await;
        Bed {
            dir,
            rs,
            resolver,
            mounter,
        }
    }

    fn mountpoint(&self, d: Digest) -> PathBuf {
        self.rs.snapshotter().layout().layer_fs(&d)
    }

    /// The layer directories under `ROOT/layers`.
    fn layer_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    async fn fallbacks(&self) -> BTreeMap<&'static str, u64> {
        self.rs.stats().await.unwrap().fallbacks_by_cause
    }
}

fn l(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What containerd's CRI plugin puts on the Prepare of an image layer.
fn cri(chain: &str, layer: Digest) -> BTreeMap<String, String> {
    l(&[
        (SNAPSHOT_REF, chain),
        (CRI_IMAGE_REF, IMAGE),
        (CRI_LAYER_DIGEST, &layer.to_string()),
        (
            "containerd.io/snapshot/cri.manifest-digest",
            &digest('f').to_string(),
        ),
        (
            "containerd.io/snapshot/cri.image-layers",
            &format!("{layer},{}", digest('e')),
        ),
        (TOC_DIGEST, &digest('9').to_string()),
    ])
}

/// What stargz-aware clients (ctr-remote, nerdctl) put there.
fn stargz(chain: &str, layer: Digest) -> BTreeMap<String, String> {
    l(&[
        (SNAPSHOT_REF, chain),
        (STARGZ_REFERENCE, IMAGE),
        (STARGZ_DIGEST, &layer.to_string()),
        (
            "containerd.io/snapshot/remote/stargz.layers",
            &format!("{layer},{}", digest('e')),
        ),
        (TOC_DIGEST, &digest('9').to_string()),
    ])
}

fn is_already_exists(r: &Result<Vec<Mount>>) -> bool {
    matches!(
        r,
        Err(snapshotter::Error::Meta(metastore::Error::AlreadyExists(_)))
    )
}

#[tokio::test]
async fn cri_and_stargz_labels_make_a_remote_snapshot() {
    for (name, labels) in [
        ("cri", cri("chain", digest('a'))),
        ("stargz", stargz("chain", digest('a'))),
    ] {
        let b = Bed::new().await;
        let r = b.rs.prepare("extract-1".into(), None, labels).await;
        assert!(is_already_exists(&r), "{name}: {r:?}");
        let info = b.rs.snapshotter().stat("chain").unwrap();
        assert_eq!(info.kind, Kind::Committed, "{name}");
        assert_eq!(remote_layer(&info.labels), Some(digest('a')), "{name}");
        assert_eq!(
            restore_info(&info.labels).map(|r| r.blob_size),
            Some(1000),
            "{name}: what a restart needs is recorded"
        );
        assert!(
            b.rs.snapshotter().stat("extract-1").is_err(),
            "{name}: no active snapshot of the key"
        );
        assert_eq!(
            b.mounter.mounted(),
            HashSet::from([b.mountpoint(digest('a'))]),
            "{name}"
        );
        assert_eq!(b.resolver.resolved(), vec![digest('a')], "{name}");
        assert_eq!(b.resolver.forgotten(), vec![digest('a')], "{name}");
        assert_eq!(b.resolver.ahead_of(), vec![IMAGE], "{name}");
        let stats = b.rs.stats().await.unwrap();
        assert_eq!((stats.fallbacks, stats.lazy_layers), (0, 1), "{name}");
        let layers = b.rs.layers();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].image_ref, IMAGE);
        assert!(layers[0].failed.is_none());
    }
}

#[tokio::test]
async fn a_prepare_without_labels_is_ordinary_and_no_fallback() {
    let b = Bed::new().await;
    let m = b.rs.prepare("k".into(), None, BTreeMap::new()).await;
    assert_eq!(m.unwrap()[0].kind, "bind");
    assert_eq!(b.rs.snapshotter().stat("k").unwrap().kind, Kind::Active);
    assert!(b.resolver.resolved().is_empty());
    assert!(b.mounter.calls().is_empty());
    assert_eq!(b.rs.stats().await.unwrap().fallbacks, 0);
}

/// How a fallback case sets the fakes up.
enum Setup {
    Labels(BTreeMap<String, String>),
    Resolver(Outcome),
    MountFails,
}

#[tokio::test]
async fn each_fallback_cause_prepares_ordinarily_and_is_counted() {
    let a = digest('a');
    let join_error = tokio::spawn(async { panic!("resolve task panicked (expected)") })
        .await
        .unwrap_err();
    let registry = |e: RegistryError| Setup::Resolver(Outcome::Fails(e.into()));
    let host = || "127.0.0.1:5000".to_string();
    let without = |k: &str| {
        let mut labels = stargz("chain", a);
        labels.remove(k);
        Setup::Labels(labels)
    };
    let mut bad = stargz("chain", a);
    bad.insert(STARGZ_DIGEST.into(), "sha256:../../etc".into());
    let mut bad_toc = stargz("chain", a);
    bad_toc.insert(TOC_DIGEST.into(), "md5:x".into());
    let cases = [
        (without(STARGZ_REFERENCE), Cause::NoImageRef),
        (without(STARGZ_DIGEST), Cause::NoLayerDigest),
        (without(TOC_DIGEST), Cause::NoTocDigest),
        (Setup::Labels(bad), Cause::BadLabel),
        (Setup::Labels(bad_toc), Cause::BadLabel),
        (Setup::Resolver(Outcome::Hangs), Cause::ResolveTimeout),
        (
            registry(RegistryError::Unreachable {
                host: host(),
                reason: "connection refused".into(),
            }),
            Cause::RegistryUnreachable,
        ),
        (
            registry(RegistryError::Timeout {
                host: host(),
                what: "blob".into(),
            }),
            Cause::RegistryUnreachable,
        ),
        (
            registry(RegistryError::Auth {
                host: host(),
                reason: "denied".into(),
            }),
            Cause::Auth,
        ),
        (
            registry(RegistryError::InvalidReference {
                reference: IMAGE.into(),
                reason: "bad".into(),
            }),
            Cause::BadLabel,
        ),
        (
            Setup::Resolver(Outcome::Fails(ResolveError::NotInImage {
                image_ref: IMAGE.into(),
                digest: a,
            })),
            Cause::NotInImage,
        ),
        (
            Setup::Resolver(Outcome::Fails(
                tarn_fs::layer::LayerError::Open(tarn_fs::fetch::OpenError::Format(
                    tarn_fs::format::FormatError::Footer("not gzip".into()),
                ))
                .into(),
            )),
            Cause::BadLayer,
        ),
        (
            Setup::Resolver(Outcome::Fails(
                tarn_fs::layer::LayerError::Open(tarn_fs::fetch::OpenError::Source(
                    RegistryError::Unreachable {
                        host: host(),
                        reason: "reset".into(),
                    },
                ))
                .into(),
            )),
            Cause::RegistryUnreachable,
        ),
        (
            Setup::Resolver(Outcome::Resolved {
                toc_digest: Some(digest('8')),
            }),
            Cause::TocMismatch,
        ),
        (Setup::MountFails, Cause::Mount),
        (
            Setup::Resolver(Outcome::Fails(join_error.into())),
            Cause::Internal,
        ),
    ];
    for (setup, cause) in cases {
        let (resolver, mounter) = (FakeResolver::default(), FakeMounter::default());
        let mut options = options();
        let mut labels = stargz("chain", a);
        match setup {
            Setup::Labels(l) => labels = l,
            Setup::Resolver(Outcome::Hangs) => {
                resolver.answer(a, Outcome::Hangs);
                // The one case that waits for its timeout.
                options.resolve_timeout = Duration::from_millis(50);
            }
            Setup::Resolver(o) => resolver.answer(a, o),
            Setup::MountFails => mounter.fail(a),
        }
        let b = Bed::with(resolver, mounter, options).await;
        let m = b.rs.prepare("k".into(), None, labels).await;
        let what = cause.as_str();
        assert_eq!(m.unwrap()[0].kind, "bind", "{what}: an ordinary Prepare");
        assert_eq!(b.rs.snapshotter().stat("k").unwrap().kind, Kind::Active);
        assert!(b.rs.snapshotter().stat("chain").is_err(), "{what}");
        assert_eq!(b.fallbacks().await, BTreeMap::from([(what, 1)]));
        assert_eq!(b.rs.stats().await.unwrap().fallbacks, 1);
        assert!(b.mounter.mounted().is_empty(), "{what}: no mount left");
        assert!(b.layer_dirs().is_empty(), "{what}: {:?}", b.layer_dirs());
        assert_eq!(b.rs.stats().await.unwrap().lazy_layers, 0, "{what}");
    }
}

#[tokio::test]
async fn unverified_layers_are_lazy_when_allowed() {
    let mut labels = stargz("chain", digest('a'));
    labels.remove(TOC_DIGEST);
    let mut options = options();
    options.allow_unverified = true;
    let b = Bed::with(FakeResolver::default(), FakeMounter::default(), options).await;
    let r = b.rs.prepare("k".into(), None, labels).await;
    assert!(is_already_exists(&r), "{r:?}");
    assert_eq!(b.rs.stats().await.unwrap().fallbacks, 0);
}

#[tokio::test]
async fn a_snapshot_error_after_mounting_is_the_clients_and_unmounts() {
    let b = Bed::new().await;
    let r =
        b.rs.prepare(
            "k".into(),
            Some("missing".into()),
            cri("chain", digest('a')),
        )
        .await;
    assert!(
        matches!(
            r,
            Err(snapshotter::Error::Meta(metastore::Error::NotFound(_)))
        ),
        "{r:?}"
    );
    assert_eq!(b.rs.stats().await.unwrap().fallbacks, 0, "not a fallback");
    assert!(b.mounter.mounted().is_empty());
    assert!(b.layer_dirs().is_empty());
}

#[tokio::test]
async fn a_shared_layer_is_unmounted_with_its_last_snapshot() {
    let b = Bed::new().await;
    let d = digest('a');
    // A committed parent, so the second chain ID differs from the first.
    b.rs.prepare("base-1".into(), None, BTreeMap::new())
        .await
        .unwrap();
    b.rs.snapshotter()
        .commit("base", "base-1", BTreeMap::new(), None)
        .unwrap();
    let r = b.rs.prepare("k1".into(), None, cri("chain-1", d)).await;
    assert!(is_already_exists(&r), "{r:?}");
    let r =
        b.rs.prepare("k2".into(), Some("base".into()), stargz("chain-2", d))
            .await;
    assert!(is_already_exists(&r), "{r:?}");
    assert_eq!(
        b.mounter.calls(),
        vec![Call::Mount(b.mountpoint(d))],
        "one mount for both snapshots"
    );
    assert_eq!(b.resolver.resolved(), vec![d], "resolved once");

    b.rs.remove("chain-1".into()).await.unwrap();
    assert!(
        b.mounter.is_mounted(&b.mountpoint(d)),
        "chain-2 still uses it"
    );
    assert_eq!(b.rs.stats().await.unwrap().lazy_layers, 1);
    b.rs.cleanup().await.unwrap();
    assert!(
        b.mounter.is_mounted(&b.mountpoint(d)),
        "cleanup keeps it too"
    );

    b.rs.remove("chain-2".into()).await.unwrap();
    assert!(!b.mounter.is_mounted(&b.mountpoint(d)));
    assert_eq!(
        b.mounter.calls().last(),
        Some(&Call::Unmount(b.mountpoint(d)))
    );
    assert_eq!(b.rs.stats().await.unwrap().lazy_layers, 0);
    assert!(b.layer_dirs().is_empty(), "{:?}", b.layer_dirs());
    assert!(b.rs.layers().is_empty());
}

#[tokio::test]
async fn cleanup_unmounts_layers_nobody_uses() {
    let b = Bed::new().await;
    // What a killed daemon may leave: a layer directory without a snapshot.
    let stale = b.mountpoint(digest('c'));
    std::fs::create_dir_all(&stale).unwrap();
    b.rs.cleanup().await.unwrap();
    assert_eq!(b.mounter.calls(), vec![Call::Unmount(stale)]);
    assert!(b.layer_dirs().is_empty());
}

#[tokio::test]
async fn restore_mounts_every_layer_but_the_failing_ones_and_reports_them() {
    let (ok, unreachable, unmountable, hung) = (digest('1'), digest('2'), digest('3'), digest('4'));
    let first = Bed::new().await;
    for (i, d) in [ok, unreachable, unmountable, hung].into_iter().enumerate() {
        let r = first
            .rs
            .prepare(format!("k{i}"), None, cri(&format!("chain-{i}"), d))
            .await;
        assert!(is_already_exists(&r), "{r:?}");
    }
    // A restart: a new daemon over the same root, its registry down for
    // one layer, its mount failing for another, hanging for a third.
    let (resolver, mounter) = (FakeResolver::default(), FakeMounter::default());
    resolver.answer(
        unreachable,
        Outcome::Fails(
            RegistryError::Unreachable {
                host: "127.0.0.1:5000".into(),
                reason: "connection refused".into(),
            }
            .into(),
        ),
    );
    mounter.fail(unmountable);
    resolver.answer(hung, Outcome::Hangs);
    let mut options = options();
    options.restore_timeout = Duration::from_millis(50);
    let Bed { dir, rs: old, .. } = first;
    drop(old);
    let rs = open_at(dir.path(), &resolver, &mounter, options).await;

    let mountpoint = |d| rs.snapshotter().layout().layer_fs(&d);
    assert_eq!(mounter.mounted(), HashSet::from([mountpoint(ok)]));
    assert_eq!(
        resolver.resolved().into_iter().collect::<HashSet<_>>(),
        HashSet::from([ok, unreachable, unmountable, hung]),
    );
    let status = rs.layers();
    let failed: BTreeMap<Digest, Option<String>> = status
        .iter()
        .map(|l| (l.digest, l.failed.clone()))
        .collect();
    assert_eq!(failed.len(), 4, "{failed:?}");
    assert_eq!(failed[&ok], None);
    assert!(
        failed[&unreachable]
            .as_deref()
            .unwrap()
            .contains("cannot reach")
    );
    assert!(
        failed[&unmountable]
            .as_deref()
            .unwrap()
            .contains("mounting at")
    );
    assert!(
        failed[&hung]
            .as_deref()
            .unwrap()
            .contains("not restored within")
    );
    let stats = rs.stats().await.unwrap();
    assert_eq!(stats.lazy_layers, 1, "only the restored layer is mounted");
    assert_eq!(stats.fallbacks, 0);
    assert!(
        !mountpoint(unmountable).exists(),
        "a failed mount leaves no directory"
    );
    // Snapshots stay: an operator removes them, and their layer with them.
    rs.remove("chain-1".into()).await.unwrap();
    assert!(rs.layers().iter().all(|l| l.digest != unreachable));
    assert!(!mountpoint(unreachable).exists());
}

/// containerd 2.x's parallel unpack (core/unpack/unpacker.go): every
/// extraction is Prepared without a parent, the layers above the first
/// naming theirs in `parent-chain-id`; ordinary ones are committed in order
/// with the parent (Commit's field 5).
#[tokio::test]
async fn parallel_unpack_serves_the_bottom_lazily_and_rebases_the_rest() {
    let b = Bed::new().await;
    let (a, c) = (digest('a'), digest('c'));
    let r = b.rs.prepare("ex-1".into(), None, cri("c1", a)).await;
    assert!(is_already_exists(&r), "the bottom layer is lazy: {r:?}");

    let mut second = cri("c2", c);
    second.insert(PARENT_CHAIN_ID.into(), "c1".into());
    second.insert(DIFF_ID.into(), digest('d').to_string());
    let m =
        b.rs.prepare("ex-2".into(), None, second.clone())
            .await
            .unwrap();
    assert_eq!(m[0].kind, "overlay", "the applier writes overlay whiteouts");
    assert!(m[0].options.iter().all(|o| !o.starts_with("lowerdir")));
    assert_eq!(b.fallbacks().await, BTreeMap::from([("no-parent", 1)]));
    assert_eq!(b.layer_dirs(), vec![a.hex()], "c was not mounted");

    let sn = b.rs.snapshotter().clone();
    let e = sn.commit("c2", "ex-2", second.clone(), Some("missing"));
    assert!(
        matches!(&e, Err(snapshotter::Error::Meta(metastore::Error::NotFound(m))) if m.contains("missing")),
        "{e:?}"
    );
    sn.commit("c2", "ex-2", second, Some("c1")).unwrap();
    assert_eq!(sn.stat("c2").unwrap().parent.as_deref(), Some("c1"));

    let m =
        b.rs.prepare("ctr".into(), Some("c2".into()), BTreeMap::new())
            .await
            .unwrap();
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    let lower: Vec<&str> = lower.split(':').collect();
    assert_eq!(lower.len(), 2, "both layers under the container: {lower:?}");
    assert_eq!(
        Path::new(lower[1]),
        b.mountpoint(a),
        "the lazy layer at the bottom"
    );
    let e = b.rs.remove("c1".into()).await;
    assert!(e.is_err(), "the lazy layer is the rebased layer's parent");
}

/// containerd >= 2.3 labels every extraction with its diff ID: a layer
/// already mounted here serves a Prepare that lacks the remote labels
/// (the transfer service without its export), with no resolution and no
/// download by containerd.
#[tokio::test]
async fn a_layer_on_the_node_is_found_by_its_diff_id() {
    let b = Bed::new().await;
    let a = digest('a');
    let diff = digest('d').to_string();
    let mut first = cri("c1", a);
    first.insert(DIFF_ID.into(), diff.clone());
    let r = b.rs.prepare("ex-1".into(), None, first).await;
    assert!(is_already_exists(&r), "{r:?}");
    b.rs.prepare("base-1".into(), None, BTreeMap::new())
        .await
        .unwrap();
    b.rs.snapshotter()
        .commit("base", "base-1", BTreeMap::new(), None)
        .unwrap();

    // The same layer on another parent, labelled only by containerd itself.
    let bare = l(&[(SNAPSHOT_REF, "c2"), (DIFF_ID, &diff)]);
    let r = b.rs.prepare("ex-2".into(), Some("base".into()), bare).await;
    assert!(is_already_exists(&r), "{r:?}");
    let info = b.rs.snapshotter().stat("c2").unwrap();
    assert_eq!(info.parent.as_deref(), Some("base"));
    assert_eq!(remote_layer(&info.labels), Some(a));
    assert_eq!(b.resolver.resolved(), vec![a], "resolved once, for c1");
    assert!(b.fallbacks().await.is_empty());

    // Another diff ID is an ordinary fallback.
    let other = l(&[(SNAPSHOT_REF, "c3"), (DIFF_ID, &digest('e').to_string())]);
    let m =
        b.rs.prepare("ex-3".into(), Some("base".into()), other)
            .await;
    assert!(m.is_ok(), "{m:?}");
    assert_eq!(b.fallbacks().await, BTreeMap::from([("no-image-ref", 1)]));
}

#[tokio::test]
async fn a_removed_layers_own_chunks_are_released_and_pruned_shared_ones_stay() {
    use crate::testing::{SHARED_CHUNK, own_chunk, own_chunk_data};
    let b = Bed::new().await;
    let (da, db) = (digest('a'), digest('b'));
    let cache = b.rs.cache.clone();
    for data in [
        own_chunk_data(&da),
        own_chunk_data(&db),
        SHARED_CHUNK.to_vec(),
    ] {
        cache.insert(&Digest::of(&data), &data).unwrap();
    }
    let stray = b"a chunk no layer lists".as_slice();
    cache.insert(&Digest::of(stray), stray).unwrap();
    for (key, chain, d) in [("k1", "chain-a", da), ("k2", "chain-b", db)] {
        let r = b.rs.prepare(key.into(), None, cri(chain, d)).await;
        assert!(is_already_exists(&r), "{r:?}");
    }
    // Both list the shared chunk: stored once, saved once.
    assert_eq!(b.rs.stats().await.unwrap().dedup_saved_bytes, 1);

    b.rs.remove("chain-a".into()).await.unwrap();
    let released = b.rs.stats().await.unwrap().cache.released_bytes;
    assert_eq!(
        released,
        own_chunk_data(&da).len() as u64,
        "only a's own chunk"
    );

    let pruned = b.rs.prune_cache(false).await.unwrap();
    assert_eq!(pruned.entries, 1);
    assert!(!cache.contains(&own_chunk(&da)));
    assert!(cache.contains(&own_chunk(&db)) && cache.contains(&Digest::of(SHARED_CHUNK)));
    assert!(cache.contains(&Digest::of(stray)), "not released, so kept");

    // All unused: whatever no mounted layer lists.
    assert_eq!(b.rs.prune_cache(true).await.unwrap().entries, 1);
    assert!(!cache.contains(&Digest::of(stray)));
    assert!(cache.contains(&own_chunk(&db)) && cache.contains(&Digest::of(SHARED_CHUNK)));
}

/// An overlaybd layer's Prepare: the client's labels plus its descriptor's
/// overlaybd annotations (no TOC).
fn overlaybd(mut labels: BTreeMap<String, String>, blob: Digest) -> BTreeMap<String, String> {
    labels.remove(TOC_DIGEST);
    labels.insert(crate::obd::OBD_VERSION.into(), "0.1.0".into());
    labels.insert(crate::obd::OBD_BLOB_DIGEST.into(), blob.to_string());
    labels.insert(crate::obd::OBD_BLOB_SIZE.into(), "4096".into());
    labels.insert(crate::obd::OBD_FS_TYPE.into(), "ext4".into());
    labels
}

#[tokio::test]
async fn overlaybd_layers_take_the_disk_path_and_fall_back_by_cause() {
    let b = Bed::new().await;
    // The fakes serve no disks: the layer falls back, and the eStargz
    // resolver and mounter are never asked.
    let r =
        b.rs.prepare(
            "x1".into(),
            None,
            overlaybd(stargz("c1", digest('a')), digest('a')),
        )
        .await;
    assert_eq!(r.unwrap()[0].kind, "bind", "an ordinary Prepare");
    assert!(b.resolver.resolved().is_empty());
    assert!(b.mounter.calls().is_empty());

    let mut erofs = overlaybd(cri("c2", digest('b')), digest('b'));
    erofs.insert(crate::obd::OBD_FS_TYPE.into(), "erofs".into());
    let r = b.rs.prepare("x2".into(), None, erofs).await;
    assert!(r.is_ok(), "{r:?}");

    // On a parent that is not one of tarn's disks: its stack is unknown.
    let sn = b.rs.snapshotter().clone();
    sn.prepare("k0", None, BTreeMap::new()).unwrap();
    sn.commit("p0", "k0", BTreeMap::new(), None).unwrap();
    let r =
        b.rs.prepare(
            "x3".into(),
            Some("p0".into()),
            overlaybd(stargz("c3", digest('c')), digest('c')),
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        b.fallbacks().await,
        BTreeMap::from([("bad-label", 1), ("internal", 1), ("obd-parent", 1)])
    );
    assert!(
        b.layer_dirs().is_empty(),
        "nothing left: {:?}",
        b.layer_dirs()
    );
}
