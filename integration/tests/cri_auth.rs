//! Credentials passed through CRI: a private registry (htpasswd), the
//! kubelet's image service pointed at tarn's CRI proxy, and a pull with the
//! pod's pull secret. containerd pulls with the credentials the proxy
//! forwards; tarn serves the eStargz layers lazily with the credentials it
//! captured on the way; after a restart of tarn's daemon, files no one has
//! read yet still come, with the credentials from the persisted file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_cri::v1::AuthConfig;
use tarn_integration::cri::Cri;
use tarn_integration::daemon::Daemon;
use tarn_integration::registry::bcrypt;
use tarn_integration::reglog::{self, Request};
use tarn_integration::testbed::{Component, Testbed, repo_root};

const USER: &str = "kubelet";
const PASSWORD: &str = "pull-secret-0";
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The first workload reads the busybox and Python layers.
const FIRST: &str =
    "python3 -c 'import json; print(json.dumps([1, 2]))' && head -c 64 /etc/passwd && echo";
const FIRST_EXPECTED: &[&str] = &["[1, 2]", "root:x:0:0:root:/root:/bin/sh"];

/// Files of the Go source and toolchain layers, which the first workload
/// never reads: after the restart they are fetched for the first time.
const UNREAD: &[&str] = &[
    "usr/share/go-1.19/misc/cgo/nocgo/nocgo.go",
    "usr/lib/go-1.19/pkg/linux_amd64/crypto/ed25519.a",
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The OCI layout of the cached test image `name` (`scripts/images.sh`).
fn layout(name: &str) -> PathBuf {
    let out = Command::new(repo_root().join("scripts/images.sh"))
        .args(["path", name])
        .output()
        .expect("running images.sh path");
    assert!(out.status.success(), "images.sh path {name} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("reading json");
    serde_json::from_str(&text).expect("parsing json")
}

/// The image's layer blobs (path, size), from its layout.
fn layer_blobs(layout: &Path) -> Vec<(PathBuf, u64)> {
    let blob = |digest: &str| {
        let (algo, hex) = digest.split_once(':').expect("ALGO:HEX");
        layout.join("blobs").join(algo).join(hex)
    };
    let index = json(&layout.join("index.json"));
    let manifest = json(&blob(
        index["manifests"][0]["digest"]
            .as_str()
            .expect("a manifest"),
    ));
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                blob(l["digest"].as_str().expect("digest")),
                l["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// What `sha256sum /FILE` prints in the container, from the layer's tar.
fn expected_sum(layout: &Path, file: &str) -> String {
    for (blob, _) in layer_blobs(layout) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -xzOf {} {file} 2>/dev/null | sha256sum",
                blob.display()
            ))
            .output()
            .expect("tar | sha256sum");
        let listed = Command::new("tar")
            .arg("-tzf")
            .arg(&blob)
            .arg(file)
            .output()
            .expect("tar -t");
        if listed.status.success() {
            let sum = String::from_utf8_lossy(&out.stdout);
            let hex = sum.split_whitespace().next().expect("a sum").to_owned();
            return format!("{hex}  /{file}");
        }
    }
    panic!("{file} is in no layer of {}", layout.display());
}

/// Pushes the cached image `name` to the private registry with the user's
/// credentials (images.sh pushes anonymously); returns its reference.
fn push_private(registry: &str, name: &str) -> String {
    let dst = format!("{registry}/{name}:latest");
    let status = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("oci:{}:latest", layout(name).display()))
        .arg(format!("docker://{dst}"))
        .status()
        .expect("running skopeo");
    assert!(status.success(), "pushing {name} to {registry}");
    dst
}

fn fuse_mounts_under(root: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter(|line| {
            let Some((left, right)) = line.split_once(" - ") else {
                return false;
            };
            let point = left.split(' ').nth(4).unwrap_or("");
            right.starts_with("fuse") && Path::new(point).starts_with(root)
        })
        .count()
}

/// Ranged blob GETs of `repo` the registry answered (206).
fn ranged_gets<'a>(requests: &'a [Request], repo: &str) -> Vec<&'a Request> {
    let prefix = format!("/v2/{repo}/blobs/");
    requests
        .iter()
        .filter(|r| r.is_blob_get() && r.path.starts_with(&prefix) && r.status == 206)
        .collect()
}

