//! containerd 1.6 with tarn as its proxy snapshotter, for ordinary (not
//! lazy) images: containerd sees the plugin, pulls an image through it and
//! runs a container on it. Needs root, containerd, runc, docker-registry,
//! umoci, skopeo and busybox-static (see TESTBED.md).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tarn_integration::daemon::{Containerd, Daemon, stop_child};
use tarn_proto::snapshots::{self as pb, Kind};

/// A docker-registry on a free loopback port, stopped by PID on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("tarn-reg-")
            .tempdir_in("/tmp")
            .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let r = Registry {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.child, Duration::from_secs(10));
    }
}

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
fn push_busybox_image(registry: &Registry, work: &Path) -> String {
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

    let reference = format!("127.0.0.1:{}/tarn/busybox:latest", registry.port);
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
    let registry = Registry::start();
    let work = tempfile::Builder::new()
        .prefix("tarn-img-")
        .tempdir_in("/tmp")
        .unwrap();
    let reference = push_busybox_image(&registry, work.path());

    let mut tarn = Daemon::start().expect("start tarn-snapshotter");
    let ctrd = Containerd::start(&tarn.address()).expect("start containerd");

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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = c
            .list(pb::ListSnapshotsRequest {
                snapshotter: "tarn".into(),
                filters: vec!["kind==active".into()],
            })
            .await
            .unwrap()
            .into_inner();
        let mut active = Vec::new();
        while let Some(b) = stream.message().await.unwrap() {
            active.extend(b.info);
        }
        if active.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "containerd's GC left {active:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dirs = std::fs::read_dir(tarn.root().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(dirs, 2, "only the two layers' directories remain");

    // Restart tarn under a running containerd: the image's layers are still
    // there, so a container runs without pulling again.
    drop(c);
    let status = tarn.restart().expect("restart tarn");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    // containerd's proxy client reconnects with a back-off of a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
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
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
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
    let mut c = tarn.client().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = c
            .list(pb::ListSnapshotsRequest {
                snapshotter: "tarn".into(),
                filters: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        let mut left = Vec::new();
        while let Some(b) = stream.message().await.unwrap() {
            left.extend(b.info);
        }
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "containerd's GC left {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dirs = std::fs::read_dir(tarn.root().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(dirs, 0, "no orphaned snapshot directory");
}
