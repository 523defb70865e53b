//! containerd 2.x's unpack, replayed call by call against a real tarn
//! daemon (Debian ships containerd 1.6 only, so no 2.x binary runs here).
//!
//! The calls and labels are those of containerd's sources:
//!
//! - `core/unpack/unpacker.go` (2.3): every extraction Prepare carries
//!   `containerd.io/snapshot.ref` (its chain ID), `containerd.io/snapshot/diff-id`
//!   and, above the first layer, `containerd.io/snapshot/parent-chain-id`,
//!   plus the layer's annotations under `containerd.io/snapshot/` (eStargz's
//!   `stargz/toc.digest`). Sequentially a Prepare names its parent; in
//!   parallel mode (`max_concurrent_unpacks > 1` and the snapshotter's
//!   `rebase` capability) every Prepare is parentless, all are issued in
//!   layer order first, the layers are applied concurrently, and the
//!   commits follow in layer order with `WithParent` (Commit's field 5).
//!   A Prepare answered ALREADY_EXISTS is not committed.
//! - `core/metadata/snapshot.go`: containerd's metadata store sits between
//!   the unpacker and the proxy. It names backend snapshots `NS/SEQ/NAME`,
//!   passes the parent's backend name, and after ALREADY_EXISTS looks the
//!   target up with `labels."containerd.io/snapshot.ref"==CHAIN,parent==P`
//!   where P is the parent it sent: a lazy snapshot must be committed on
//!   exactly that parent to be found.
//! - `core/transfer/local/pull.go`: the transfer service (2.x's `ctr image
//!   pull`, and CRI's) unpacks with the same unpacker, sequentially, and
//!   adds the `cri.*` labels of `pkg/snapshotters/annotations.go` only when
//!   the proxy plugin exports `enable_remote_snapshot_annotations = "true"`.
//!
//! What a container would get is checked by mounting the snapshot on top
//! and finding, for every layer, a file only that layer has.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};
use tarn_integration::client::{Client, commit_on, list, prepare, remove, view};
use tarn_integration::daemon::Daemon;
use tarn_integration::mounts::Mounted;
use tarn_integration::registry::TestRegistry;
use tarn_integration::testbed::repo_root;
use tarn_proto::Mount;
use tarn_proto::admin::StatsRequest;
use tarn_proto::snapshots as pb;
use tarn_snapshotter::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, DIFF_ID,
    PARENT_CHAIN_ID, SNAPSHOT_REF,
};
use tonic::Code;

/// The five eStargz layers of `scripts/images.sh`'s multi-esgz: busybox,
/// Python, Go's sources, Go's tools, the app.
const IMAGE: &str = "multi-esgz";

fn json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (algo, hex) = digest.split_once(':').expect("digest is ALGO:HEX");
    layout.join("blobs").join(algo).join(hex)
}

/// One layer as the unpacker sees it.
struct Layer {
    digest: String,
    blob: PathBuf,
    /// The manifest's annotations containerd passes on (`containerd.io/snapshot/*`).
    inherited: HashMap<String, String>,
    diff_id: String,
    chain_id: String,
}

struct Image {
    reference: String,
    manifest_digest: String,
    layers: Vec<Layer>,
}

/// identity.ChainIDs: chain(0) = diff(0), chain(i) = sha256("chain(i-1) diff(i)").
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let sum = Sha256::digest(format!("{prev} {d}").as_bytes());
                let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
                format!("sha256:{hex}")
            }
        };
        out.push(next);
    }
    out
}