/// A log without its colours (ANSI escapes).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then one final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn run(cri: &Cri, pod: &str, image: &str, script: &str) -> String {
    // After tarn's restart containerd dials it again, and on a loaded
    // machine may time that dial out (UNAVAILABLE naming tarn.sock): try
    // again, within a bound.
    let mut attempts = 0;
    let container = loop {
        match cri
            .create_container(pod, image, &["/bin/sh"], &["-c", script])
            .await
        {
            Ok(c) => break c,
            Err(e) if attempts < 20 && e.to_string().contains("tarn.sock") => {
                attempts += 1;
                eprintln!("containerd not connected to tarn yet: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("create container: {e}"),
        }
    };
    cri.start(&container).await.expect("start container");
    let code = cri
        .wait_exit(&container, EXIT_TIMEOUT)
        .await
        .expect("container exits");
    let logs = cri.logs(&container).await.expect("container logs");
    assert_eq!(code, 0, "workload failed; its log: {logs:?}");
    cri.stdout(&container).await.expect("container stdout")
}

#[test]
fn cri_pull_secret_reaches_lazy_layers_and_survives_a_restart() {
    let htpasswd = format!("{USER}:{}\n", bcrypt(PASSWORD).expect("bcrypt"));
    let bed = Testbed::up_with(
        &[Component::Registry, Component::Containerd],
        Some(&htpasswd),
    )
    .expect("test bed up");
    let registry = bed.registry().expect("registry").to_owned();
    let containerd_sock = PathBuf::from(bed.containerd_sock().expect("containerd"));
    let registry_log = bed.dir().join("registry.log");
    // The sandbox ("pause") image of the bed's CRI config is busybox on the
    // same registry: it too is pulled through the proxy with the secret.
    let busybox = push_private(&registry, "busybox");
    let image = push_private(&registry, "multi-esgz");
    let multi = layout("multi-esgz");
    let image_size: u64 = layer_blobs(&multi).iter().map(|(_, s)| s).sum();

    // tarn at the socket the bed's containerd expects, with the CRI proxy
    // on; no docker config credentials anywhere.
    let cri_sock = bed.dir().join("tarn-cri.sock");
    let config = format!(
        "[registry]\nplain_http = [\"{registry}\"]\n\
         [cri]\nimage_service_socket = {cri_sock:?}\ncontainerd_cri_socket = {containerd_sock:?}\n"
    );
    let mut daemon =
        Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config).expect("tarn up");
    assert_eq!(
        std::fs::metadata(&cri_sock).expect("cri socket").mode() & 0o777,
        0o600,
        "the image service socket is root-only"
    );

    let rt = runtime();
    let cri = rt
        .block_on(Cri::connect_with_image_service(&containerd_sock, &cri_sock))
        .expect("cri connect");
    // Through the proxy, containerd's answers come back as they are: a
    // pull without the secret is refused by the registry.
    let refused = rt.block_on(cri.pull_image(&image));
    assert!(refused.is_err(), "an anonymous pull of a private image");
    let secret = AuthConfig {
        username: USER.into(),
        password: PASSWORD.into(),
        ..Default::default()
    };
    // containerd dials tarn's socket lazily and, on a loaded machine, may
    // time the first dial out (UNAVAILABLE naming tarn.sock): pull again
    // until it is connected, within a bound.
    let mut attempts = 0;
    loop {
        match rt.block_on(cri.pull_image_with_auth(&busybox, Some(secret.clone()))) {
            Ok(_) => break,
            Err(e) if attempts < 20 && e.to_string().contains("tarn.sock") => {
                attempts += 1;
                eprintln!("containerd not connected to tarn yet: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("pull the sandbox image with the secret: {e}"),
        }
    }
    let image_id = rt
        .block_on(cri.pull_image_with_auth(&image, Some(secret)))
        .expect("pull with the secret");
    assert!(image_id.starts_with("sha256:"), "image id {image_id}");
    let listed = rt.block_on(cri.list_images()).expect("list images");
    assert!(listed.contains(&image), "{image} not in {listed:?}");

    let pod = rt.block_on(cri.run_pod("tarn-cri-auth")).expect("run pod");
    let stdout = rt.block_on(run(&cri, &pod, &image, FIRST));
    for want in FIRST_EXPECTED {
        assert!(
            stdout.lines().any(|l| l == *want),
            "missing {want:?} in the container's output:\n{stdout}\ntarn's log:\n{}",
            daemon.log()
        );
    }
    let lazy = fuse_mounts_under(&daemon.root());
    assert!(
        lazy >= 5,
        "a FUSE mount per eStargz layer expected, found {lazy}; tarn's log:\n{}",
        daemon.log()
    );
    let requests = reglog::read_settled(&registry_log).expect("registry log");
    let ranged = ranged_gets(&requests, "multi-esgz");
    let served: u64 = requests
        .iter()
        .filter(|r| r.is_blob_get() && r.path.starts_with("/v2/multi-esgz/"))
        .map(|r| r.bytes)
        .sum();
    eprintln!(
        "private lazy pull+run: {} ranged GETs, {served} of {image_size} blob bytes",
        ranged.len()
    );
    assert!(!ranged.is_empty(), "tarn fetched no ranges");
    assert!(
        served * 3 < image_size,
        "a lazy pull+run fetched {served} of {image_size} bytes"
    );
    let file = daemon.root().join("cri-credentials.json");
    let md = std::fs::metadata(&file).expect("credentials persisted");
    assert_eq!(
        md.mode() & 0o777,
        0o600,
        "the credentials file is root-only"
    );
    let text = std::fs::read_to_string(&file).expect("read credentials");
    assert!(text.contains("multi-esgz"), "{text}");

    // A restart: the layers are mounted again and the files no one read
    // yet are fetched, with nothing but the persisted credentials.
    let mark = reglog::mark(&registry_log).expect("mark");
    daemon.restart().expect("restart tarn");
    assert!(
        plain(&daemon.log()).contains("credentials loaded repositories=2"),
        "the persisted credentials are loaded; tarn's log:\n{}",
        daemon.log()
    );
    let script: Vec<String> = UNREAD.iter().map(|f| format!("sha256sum /{f}")).collect();
    let stdout = rt.block_on(run(&cri, &pod, &image, &script.join(" && ")));
    for f in UNREAD {
        let want = expected_sum(&multi, f);
        assert!(
            stdout.lines().any(|l| l == want),
            "missing {want:?} in the container's output:\n{stdout}\ntarn's log:\n{}",
            daemon.log()
        );
    }
    reglog::wait_quiet(
        &registry_log,
        Duration::from_millis(300),
        Duration::from_secs(10),
    )
    .expect("registry log");
    let after = reglog::read_between(&registry_log, mark, u64::MAX).expect("registry log");
    let ranged = ranged_gets(&after, "multi-esgz");
    assert!(
        !ranged.is_empty(),
        "after the restart tarn fetched no ranges: {after:?}"
    );

    rt.block_on(cri.cleanup()).expect("cri cleanup");
    drop(cri);
    daemon.stop().expect("stop tarn");
    drop(daemon);
    bed.down().expect("test bed down");
}
