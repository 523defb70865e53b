//! Start profiles (`[profile]`) end to end, with the real registry,
//! containerd, runc and FUSE: a node learns what the reference workload
//! reads on its first start, `tarn profile push` attaches that to the
//! image in the registry, and a fresh node (its own containerd and tarn,
//! empty roots) finds it at pull and fetches it before the container asks;
//! a profile that names what the image lacks, or does not parse, changes
//! nothing but a log line.
//!
//! Needs the daemon and the CLI built into `$TARN_BIN_DIR` first.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use bytes::Bytes;
use tarn_fs::Digest;
use tarn_fs::registry::{Descriptor, RegistryClient, RegistryConfig};
use tarn_integration::bins;
use tarn_integration::daemon::Daemon;
use tarn_integration::testbed::{Component, Testbed};
use tarn_integration::wait::wait_until;
use tarn_proto::admin::{ListLayersRequest, StatsRequest};

const WORKLOAD_OUT: [&str; 2] = ["tarn test workload", "Copyright 2009 The Go Authors"];
/// containerd's proxy client, its garbage collector, a recording's save:
/// bounds for failure messages only.
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
const PROFILE_TYPE: &str = "application/vnd.tarn.profile.v1+json";

/// A node: a containerd of its own and a tarn daemon with start profiles
/// on, pulling from `registry`. Fields drop in order: tarn, then the bed.
struct Node {
    tarn: Daemon,
    bed: Testbed,
    registry: String,
}

impl Node {
    /// With the registry in its own bed when `registry` is `None`.
    fn up(registry: Option<&str>) -> Node {
        let bed = match registry {
            None => Testbed::up(&[Component::Registry, Component::Containerd]),
            Some(_) => Testbed::up(&[Component::Containerd]),
        }
        .expect("test bed up");
        let registry = registry
            .map(str::to_owned)
            .unwrap_or_else(|| bed.registry().expect("registry").to_owned());
        let config = format!(
            "[registry]\nplain_http = [\"{registry}\"]\n[profile]\nenabled = true\nrecord_secs = 600\n"
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Node {
            tarn,
            bed,
            registry,
        }
    }

    fn sock(&self) -> String {
        self.bed.containerd_sock().expect("containerd").to_owned()
    }

    fn tarn_cli(&self, args: &[&str]) -> Output {
        Command::new(bins::tarn().expect("tarn built"))
            .args(args)
            .arg("--admin-address")
            .arg(self.tarn.admin_address())
            .output()
            .expect("run tarn")
    }

    fn pull(&self, reference: &str) {
        let out = Command::new(bins::tarn().expect("tarn built"))
            .args([
                "pull",
                "--plain-http",
                "--snapshotter",
                "tarn",
                "--address",
                &self.sock(),
            ])
            .arg("--admin-address")
            .arg(self.tarn.admin_address())
            .arg(reference)
            .output()
            .expect("run tarn pull");
        ok("tarn pull", &out, &self.tarn);
    }

    /// Runs the reference workload in container `id`; its output.
    fn run(&self, reference: &str, id: &str) -> String {
        let out = self
            .bed
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "tarn",
                reference,
                id,
                "/app/run.sh",
            ])
            .expect("run ctr");
        let stdout = ok("ctr run", &out, &self.tarn);
        for want in WORKLOAD_OUT {
            assert!(stdout.contains(want), "{want:?} in {stdout}");
        }
        stdout
    }

    /// Waits until the daemon keeps a profile for `reference`; its JSON.
    fn profile(&self, reference: &str) -> serde_json::Value {
        let mut last = None;
        let shown = wait_until("the start profile kept", EVENT_TIMEOUT, || {
            let out = self.tarn_cli(&["profile", "show", "--plain-http", reference]);
            let ok = out.status.success();
            last = Some(out);
            ok.then_some(())
        });
        let out = last.expect("asked once");
        if let Err(e) = shown {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.tarn.log())
            );
        }
        serde_json::from_slice(&out.stdout).expect("tarn profile show prints JSON")
    }

    /// Bytes the `profile` hint fetched and reads used, over all layers.
    fn profile_hint(&self) -> (u64, u64) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let mut a = self.tarn.admin().await.expect("admin client");
            let layers = a
                .list_layers(ListLayersRequest {})
                .await
                .expect("list layers")
                .into_inner()
                .layers;
            let _ = a.stats(StatsRequest {}).await.expect("stats");
            layers
                .iter()
                .flat_map(|l| &l.hints)
                .filter(|h| h.kind == "profile")
                .fold((0, 0), |(f, u), h| (f + h.fetched_bytes, u + h.used_bytes))
        })
    }

    fn registry_client(&self) -> RegistryClient {
        RegistryClient::new(RegistryConfig {
            plain_http: vec![self.registry.clone()],
            ..RegistryConfig::default()
        })
        .expect("registry client")
    }
}

