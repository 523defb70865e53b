//! containerd snapshotter semantics, checked against the real daemon over its
//! socket with real overlay and bind mounts (needs root), after the cases of
//! containerd's `snapshots/testsuite`. Keys are prefixed like containerd's
//! (`default/N/name`). Every mount is undone by a guard's Drop.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use tarn_integration::client::{
    Client, commit, commit_labels, list, prepare, remove, stat, usage, view,
};
use tarn_integration::daemon::{Daemon, unix_channel};
use tarn_integration::mounts::Mounted;
use tarn_proto::Mount;
use tarn_proto::snapshots::{self as pb, Kind};
use tonic::Code;

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A key the way containerd's metadata store names snapshots.
fn key(name: &str) -> String {
    format!("default/{}/{name}", SEQ.fetch_add(1, Ordering::Relaxed))
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn setup() -> (Daemon, Client) {
    let d = Daemon::start().expect("start tarn-snapshotter");
    let c = d.client().await.expect("connect to tarn-snapshotter");
    (d, c)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("call should have failed").code()
}

fn write(path: &Path, content: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir -p");
    }
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Prepares `key` on `parent`, applies `f` to its mounted tree and commits
/// it as `name`.
async fn layer(c: &mut Client, name: &str, parent: &str, f: impl FnOnce(&Mounted)) {
    let k = key(&format!("extract-{name}"));
    let mounts = prepare(c, &k, parent).await.expect("prepare layer");
    {
        let m = Mounted::new(&mounts);
        f(&m);
    }
    commit(c, name, &k).await.expect("commit layer");
}

/// Mounts a fresh view of `parent` for checking, removed on return.
async fn with_view(c: &mut Client, parent: &str, f: impl FnOnce(&Mounted)) {
    let k = key("check");
    let mounts = view(c, &k, parent).await.expect("view");
    {
        let m = Mounted::new(&mounts);
        f(&m);
    }
    remove(c, &k).await.expect("remove view");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_layers_stack_and_file_contents_show_through() {
    let (_d, mut c) = setup().await;
    let active = key("preparing");
    let mounts = prepare(&mut c, &active, "").await.unwrap();
    {
        let m = Mounted::new(&mounts);
        write(&m.path("foo"), "foo\n");
        write(&m.path("a/b"), "content\n");
        write(&m.path("a/c"), "content\n");
        std::fs::create_dir(m.path("empty")).unwrap();
    }
    let committed = key("committed");
    commit(&mut c, &committed, &active).await.unwrap();
    let info = stat(&mut c, &committed).await.unwrap();
    assert_eq!(info.name, committed);
    assert_eq!(info.kind(), Kind::Committed);
    assert_eq!(info.parent, "");

    let next = key("nextlayer");
    let mounts = prepare(&mut c, &next, &committed).await.unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    {
        let m = Mounted::new(&mounts);
        assert_eq!(read(&m.path("foo")), "foo\n", "lower file visible");
        write(&m.path("bar"), "bar\n");
        write(&m.path("a/b"), "changed\n");
        std::fs::remove_file(m.path("foo")).unwrap();
    }
    let next_committed = key("committed-next");
    commit(&mut c, &next_committed, &next).await.unwrap();
    assert_eq!(
        stat(&mut c, &next_committed).await.unwrap().parent,
        committed
    );

    with_view(&mut c, &next_committed, |m| {
        assert!(!m.path("foo").exists(), "deleted in the upper layer");
        assert_eq!(read(&m.path("bar")), "bar\n");
        assert_eq!(read(&m.path("a/b")), "changed\n");
        assert_eq!(read(&m.path("a/c")), "content\n");
        assert!(m.path("empty").is_dir());
    })
    .await;
    with_view(&mut c, &committed, |m| {
        assert_eq!(read(&m.path("foo")), "foo\n", "the base layer is unchanged");
        assert_eq!(read(&m.path("a/b")), "content\n");
        assert!(!m.path("bar").exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_and_usage_of_active_and_committed() {
    let (_d, mut c) = setup().await;
    let active = key("active");
    let mounts = prepare(&mut c, &active, "").await.unwrap();
    let info = stat(&mut c, &active).await.unwrap();
    assert_eq!(
        (info.name.as_str(), info.kind(), info.parent.as_str()),
        (active.as_str(), Kind::Active, "")
    );
    let created = info.created_at.expect("created time");
    let empty = usage(&mut c, &active).await;
    {
        let m = Mounted::new(&mounts);
        write(&m.path("big"), &"x".repeat(64 * 1024));
    }
    let grown = usage(&mut c, &active).await;
    assert!(
        grown.size >= empty.size + 64 * 1024,
        "{empty:?} -> {grown:?}"
    );
    assert_eq!(grown.inodes, empty.inodes + 1);

    let name = key("committed");
    commit(&mut c, &name, &active).await.unwrap();
    let info = stat(&mut c, &name).await.unwrap();
    assert_eq!(info.kind(), Kind::Committed);
    assert!(info.created_at.expect("created").seconds >= created.seconds);
    assert_eq!(
        usage(&mut c, &name).await,
        grown,
        "commit records the usage"
    );
    assert_eq!(
        code(stat(&mut c, &active).await),
        Code::NotFound,
        "active key is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitivity_of_parents() {
    let (_d, mut c) = setup().await;
    let a = key("a");
    layer(&mut c, &a, "", |m| write(&m.path("a"), "a")).await;
    let b = key("b");
    layer(&mut c, &b, &a, |m| write(&m.path("b"), "b")).await;
    let cc = key("c");
    layer(&mut c, &cc, &b, |m| write(&m.path("c"), "c")).await;
    assert_eq!(stat(&mut c, &cc).await.unwrap().parent, b);
    assert_eq!(stat(&mut c, &b).await.unwrap().parent, a);
    assert_eq!(stat(&mut c, &a).await.unwrap().parent, "");
    with_view(&mut c, &cc, |m| {
        for f in ["a", "b", "c"] {
            assert_eq!(read(&m.path(f)), f, "{f} reaches the top");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_prepare_view_commit_and_mounts() {
    let (_d, mut c) = setup().await;
    let active = key("active");
    prepare(&mut c, &active, "").await.unwrap();
    assert_eq!(
        code(prepare(&mut c, &active, "").await),
        Code::AlreadyExists
    );
    assert_eq!(code(view(&mut c, &active, "").await), Code::AlreadyExists);
    assert_eq!(
        code(prepare(&mut c, &key("x"), &key("missing")).await),
        Code::NotFound
    );
    assert_eq!(
        code(prepare(&mut c, &key("x"), &active).await),
        Code::InvalidArgument,
        "parent must be committed"
    );
    let committed = key("committed");
    commit(&mut c, &committed, &active).await.unwrap();
    assert_eq!(
        code(prepare(&mut c, &committed, "").await),
        Code::AlreadyExists
    );
    let v = key("view");
    view(&mut c, &v, &committed).await.unwrap();
    assert_eq!(
        code(prepare(&mut c, &v, &committed).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(commit(&mut c, &key("c2"), &v).await),
        Code::FailedPrecondition,
        "a view cannot be committed"
    );
    let a2 = key("active2");
    prepare(&mut c, &a2, &committed).await.unwrap();
    assert_eq!(
        code(commit(&mut c, &committed, &a2).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(commit(&mut c, &key("c3"), &key("missing")).await),
        Code::NotFound
    );
    let mounts = c
        .mounts(pb::MountsRequest {
            snapshotter: "tarn".into(),
            key: committed.clone(),
        })
        .await;
    assert_eq!(
        code(mounts),
        Code::FailedPrecondition,
        "committed snapshots have no mounts"
    );
    let mounts = c
        .mounts(pb::MountsRequest {
            snapshotter: "tarn".into(),
            key: a2.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        mounts,
        prepare_mounts_again(&mut c, &a2).await,
        "Mounts repeats Prepare's answer"
    );
    assert_eq!(code(prepare(&mut c, "", "").await), Code::InvalidArgument);
}

async fn prepare_mounts_again(c: &mut Client, key: &str) -> Vec<Mount> {
    c.mounts(pb::MountsRequest {
        snapshotter: "tarn".into(),
        key: key.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .mounts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_labels_with_field_paths() {
    let (_d, mut c) = setup().await;
    let k = key("labelled");
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "tarn".into(),
        key: k.clone(),
        parent: String::new(),
        labels: labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3")]),
    })
    .await
    .unwrap();
    let before = stat(&mut c, &k).await.unwrap();
    assert_eq!(
        before.labels,
        labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3")])
    );
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;

    let update = |info: pb::Info, paths: &[&str]| pb::UpdateSnapshotRequest {
        snapshotter: "tarn".into(),
        info: Some(info),
        update_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    let mut info = before.clone();
    info.labels = labels(&[("l1", "v1-new"), ("l4", "v4")]);
    // Like `ctr snapshots label KEY l1=v1-new l2=`.
    let got = c
        .update(update(info.clone(), &["labels.l1", "labels.l2"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(
        got.labels,
        labels(&[("l1", "v1-new"), ("l3", "v3")]),
        "l2 removed, l4 not asked for"
    );
    assert_eq!(got.created_at, before.created_at);
    assert!(
        got.updated_at.unwrap().nanos != before.updated_at.unwrap().nanos
            || got.updated_at.unwrap().seconds > before.updated_at.unwrap().seconds
    );
    assert_eq!(
        stat(&mut c, &k).await.unwrap().labels,
        got.labels,
        "persisted"
    );

    let got = c
        .update(update(info.clone(), &["labels"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(got.labels, info.labels, "labels replaced as a whole");
    info.labels = labels(&[("only", "x")]);
    let got = c
        .update(update(info.clone(), &[]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(
        got.labels, info.labels,
        "no mask updates all mutable fields"
    );

    assert_eq!(
        code(c.update(update(info.clone(), &["name"])).await),
        Code::InvalidArgument
    );
    info.name = key("missing");
    assert_eq!(code(c.update(update(info, &[])).await), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_with_and_without_children() {
    let (d, mut c) = setup().await;
    let base = key("base");
    layer(&mut c, &base, "", |m| write(&m.path("f"), "f")).await;
    let child = key("child");
    prepare(&mut c, &child, &base).await.unwrap();
    let v = key("view");
    view(&mut c, &v, &base).await.unwrap();
    assert_eq!(code(remove(&mut c, &base).await), Code::FailedPrecondition);
    remove(&mut c, &child).await.unwrap();
    assert_eq!(
        code(remove(&mut c, &base).await),
        Code::FailedPrecondition,
        "a view is a child too"
    );
    remove(&mut c, &v).await.unwrap();
    remove(&mut c, &base).await.unwrap();
    assert_eq!(code(remove(&mut c, &base).await), Code::NotFound);
    assert_eq!(code(stat(&mut c, &base).await), Code::NotFound);
    let left: Vec<_> = std::fs::read_dir(d.root().join("snapshots"))
        .unwrap()
        .collect();
    assert!(
        left.is_empty(),
        "directories removed with their snapshots: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_walk_with_filters() {
    let (_d, mut c) = setup().await;
    let base = key("base");
    let k = key("extract");
    prepare(&mut c, &k, "").await.unwrap();
    commit_labels(
        &mut c,
        &base,
        &k,
        labels(&[("containerd.io/gc.root", "yes"), ("tier", "base")]),
    )
    .await
    .unwrap();
    let active = key("container");
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "tarn".into(),
        key: active.clone(),
        parent: base.clone(),
        labels: labels(&[("tier", "app")]),
    })
    .await
    .unwrap();
    let v = key("view");
    view(&mut c, &v, &base).await.unwrap();

    let names = |infos: Vec<pb::Info>| {
        let mut n: Vec<String> = infos.into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    let mut all = vec![base.clone(), active.clone(), v.clone()];
    all.sort();
    assert_eq!(names(list(&mut c, &[]).await.unwrap()), all);
    assert_eq!(
        names(list(&mut c, &[&format!("name=={active}")]).await.unwrap()),
        vec![active.clone()]
    );
    let mut children = vec![active.clone(), v.clone()];
    children.sort();
    assert_eq!(
        names(list(&mut c, &[&format!("parent=={base}")]).await.unwrap()),
        children
    );
    assert_eq!(
        names(list(&mut c, &["kind==committed"]).await.unwrap()),
        vec![base.clone()]
    );
    assert_eq!(
        names(list(&mut c, &["kind==view"]).await.unwrap()),
        vec![v.clone()]
    );
    assert_eq!(
        names(
            list(&mut c, &[r#"labels."containerd.io/gc.root"==yes"#])
                .await
                .unwrap()
        ),
        vec![base.clone()]
    );
    assert_eq!(
        names(
            list(&mut c, &[r#"labels."containerd.io/gc.root""#])
                .await
                .unwrap()
        ),
        vec![base.clone()]
    );
    assert_eq!(
        names(
            list(&mut c, &["labels.tier==app,kind==active"])
                .await
                .unwrap()
        ),
        vec![active.clone()]
    );
    assert!(
        list(&mut c, &["labels.tier==app,kind==view"])
            .await
            .unwrap()
            .is_empty()
    );
    let mut either = vec![active.clone(), v.clone()];
    either.sort();
    assert_eq!(
        names(
            list(&mut c, &["labels.tier==app", "kind==view"])
                .await
                .unwrap()
        ),
        either
    );
    assert_eq!(code(list(&mut c, &["kind=="]).await), Code::InvalidArgument);

    // What List reports is what Stat reports.
    for info in list(&mut c, &[]).await.unwrap() {
        assert_eq!(stat(&mut c, &info.name).await.unwrap(), info);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_deleted_in_child_and_directories_replaced() {
    let (_d, mut c) = setup().await;
    let l1 = key("l1");
    layer(&mut c, &l1, "", |m| {
        write(&m.path("file"), "here");
        write(&m.path("dir/inner"), "inner");
        write(&m.path("replaced/old"), "old");
    })
    .await;
    let l2 = key("l2");
    layer(&mut c, &l2, &l1, |m| {
        std::fs::remove_file(m.path("file")).unwrap();
        std::fs::remove_dir_all(m.path("dir")).unwrap();
        std::fs::remove_dir_all(m.path("replaced")).unwrap();
        write(&m.path("replaced/new"), "new");
    })
    .await;
    with_view(&mut c, &l2, |m| {
        assert!(!m.path("file").exists());
        assert!(!m.path("dir").exists());
        assert!(
            !m.path("replaced/old").exists(),
            "recreated dir hides the lower one"
        );
        assert_eq!(read(&m.path("replaced/new")), "new");
    })
    .await;
    with_view(&mut c, &l1, |m| {
        assert_eq!(read(&m.path("file")), "here");
        assert_eq!(read(&m.path("dir/inner")), "inner");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_moved_from_lower_layer_and_renames() {
    let (_d, mut c) = setup().await;
    let l1 = key("l1");
    layer(&mut c, &l1, "", |m| {
        write(&m.path("dir1/f1"), "Hello");
        std::fs::create_dir(m.path("dir2")).unwrap();
        std::fs::create_dir(m.path("emptydir")).unwrap();
        write(&m.path("somefiles/f1"), "was here first!");
        write(&m.path("somefiles/f2"), "nothing interesting");
    })
    .await;
    let l2 = key("l2");
    layer(&mut c, &l2, &l1, |m| {
        std::fs::rename(m.path("dir1/f1"), m.path("dir2/f1")).unwrap();
        write(&m.path("somefiles/f1-overwrite"), "new content 1");
        std::fs::rename(m.path("somefiles/f1-overwrite"), m.path("somefiles/f1")).unwrap();
        std::fs::rename(m.path("somefiles/f2"), m.path("somefiles/f3")).unwrap();
        // A directory of a lower layer: overlayfs may answer EXDEV; mv
        // then copies, which is what a user's tools do.
        let st = Command::new("mv")
            .arg(m.path("emptydir"))
            .arg(m.path("moveddir"))
            .status()
            .unwrap();
        assert!(st.success());
    })
    .await;
    with_view(&mut c, &l2, |m| {
        assert!(!m.path("dir1/f1").exists());
        assert_eq!(read(&m.path("dir2/f1")), "Hello");
        assert_eq!(read(&m.path("somefiles/f1")), "new content 1");
        assert!(!m.path("somefiles/f2").exists());
        assert_eq!(read(&m.path("somefiles/f3")), "nothing interesting");
        assert!(!m.path("emptydir").exists());
        assert!(m.path("moveddir").is_dir());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chown_and_directory_permissions_survive_commit() {
    let (_d, mut c) = setup().await;
    let l1 = key("l1");
    layer(&mut c, &l1, "", |m| {
        std::fs::create_dir(m.path("dir1")).unwrap();
        std::fs::set_permissions(m.path("dir1"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::create_dir(m.path("dir2")).unwrap();
        std::fs::set_permissions(m.path("dir2"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(m.path("dir2"), Some(1), Some(2)).unwrap();
        write(&m.path("file"), "f");
    })
    .await;
    let l2 = key("l2");
    layer(&mut c, &l2, &l1, |m| {
        std::fs::create_dir(m.path("dir3")).unwrap();
        std::fs::set_permissions(m.path("dir3"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::chown(m.path("dir1"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::chown(m.path("file"), Some(1001), Some(1002)).unwrap();
    })
    .await;
    with_view(&mut c, &l2, |m| {
        let md = |p: &str| std::fs::metadata(m.path(p)).unwrap();
        assert_eq!(md("dir1").mode() & 0o7777, 0o700);
        assert_eq!((md("dir1").uid(), md("dir1").gid()), (1000, 1000));
        assert_eq!(
            (
                md("dir2").uid(),
                md("dir2").gid(),
                md("dir2").mode() & 0o7777
            ),
            (1, 2, 0o700)
        );
        assert_eq!(md("dir3").mode() & 0o7777, 0o1777);
        assert_eq!((md("file").uid(), md("file").gid()), (1001, 1002));
    })
    .await;
    with_view(&mut c, &l1, |m| {
        let md = std::fs::metadata(m.path("file")).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (0, 0),
            "chown in the child leaves the parent alone"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_read_only() {
    let (_d, mut c) = setup().await;
    let l1 = key("l1");
    layer(&mut c, &l1, "", |m| write(&m.path("f"), "f")).await;
    let l2 = key("l2");
    layer(&mut c, &l2, &l1, |m| write(&m.path("g"), "g")).await;
    // Lone view, view of one parent (bind), view of two parents (overlay).
    for parent in [String::new(), l1.clone(), l2.clone()] {
        let k = key("ro");
        let mounts = view(&mut c, &k, &parent).await.unwrap();
        {
            let m = Mounted::new(&mounts);
            let e = std::fs::write(m.path("new"), "x").expect_err("a view must be read-only");
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        }
        remove(&mut c, &k).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_directory_permissions() {
    let (_d, mut c) = setup().await;
    let k = key("root");
    let mounts = prepare(&mut c, &k, "").await.unwrap();
    {
        let m = Mounted::new(&mounts);
        let mode = std::fs::metadata(&m.target).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "root of a fresh snapshot");
        std::os::unix::fs::chown(&m.target, Some(7), Some(8)).unwrap();
    }
    let base = key("base");
    commit(&mut c, &base, &k).await.unwrap();
    let child = key("child");
    let mounts = prepare(&mut c, &child, &base).await.unwrap();
    let m = Mounted::new(&mounts);
    let md = std::fs::metadata(&m.target).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert_eq!(
        (md.uid(), md.gid()),
        (7, 8),
        "a child's root keeps its parent's owner"
    );
}

/// containerd's CloseTwice closes a snapshotter twice; for a daemon the
/// equivalent is clients that connect and go away repeatedly and a Cleanup
/// run twice, after which the daemon still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_clients_and_cleanup_twice() {
    let (d, mut c) = setup().await;
    let k = key("keep");
    prepare(&mut c, &k, "").await.unwrap();
    for _ in 0..2 {
        let mut other = d.client().await.unwrap();
        stat(&mut other, &k).await.unwrap();
        drop(other);
        c.cleanup(pb::CleanupRequest {
            snapshotter: "tarn".into(),
        })
        .await
        .unwrap();
    }
    let stray = d.root().join("snapshots/424242");
    std::fs::create_dir_all(stray.join("fs")).unwrap();
    c.cleanup(pb::CleanupRequest {
        snapshotter: "tarn".into(),
    })
    .await
    .unwrap();
    assert!(!stray.exists(), "cleanup removes unreferenced directories");
    assert_eq!(stat(&mut c, &k).await.unwrap().kind(), Kind::Active);
    let mounts = prepare_mounts_again(&mut c, &k).await;
    assert!(
        Path::new(&mounts[0].source).is_dir(),
        "referenced dirs are kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_of_128_layers_mounts() {
    let (_d, mut c) = setup().await;
    let mut parent = String::new();
    for i in 0..128 {
        let name = key(&format!("layer-{i}"));
        layer(&mut c, &name, &parent, |m| {
            write(&m.path(&format!("layer-{i}")), &i.to_string());
            write(&m.path("top"), &i.to_string());
        })
        .await;
        parent = name;
    }
    let k = key("container");
    let mounts = prepare(&mut c, &k, &parent).await.unwrap();
    let lower = mounts[0]
        .options
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .unwrap();
    assert_eq!(lower.split(':').count(), 128);
    {
        let m = Mounted::new(&mounts);
        assert_eq!(read(&m.path("top")), "127", "nearest layer wins");
        for i in 0..128 {
            assert_eq!(read(&m.path(&format!("layer-{i}"))), i.to_string());
        }
        write(&m.path("written"), "ok");
    }
    assert!(usage(&mut c, &k).await.size > 0);
    // More than one List batch.
    assert_eq!(list(&mut c, &[]).await.unwrap().len(), 129);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_root_only() {
    let (d, _c) = setup().await;
    for sock in [d.address(), d.admin_address()] {
        let mode = std::fs::metadata(&sock).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", sock.display());
    }
    let mut admin = tarn_proto::admin::admin_client::AdminClient::new(
        unix_channel(&d.admin_address()).await.unwrap(),
    );
    let stats = admin
        .stats(tarn_proto::admin::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.snapshots, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_sigterm_and_restart() {
    let (mut d, mut c) = setup().await;
    let base = key("base");
    layer(&mut c, &base, "", |m| write(&m.path("kept"), "kept")).await;
    let active = key("active");
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "tarn".into(),
        key: active.clone(),
        parent: base.clone(),
        labels: labels(&[("l", "v")]),
    })
    .await
    .unwrap();
    let before = list(&mut c, &[]).await.unwrap();
    drop(c);
    let status = d.restart().expect("restart");
    assert!(status.success(), "SIGTERM exits 0: {status}\n{}", d.log());
    let mut c = d.client().await.unwrap();
    assert_eq!(list(&mut c, &[]).await.unwrap(), before);
    let m = Mounted::new(&prepare_mounts_again(&mut c, &active).await);
    assert_eq!(read(&m.path("kept")), "kept");
    // Ids keep counting after the restart: a new snapshot gets a new dir.
    let existing: Vec<_> = std::fs::read_dir(d.root().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let k = key("new");
    let mounts = prepare(&mut c, &k, "").await.unwrap();
    let dir = Path::new(&mounts[0].source).parent().unwrap().to_owned();
    assert!(dir.is_dir());
    assert!(!existing.contains(&dir), "{} reused", dir.display());
    assert_eq!(
        std::fs::metadata(d.address()).unwrap().mode() & 0o777,
        0o600
    );
}