/// The cached test image `name`, pushed to `reg`.
fn image(reg: &TestRegistry, name: &str) -> Image {
    let out = Command::new(repo_root().join("scripts/images.sh"))
        .args(["path", name])
        .output()
        .expect("running images.sh path");
    assert!(out.status.success(), "images.sh path {name} failed");
    let layout = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let index = json(&layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("index names a manifest")
        .to_owned();
    let manifest = json(&blob(&layout, &manifest_digest));
    let config = json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().expect("config"),
    ));
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff id").to_owned())
        .collect();
    let chains = chain_ids(&diff_ids);
    let layers = manifest["layers"]
        .as_array()
        .expect("manifest has layers")
        .iter()
        .zip(diff_ids.iter().zip(chains))
        .map(|(l, (diff_id, chain_id))| {
            let digest = l["digest"].as_str().expect("layer digest").to_owned();
            let inherited = l["annotations"]
                .as_object()
                .map(|a| {
                    a.iter()
                        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            Layer {
                blob: blob(&layout, &digest),
                digest,
                inherited,
                diff_id: diff_id.clone(),
                chain_id,
            }
        })
        .collect();
    let reference = reg.bed().push_image(name).expect("push image");
    Image {
        reference,
        manifest_digest,
        layers,
    }
}

impl Image {
    /// The labels of layer `i`'s extraction Prepare: AppendInfoHandlerWrapper's
    /// (when the annotations are on), the layer's own, the unpacker's.
    fn labels(&self, i: usize, remote_annotations: bool) -> HashMap<String, String> {
        let l = &self.layers[i];
        let mut labels = l.inherited.clone();
        if remote_annotations {
            let all: Vec<&str> = self.layers[i..].iter().map(|l| l.digest.as_str()).collect();
            labels.insert(CRI_IMAGE_REF.into(), self.reference.clone());
            labels.insert(CRI_LAYER_DIGEST.into(), l.digest.clone());
            labels.insert(CRI_IMAGE_LAYERS.into(), all.join(","));
            labels.insert(CRI_MANIFEST_DIGEST.into(), self.manifest_digest.clone());
        }
        labels.insert(SNAPSHOT_REF.into(), l.chain_id.clone());
        labels.insert(DIFF_ID.into(), l.diff_id.clone());
        if i > 0 {
            labels.insert(PARENT_CHAIN_ID.into(), self.layers[i - 1].chain_id.clone());
        }
        labels
    }
}

/// containerd's metadata store in front of the proxy: backend names.
struct Containerd {
    c: Client,
    seq: u64,
    /// Chain ID -> the backend snapshot's name.
    backend: HashMap<String, String>,
}

/// What one extraction Prepare came to.
enum Prepared {
    /// The snapshotter has it (a lazy layer): nothing to apply or commit.
    Exists,
    /// An active snapshot to apply the layer to, then commit.
    Active { key: String, mounts: Vec<Mount> },
}

impl Containerd {
    fn key(&mut self, name: &str) -> String {
        self.seq += 1;
        format!("default/{}/{name}", self.seq)
    }

    /// The backend name of chain `chain`'s snapshot ("" for none).
    fn bparent(&self, chain: Option<&str>) -> String {
        chain
            .map(|c| self.backend.get(c).expect("parent committed").clone())
            .unwrap_or_default()
    }

    /// An extraction Prepare on backend parent `bparent`, and on
    /// ALREADY_EXISTS the metadata store's lookup of the target.
    async fn prepare(
        &mut self,
        chain: &str,
        bparent: &str,
        labels: HashMap<String, String>,
    ) -> Prepared {
        let key = self.key(&format!("extract-{} {chain}", self.seq));
        let r = self
            .c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "tarn".into(),
                key: key.clone(),
                parent: bparent.into(),
                labels,
            })
            .await;
        match r {
            Ok(r) => Prepared::Active {
                key,
                mounts: r.into_inner().mounts,
            },
            Err(s) if s.code() == Code::AlreadyExists => {
                let filter = format!("labels.\"{SNAPSHOT_REF}\"=={chain},parent==\"{bparent}\"");
                let found = list(&mut self.c, &[filter.as_str()]).await.expect("walk");
                let committed: Vec<_> = found
                    .into_iter()
                    .filter(|i| i.kind() == pb::Kind::Committed && i.parent == bparent)
                    .collect();
                assert_eq!(
                    committed.len(),
                    1,
                    "containerd finds the target {chain} on parent {bparent:?}"
                );
                self.backend
                    .insert(chain.to_owned(), committed[0].name.clone());
                Prepared::Exists
            }
            Err(s) => panic!("prepare of {chain}: {s}"),
        }
    }

    /// Commit with the unpacker's labels and, in parallel mode, the parent.
    async fn commit(
        &mut self,
        chain: &str,
        key: &str,
        labels: HashMap<String, String>,
        parent: Option<&str>,
    ) {
        let name = self.key(chain);
        let bparent = self.bparent(parent);
        commit_on(&mut self.c, &name, key, labels, &bparent)
            .await
            .unwrap_or_else(|s| panic!("commit of {chain}: {s}"));
        self.backend.insert(chain.to_owned(), name);
    }
}