fn ok(what: &str, out: &Output, tarn: &Daemon) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}\ntarn log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&tarn.log())
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn files(profile: &serde_json::Value) -> Vec<String> {
    profile["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .flat_map(|l| l["files"].as_array().expect("files"))
        .map(|f| f["path"].as_str().expect("path").to_owned())
        .collect()
}

#[test]
fn a_profile_learned_on_one_node_is_pushed_and_fetched_ahead_on_a_fresh_one() {
    let a = Node::up(None);
    let reference = a.bed.push_image("multi-esgz").expect("push image");
    a.pull(&reference);
    // Nothing to replay yet: this start is recorded, until its container
    // goes (`--rm`) well before the 600 s.
    a.run(&reference, "learn");
    let learned = a.profile(&reference);
    let names = files(&learned);
    for read in ["app/run.sh", "usr/share/go-1.19/src/fmt/print.go"] {
        assert!(names.iter().any(|n| n == read), "{read} in {names:?}");
    }
    assert!(
        !names
            .iter()
            .any(|n| n == "usr/share/go-1.19/src/fmt/scan.go"),
        "an unread file is not in the profile"
    );
    let pushed = a.tarn_cli(&["profile", "push", "--plain-http", &reference]);
    let said = ok("tarn profile push", &pushed, &a.tarn);
    assert!(said.contains("pushed the start profile"), "{said}");

    // Docker's registry 2.8 has no referrers API: the profile is listed
    // under the fallback tag.
    let client = a.registry_client();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo_ref: tarn_fs::registry::Reference = reference.parse().expect("reference");
    let image = rt.block_on(client.resolve(&repo_ref)).expect("resolve");
    let found = rt
        .block_on(client.find_referrer(
            &repo_ref.repository,
            &image.manifest_digest,
            PROFILE_TYPE,
            1 << 22,
        ))
        .expect("referrers")
        .expect("the pushed profile is found");
    assert_eq!(
        files(&serde_json::from_slice(&found).expect("json")),
        names,
        "the registry's profile is the node's"
    );

    // A fresh node: its own containerd and tarn, empty roots, the same
    // registry. The pull finds the profile and fetches it before any
    // container starts.
    let b = Node::up(Some(&a.registry));
    b.pull(&reference);
    let fetched = wait_until("the profile fetched ahead", EVENT_TIMEOUT, || {
        let (f, _) = b.profile_hint();
        (f > 0).then_some(f)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&b.tarn.log())));
    assert!(b.tarn.log().contains("start profile found in the registry"));
    assert_eq!(files(&b.profile(&reference)), names, "kept on the new node");
    eprintln!(
        "profile: {} files; fetched ahead {fetched} bytes",
        names.len()
    );
    b.run(&reference, "profiled");
    let (fetched, used) = b.profile_hint();
    eprintln!("profile hint on the fresh node: fetched {fetched}, used {used}");
    assert!(
        used > 0,
        "the workload read what the profile fetched ({fetched} bytes fetched)"
    );
    assert!(
        !b.tarn.log().contains("recording this first start"),
        "a node with the profile does not record"
    );
}

#[test]
fn a_profile_naming_what_the_image_lacks_or_that_does_not_parse_changes_nothing_but_a_log_line() {
    let a = Node::up(None);
    let reference = a.bed.push_image("multi-esgz").expect("push image");
    let client = a.registry_client();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo_ref: tarn_fs::registry::Reference = reference.parse().expect("reference");
    let image = rt.block_on(client.resolve(&repo_ref)).expect("resolve");
    let top = image.layers.last().expect("layers").digest;
    // A layer the image does not have, files it does not hold, a range
    // far past a file's end, a directory and a path out of the layer.
    let hostile = serde_json::json!({
        "mediaType": PROFILE_TYPE,
        "layers": [
            {"digest": Digest::of(b"not a layer of it").to_string(),
             "files": [{"path": "etc/passwd", "ranges": [[0, 10]]}]},
            {"digest": top.to_string(), "files": [
                {"path": "no/such/file", "ranges": [[0, 4096]]},
                {"path": "../../etc/shadow"},
                {"path": "app", "ranges": [[0, 1]]},
                {"path": "app/run.sh", "ranges": [[1u64 << 40, 1u64 << 20], [0u64, u64::MAX]]},
            ]},
        ],
    });
    let subject = Descriptor {
        media_type: image.manifest_media_type.clone(),
        digest: image.manifest_digest,
        size: image.manifest_bytes.len() as u64,
        annotations: Default::default(),
    };
    rt.block_on(client.push_referrer(
        &repo_ref.repository,
        &subject,
        PROFILE_TYPE,
        Bytes::from(serde_json::to_vec(&hostile).expect("json")),
    ))
    .expect("push the hostile profile");

    a.pull(&reference);
    wait_until("the hostile profile replayed", EVENT_TIMEOUT, || {
        let log = a.tarn.log();
        log.contains("names files or ranges this layer does not hold")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&a.tarn.log())));
    assert!(
        a.tarn
            .log()
            .contains("start profile names layers the image does not have")
    );
    a.run(&reference, "hostile");

    // A kept profile that does not parse: set aside, and this start is
    // recorded into a new one.
    let root: PathBuf = a.tarn.root();
    let kept = root
        .join("profiles")
        .join(format!("{}.json", image.manifest_digest.hex()));
    std::fs::write(
        &kept,
        b"{\"mediaType\": \"application/vnd.tarn.profile.v1+json\", \"layers\": [",
    )
    .expect("corrupt the kept profile");
    a.run(&reference, "corrupt");
    assert!(a.tarn.log().contains("start profile ignored"));
    assert!(kept.with_extension("json.bad").exists(), "set aside");
    let relearned = files(&a.profile(&reference));
    assert!(
        relearned.iter().any(|n| n == "app/run.sh"),
        "the start was recorded afresh: {relearned:?}"
    );
}
