//! containerd 1.6 with tarn as its proxy snapshotter, for ordinary (not
//! lazy) images: containerd sees the plugin, pulls an image through it and
//! runs a container on it. Needs root, containerd, runc, docker-registry,
//! umoci, skopeo and busybox-static (see TESTBED.md).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tarn_integration::daemon::Daemon;
use tarn_integration::testbed::{Component, Testbed, TestbedError};
use tarn_integration::wait::{wait_until, wait_until_async};
use tarn_proto::snapshots::snapshots_client::SnapshotsClient;
use tarn_proto::snapshots::{self as pb, Kind};
use tonic::transport::Channel;

/// How long containerd's garbage collector or its proxy client's reconnect
/// may take: a bound for a failure message, not an expectation.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(30);

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds a two-layer busybox image offline (umoci) and pushes it.
fn push_busybox_image(registry: &str, work: &Path) -> String {
    let layout = work.join("oci");
    let image = format!("{}:latest", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));

    let bin = work.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/usr/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&bin)
        .arg("/bin"));
    let hello = work.join("hello.txt");
    std::fs::write(&hello, "hello from layer two\n").unwrap();
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&hello)
        .arg("/etc/hello.txt"));
    run(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/sh"]));

    let reference = format!("{registry}/tarn/busybox:latest");
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{image}"),
        &format!("docker://{reference}"),
    ]));
    reference
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_and_runs_an_ordinary_image_through_tarn() {
    // containerd reaches tarn at the test bed's tarn socket: the daemon this
    // test starts (and restarts) itself.
    let bed = Testbed::up(&[Component::Registry, Component::Containerd]).unwrap();
    let work = tempfile::Builder::new()
        .prefix("tarn-img-")
        .tempdir_in("/tmp")
        .unwrap();
    let reference = push_busybox_image(bed.registry().unwrap(), work.path());

    let mut tarn =
        Daemon::start_with(Some(bed.dir().join("tarn.sock")), "").expect("start tarn-snapshotter");
    let ctrd = Ctr(&bed);

    let plugins =
        String::from_utf8_lossy(&ctrd.ctr(&["plugins", "ls"]).unwrap().stdout).into_owned();
    let line = plugins
        .lines()
        .find(|l| {
            l.contains("io.containerd.snapshotter.v1")
                && l.split_whitespace().nth(1) == Some("tarn")
        })
        .unwrap_or_else(|| panic!("tarn not among containerd's plugins:\n{plugins}"));
    assert!(line.trim_end().ends_with("ok"), "{line}");

    let pull = ctrd
        .ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            &reference,
        ])
        .unwrap();
    assert!(
        pull.status.success(),
        "pull failed: {}\n{}\ncontainerd: {}\ntarn: {}",
        String::from_utf8_lossy(&pull.stdout),
        String::from_utf8_lossy(&pull.stderr),
        ctrd.log(),
        tarn.log()
    );

    // The layers were unpacked into tarn: two committed snapshots, the
    // second on the first, named by chain ID (containerd's metadata store
    // prefixes its backend names: `default/N/sha256:...`).
    let mut c = tarn.client().await.unwrap();
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "tarn".into(),
            filters: vec!["kind==committed".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut committed = Vec::new();
    while let Some(b) = stream.message().await.unwrap() {
        committed.extend(b.info);
    }
    assert_eq!(committed.len(), 2, "{committed:?}");
    assert!(
        committed.iter().all(|i| i.name.starts_with("default/")
            && i.name.contains("/sha256:")
            && i.kind() == Kind::Committed),
        "{committed:?}"
    );
    assert!(committed.iter().any(|i| i.parent.is_empty()));
    assert!(committed.iter().any(|i| !i.parent.is_empty()));

    let out = ctrd
        .ctr(&[
            "run",
            "--snapshotter",
            "tarn",
            "--rm",
            &reference,
            "tarn-plain-1",
            "cat",
            "/etc/hello.txt",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "ctr run failed: {}\ncontainerd: {}\ntarn: {}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log(),
        tarn.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from layer two\n"
    );
    let out = ctrd
        .ctr(&[
            "run",
            "--snapshotter",
            "tarn",
            "--rm",
            &reference,
            "tarn-plain-2",
            "echo",
            "hi",
        ])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --rm deleted the containers; containerd's garbage collector then
    // removes their active snapshots from tarn (asynchronously).
    let active = snapshots_left(&c, "kind==active").await;
    assert!(active.is_ok(), "containerd's GC left {active:?}");
    // containerd drops a snapshot from its own metadata first and asks the
    // snapshotter to remove it afterwards, so tarn's directories go a little
    // later: wait for that, and name what stays if it never happens.
    let snapshot_dirs = tarn.root().join("snapshots");
    let listing = || -> Vec<String> {
        std::fs::read_dir(&snapshot_dirs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let two = wait_until("tarn's removals", CONTAINERD_TIMEOUT, || {
        (listing().len() == 2).then_some(())
    });
    assert!(
        two.is_ok(),
        "only the two layers' directories remain: {:?}",
        listing()
    );

    // Restart tarn under a running containerd: the image's layers are still
    // there, so a container runs without pulling again.
    drop(c);
    let status = tarn.restart().expect("restart tarn");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    // containerd's proxy client reconnects with a back-off of a few seconds.
    let out = wait_until_async(
        "containerd to reconnect to tarn",
        CONTAINERD_TIMEOUT,
        || async {
            let out = ctrd
                .ctr(&[
                    "run",
                    "--snapshotter",
                    "tarn",
                    "--rm",
                    &reference,
                    "tarn-plain-3",
                    "cat",
                    "/etc/hello.txt",
                ])
                .unwrap();
            out.status.success().then_some(out)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: tarn: {}", tarn.log()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from layer two\n",
        "after restart: {}\ntarn: {}",
        String::from_utf8_lossy(&out.stderr),
        tarn.log()
    );

    // Removing the image lets containerd's GC remove every snapshot and
    // directory from tarn.
    let rm = ctrd.ctr(&["image", "rm", "--sync", &reference]).unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let c = tarn.client().await.unwrap();
    let left = snapshots_left(&c, "").await;
    assert!(left.is_ok(), "containerd's GC left {left:?}");
    let dirs = std::fs::read_dir(tarn.root().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(dirs, 0, "no orphaned snapshot directory");
}

/// Waits until tarn holds no snapshot matching `filter` ("" for all);
/// on timeout, the error names what is left.
async fn snapshots_left(c: &SnapshotsClient<Channel>, filter: &str) -> Result<(), String> {
    let list = || async {
        let filters = if filter.is_empty() {
            vec![]
        } else {
            vec![filter.to_owned()]
        };
        let mut stream = c
            .clone()
            .list(pb::ListSnapshotsRequest {
                snapshotter: "tarn".into(),
                filters,
            })
            .await
            .unwrap()
            .into_inner();
        let mut left = Vec::new();
        while let Some(b) = stream.message().await.unwrap() {
            left.extend(b.info);
        }
        left
    };
    let gone = wait_until_async("containerd's GC", CONTAINERD_TIMEOUT, || async {
        list().await.is_empty().then_some(())
    })
    .await;
    match gone {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("{e}: {:?}", list().await)),
    }
}

/// `ctr` on the test bed's containerd, and its log for failure messages.
struct Ctr<'a>(&'a Testbed);

impl Ctr<'_> {
    fn ctr(&self, args: &[&str]) -> Result<std::process::Output, TestbedError> {
        self.0.ctr(args)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.0.dir().join("containerd.log")).unwrap_or_default()
    }
}