/// Applies layer `blob` to an extraction's mounts as containerd's applier
/// does (core/diff/apply/apply_linux.go): into `upperdir` with overlay
/// whiteouts for an overlay mount, through the mount otherwise.
fn apply(blob: &Path, mounts: &[Mount]) {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let upper = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="));
    match (mounts[0].r#type.as_str(), upper) {
        ("overlay", Some(upper)) => untar(blob, Path::new(upper), true),
        ("bind", None) => {
            let m = Mounted::new(mounts);
            untar(blob, &m.target, false);
        }
        other => panic!("an extraction mount containerd cannot apply to: {other:?}"),
    }
}

/// Untars `blob` into `dir`; with `overlay`, whiteouts become overlayfs'
/// (a 0/0 character device, the opaque xattr), as OverlayConvertWhiteout.
fn untar(blob: &Path, dir: &Path, overlay: bool) {
    let ok = Command::new("tar")
        .args(["-xzf"])
        .arg(blob)
        .arg("-C")
        .arg(dir)
        .args(["--numeric-owner", "--same-owner", "-p"])
        .status()
        .expect("run tar");
    assert!(ok.success(), "untar {}", blob.display());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let e = e.expect("dir entry");
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name == ".wh..wh..opq" {
                std::fs::remove_file(&path).expect("remove opaque marker");
                if overlay {
                    xattr_opaque(&d);
                }
            } else if let Some(target) = name.strip_prefix(".wh.") {
                std::fs::remove_file(&path).expect("remove whiteout marker");
                if overlay {
                    whiteout(&d.join(target));
                }
            } else if e.file_type().expect("file type").is_dir() {
                stack.push(path);
            }
        }
    }
}

/// overlayfs' whiteout: a character device 0/0.
fn whiteout(path: &Path) {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
}

fn xattr_opaque(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("no NUL in a path");
    let name = c"trusted.overlay.opaque";
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value is a 1-byte buffer whose length is passed.
    let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
}

/// Regular files of a layer blob with their sizes (`tar -tv`).
fn files(blob: &Path) -> Vec<(String, u64)> {
    let out = Command::new("tar")
        .args(["-tvzf"])
        .arg(blob)
        .output()
        .expect("run tar -t");
    assert!(out.status.success(), "tar -t {}", blob.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let size = f.get(2)?.parse().ok()?;
            let path = f.get(5..)?.join(" ");
            // Relative to the rootfs, however the tar names it.
            let path = path.trim_start_matches("./").trim_start_matches('/');
            Some((path.to_owned(), size))
        })
        // eStargz's own entries, not the image's.
        .filter(|(p, _)| {
            !p.starts_with("stargz.index.json")
                && !p.starts_with(".prefetch.landmark")
                && !p.starts_with(".no.prefetch.landmark")
        })
        .collect()
}

/// Asserts that the mounted rootfs shows, for every layer, a file that
/// layer alone has, with its size.
fn assert_every_layer_shows(root: &Path, image: &Image) {
    let listings: Vec<Vec<(String, u64)>> = image.layers.iter().map(|l| files(&l.blob)).collect();
    for (i, listing) in listings.iter().enumerate() {
        let later: std::collections::HashSet<&str> = listings[i + 1..]
            .iter()
            .flatten()
            .map(|(p, _)| p.as_str())
            .collect();
        let (path, size) = listing
            .iter()
            .find(|(p, _)| !later.contains(p.as_str()))
            .unwrap_or_else(|| panic!("layer {i} has a file of its own"));
        let md = std::fs::metadata(root.join(path))
            .unwrap_or_else(|e| panic!("layer {i}'s /{path} in the container's rootfs: {e}"));
        assert_eq!(md.size(), *size, "layer {i}'s /{path}");
    }
}

