//! The test bed itself: a registry and containerd started by
//! `scripts/testbed.sh` pull and run an image with containerd's own overlayfs
//! snapshotter, and after the test bed is dropped nothing of it remains.

use std::path::Path;

use tarn_integration::testbed::{Component, Testbed};

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not collected it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let dir = dir.to_str().expect("temp dir path is UTF-8");
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == dir || p.starts_with(&format!("{dir}/")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn busybox_runs_on_overlayfs_and_nothing_remains_after_drop() {
    let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
    let image = bed.push_image("busybox").expect("push busybox");

    let pull = bed
        .ctr(&["image", "pull", "--plain-http", &image])
        .expect("run ctr pull");
    assert!(
        pull.status.success(),
        "pull: {}",
        String::from_utf8_lossy(&pull.stderr)
    );
    // The pull fetched the image's one layer (about 1 MB compressed).
    let blob_bytes: u64 = bed
        .registry_log()
        .expect("registry log")
        .iter()
        .filter(|r| r.is_blob_get() && r.status == 200)
        .map(|r| r.bytes)
        .sum();
    assert!(blob_bytes > 500_000, "blob bytes served: {blob_bytes}");

    // Unique ids: runc keeps container state under a system path shared by
    // every containerd on the machine.
    let id = format!("tb-{}", std::process::id());
    let run = bed
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            &image,
            &format!("{id}-once"),
            "/bin/sh",
            "-c",
            "echo hello from busybox; id -u; ls /bin/busybox",
        ])
        .expect("run ctr run");
    assert!(
        run.status.success(),
        "run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "hello from busybox\n0\n/bin/busybox\n"
    );

    // A container still running when the test bed goes down (the image's
    // default command sleeps forever).
    let detached = bed
        .ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "overlayfs",
            &image,
            &format!("{id}-left"),
        ])
        .expect("run ctr run -d");
    assert!(
        detached.status.success(),
        "run -d: {}",
        String::from_utf8_lossy(&detached.stderr)
    );
    let tasks = bed.ctr(&["tasks", "ls"]).expect("run ctr tasks ls");
    let task_pid: u32 = String::from_utf8_lossy(&tasks.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{id}-left")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("detached task listed with its pid");
    assert!(alive(task_pid));

    let dir = bed.dir().to_owned();
    let mut pids = bed.pids();
    pids.push(task_pid);
    assert!(
        !mounts_under(&dir).is_empty(),
        "the running container's rootfs is mounted"
    );
    drop(bed);

    for pid in pids {
        assert!(!alive(pid), "pid {pid} of the test bed still runs");
    }
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