async fn daemon(reg: &TestRegistry) -> (Daemon, Containerd) {
    let d = Daemon::start_with(
        None,
        &format!("[registry]\nplain_http = [\"{}\"]\n", reg.host()),
    )
    .expect("start tarn-snapshotter");
    let c = d.client().await.expect("connect to tarn-snapshotter");
    (
        d,
        Containerd {
            c,
            seq: 0,
            backend: HashMap::new(),
        },
    )
}

async fn fallbacks(d: &Daemon) -> HashMap<String, u64> {
    let mut admin = d.admin().await.expect("admin client");
    let s = admin
        .stats(StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    s.fallbacks_by_cause.into_iter().collect()
}

/// A container's snapshot on top of the image, mounted.
async fn container(ctd: &mut Containerd, top: &str) -> (String, Mounted) {
    let key = ctd.key("ctr");
    let parent = ctd.bparent(Some(top));
    let mounts = prepare(&mut ctd.c, &key, &parent)
        .await
        .expect("prepare the container's snapshot");
    (key, Mounted::new(&mounts))
}

/// Parallel unpack (`max_concurrent_unpacks > 1`, `rebase` declared) of an
/// eStargz image by containerd 2.3 as released: the bottom layer is lazy;
/// the layers above it come parentless, fall back (tarn cannot commit a
/// lazy snapshot on a parent containerd did not send and still be found),
/// are applied by containerd and committed in order on their parents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_unpack_keeps_every_layer() {
    let reg = TestRegistry::start().expect("registry");
    let img = image(&reg, IMAGE);
    let (d, mut ctd) = daemon(&reg).await;

    // Top half: every Prepare, in layer order, none with a parent.
    let mut active = Vec::new();
    for (i, l) in img.layers.iter().enumerate() {
        match ctd.prepare(&l.chain_id, "", img.labels(i, true)).await {
            Prepared::Exists => {
                assert_eq!(i, 0, "only the bottom layer can be lazy in parallel mode");
            }
            Prepared::Active { key, mounts } => active.push((i, key, mounts)),
        }
    }
    assert_eq!(active.len(), img.layers.len() - 1);
    // The applies run concurrently in containerd: any order will do.
    for (i, _, mounts) in active.iter().rev() {
        apply(&img.layers[*i].blob, mounts);
    }
    // Bottom half: commits in layer order, each on its parent.
    for (i, key, _) in &active {
        let parent = (*i > 0).then(|| img.layers[i - 1].chain_id.clone());
        ctd.commit(
            &img.layers[*i].chain_id,
            key,
            img.labels(*i, true),
            parent.as_deref(),
        )
        .await;
    }
    assert_eq!(
        fallbacks(&d).await.get("no-parent"),
        Some(&(img.layers.len() as u64 - 1)),
        "the layers above the lazy one are counted"
    );

    let top = img.layers.last().expect("layers").chain_id.clone();
    let (key, m) = container(&mut ctd, &top).await;
    assert_every_layer_shows(&m.target, &img);
    drop(m);
    remove(&mut ctd.c, &key)
        .await
        .expect("remove container snapshot");
}

/// Ordinary layers in parallel mode, with a whiteout: the layer above
/// deletes a file of the layer below. Applied to a bare directory the
/// deletion would be lost; tarn hands out the upper dir as overlay so the
/// applier keeps it as overlayfs does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_unpack_keeps_whiteouts_of_ordinary_layers() {
    let d = Daemon::start().expect("start tarn-snapshotter");
    let c = d.client().await.expect("connect");
    let mut ctd = Containerd {
        c,
        seq: 0,
        backend: HashMap::new(),
    };
    let labels = |chain: &str, parent: Option<&str>| {
        let mut l = HashMap::from([
            (SNAPSHOT_REF.to_owned(), chain.to_owned()),
            (DIFF_ID.to_owned(), format!("sha256:{}", "d".repeat(64))),
        ]);
        if let Some(p) = parent {
            l.insert(PARENT_CHAIN_ID.to_owned(), p.to_owned());
        }
        l
    };
    let Prepared::Active {
        key: k0,
        mounts: m0,
    } = ctd.prepare("c0", "", labels("c0", None)).await
    else {
        panic!("an ordinary layer is prepared")
    };
    let Prepared::Active {
        key: k1,
        mounts: m1,
    } = ctd.prepare("c1", "", labels("c1", Some("c0"))).await
    else {
        panic!("an ordinary layer is prepared")
    };
    assert_eq!(
        m0[0].r#type, "bind",
        "the bottom layer has no parent to await"
    );
    assert_eq!(m1[0].r#type, "overlay");
    {
        let m = Mounted::new(&m0);
        std::fs::create_dir_all(m.path("a")).expect("mkdir");
        std::fs::write(m.path("a/keep"), "keep\n").expect("write");
        std::fs::write(m.path("a/gone"), "gone\n").expect("write");
    }
    let upper = m1[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .expect("upperdir");
    std::fs::create_dir_all(Path::new(upper).join("a")).expect("mkdir");
    whiteout(&Path::new(upper).join("a/gone"));
    std::fs::write(Path::new(upper).join("b"), "b\n").expect("write");

    ctd.commit("c0", &k0, labels("c0", None), None).await;
    ctd.commit("c1", &k1, labels("c1", Some("c0")), Some("c0"))
        .await;

    let key = ctd.key("check");
    let parent = ctd.bparent(Some("c1"));
    let mounts = view(&mut ctd.c, &key, &parent).await.expect("view");
    {
        let m = Mounted::new(&mounts);
        assert_eq!(
            std::fs::read_to_string(m.path("a/keep")).expect("keep"),
            "keep\n"
        );
        assert_eq!(std::fs::read_to_string(m.path("b")).expect("b"), "b\n");
        assert!(!m.path("a/gone").exists(), "deleted by the layer above");
    }
    remove(&mut ctd.c, &key).await.expect("remove view");
}

/// The transfer service (2.x's `ctr image pull`, CRI) with
/// `enable_remote_snapshot_annotations`: sequential, every Prepare on its
/// parent with the 2.3 label set. Every eStargz layer is lazy. (This is
/// also parallel unpack once containerd's metadata store passes the parent
/// it finds in `parent-chain-id`, containerd PR #13356.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_service_labels_serve_every_layer_lazily() {
    let reg = TestRegistry::start().expect("registry");
    let img = image(&reg, IMAGE);
    let (d, mut ctd) = daemon(&reg).await;

    for (i, l) in img.layers.iter().enumerate() {
        let parent = (i > 0).then(|| img.layers[i - 1].chain_id.clone());
        let bparent = ctd.bparent(parent.as_deref());
        match ctd
            .prepare(&l.chain_id, &bparent, img.labels(i, true))
            .await
        {
            Prepared::Exists => {}
            Prepared::Active { .. } => panic!("layer {i} was not lazy: {:?}", fallbacks(&d).await),
        }
    }
    assert!(fallbacks(&d).await.is_empty());

    let top = img.layers.last().expect("layers").chain_id.clone();
    let (key, m) = container(&mut ctd, &top).await;
    assert_every_layer_shows(&m.target, &img);
    drop(m);
    remove(&mut ctd.c, &key)
        .await
        .expect("remove container snapshot");

    // Without the export the transfer service sends no image reference.
    // A layer already on the node is found by its diff ID all the same:
    // containerd then neither downloads nor unpacks it.
    let mut bare = img.labels(0, false);
    bare.insert(SNAPSHOT_REF.into(), "sha256:other".into());
    assert!(matches!(
        ctd.prepare("sha256:other", "", bare.clone()).await,
        Prepared::Exists
    ));
    // Any other layer is an ordinary Prepare, counted.
    bare.insert(SNAPSHOT_REF.into(), "sha256:another".into());
    bare.insert(DIFF_ID.into(), format!("sha256:{}", "0".repeat(64)));
    let Prepared::Active { key, .. } = ctd.prepare("sha256:another", "", bare).await else {
        panic!("a layer not on the node is prepared for containerd to unpack");
    };
    assert_eq!(fallbacks(&d).await.get("no-image-ref"), Some(&1));
    remove(&mut ctd.c, &key).await.expect("remove");
}
