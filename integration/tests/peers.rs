//! Built-in peers (`[peers]`) end to end, with the real registry,
//! containerd, runc and FUSE: three nodes on 127.0.0.2, .3 and .4, each
//! its own containerd and tarn daemon, one registry. Starting the
//! reference workload on all three at once costs the registry about one
//! node's bytes; a peer killed while the others fetch through it changes
//! nothing they can see; a request without the cluster's token gets
//! nothing.
//!
//! Needs the daemon and the CLI built into `$TARN_BIN_DIR` first.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tarn_fs::registry::{Reference, RegistryClient, RegistryConfig};
use tarn_integration::bins;
use tarn_integration::daemon::Daemon;
use tarn_integration::testbed::{Component, Testbed};
use tarn_integration::wait::wait_until;
use tarn_proto::admin::{StatsRequest, StatsResponse};

const WORKLOAD_OUT: [&str; 2] = ["tarn test workload", "Copyright 2009 The Go Authors"];
const IMAGE: &str = "multi-esgz";
const TOKEN: &str = "peers-integration-token";
/// The bound on one node's pull and run, for a failure message: far above
/// what a loaded two-core machine takes.
const RUN_BOUND: Duration = Duration::from_secs(300);

/// A node: a containerd of its own and a tarn daemon pulling from
/// `registry`. Fields drop in order: tarn, then the bed.
struct Node {
    tarn: Daemon,
    bed: Testbed,
    name: String,
}

/// The cluster's settings: the three nodes' peer addresses (and a fourth
/// for a node alone) and the token file.
struct Cluster {
    addresses: Vec<String>,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Free ports on 127.0.0.2 to .5 (bound, then let go) and a token
    /// file of mode 0600.
    fn new() -> Cluster {
        let addresses = (2..=5)
            .map(|i| {
                let l = TcpListener::bind(format!("127.0.0.{i}:0")).expect("bind a free port");
                l.local_addr().expect("local address").to_string()
            })
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = dir.path().join("peers.token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod token");
        Cluster {
            addresses,
            token_file,
            _dir: dir,
        }
    }

    /// `[peers]` of node `i` of the three.
    fn section(&self, i: usize) -> String {
        self.section_of(i, 0..3)
    }

    /// `[peers]` of a node alone (the fourth address): it owns every
    /// block, so it fetches whole blocks as a cluster does.
    fn alone(&self) -> String {
        self.section_of(3, 3..4)
    }

    fn section_of(&self, i: usize, nodes: std::ops::Range<usize>) -> String {
        let list: Vec<String> = self.addresses[nodes]
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        format!(
            "[peers]\nlisten = {:?}\nstatic = [{}]\ntoken_file = {:?}\n",
            self.addresses[i],
            list.join(", "),
            self.token_file
        )
    }
}

impl Node {
    /// A node in `bed` (which may also hold the registry) with `extra`
    /// config sections.
    fn up(name: &str, bed: Testbed, registry: &str, extra: &str) -> Node {
        let config = format!("[registry]\nplain_http = [\"{registry}\"]\n{extra}");
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Node {
            tarn,
            bed,
            name: name.to_string(),
        }
    }

    fn containerd() -> Testbed {
        Testbed::up(&[Component::Containerd]).expect("test bed up")
    }

    /// Pulls `reference` with `tarn pull` and runs the workload in it;
    /// its output.
    fn pull_and_run(&self, reference: &str) -> String {
        let out = Command::new(bins::tarn().expect("tarn built"))
            .args(["pull", "--plain-http", "--snapshotter", "tarn", "--address"])
            .arg(self.bed.containerd_sock().expect("containerd"))
            .arg("--admin-address")
            .arg(self.tarn.admin_address())
            .arg(reference)
            .output()
            .expect("run tarn pull");
        self.ok("tarn pull", &out);
        let id = format!("peers-{}", self.name);
        let out = self
            .bed
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "tarn",
                reference,
                &id,
                "/app/run.sh",
            ])
            .expect("run ctr");
        let stdout = self.ok("ctr run", &out);
        for want in WORKLOAD_OUT {
            assert!(stdout.contains(want), "{}: {want:?} in {stdout}", self.name);
        }
        stdout
    }

    fn ok(&self, what: &str, out: &Output) -> String {
        assert!(
            out.status.success(),
            "{}: {what}: {}\n{}\ntarn log:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.tarn.log())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stats(&self) -> StatsResponse {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let mut a = self.tarn.admin().await.expect("admin client");
            a.stats(StatsRequest {}).await.expect("stats").into_inner()
        })
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `pull_and_run` on each node at once; fails if one takes longer
/// than [`RUN_BOUND`].
fn all_at_once(nodes: &[&Node], reference: &str) {
    let started = Instant::now();
    std::thread::scope(|s| {
        let runs: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(move || n.pull_and_run(reference)))
            .collect();
        for r in runs {
            if let Err(e) = r.join() {
                std::panic::resume_unwind(e);
            }
        }
    });
    assert!(
        started.elapsed() < RUN_BOUND,
        "pull and run took {:?}",
        started.elapsed()
    );
}

/// Node a of `cluster`, whose bed also holds the registry, with the
/// image pushed: the node, the registry, the image's reference.
fn registry_node(cluster: &Cluster) -> (Node, String, String) {
    let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
    let registry = bed.registry().expect("registry").to_owned();
    // Each bed's tarn right after its containerd, which dials it at once
    // and then backs off.
    let a = Node::up("a", bed, &registry, &cluster.section(0));
    let reference = a.bed.push_image(IMAGE).expect("push image");
    (a, registry, reference)
}

#[test]
fn three_nodes_starting_one_image_at_once_cost_the_registry_about_one_nodes_bytes() {
    let cluster = Cluster::new();
    // a idles until the three start: no peer asks it anything before.
    let (a, registry, reference) = registry_node(&cluster);

    // One node alone: what the workload costs the registry, with peers
    // off (its lazy bytes), and with peers on (a cluster of one: its
    // reads through its own block store, as a cluster fetches them).
    let alone = |name: &str, extra: &str| {
        let before = a.bed.bytes_served().expect("registry log");
        let node = Node::up(name, Node::containerd(), &registry, extra);
        node.pull_and_run(&reference);
        a.bed.bytes_served().expect("registry log") - before
    };
    let lazy = alone("alone", "");
    let one_node = alone("alone-blocks", &cluster.alone());

    let b = Node::up("b", Node::containerd(), &registry, &cluster.section(1));
    let c = Node::up("c", Node::containerd(), &registry, &cluster.section(2));
    let before = a.bed.bytes_served().expect("registry log");
    all_at_once(&[&a, &b, &c], &reference);
    let three_nodes = a.bed.bytes_served().expect("registry log") - before;

    let stats: Vec<StatsResponse> = [&a, &b, &c].iter().map(|n| n.stats()).collect();
    let received: u64 = stats.iter().map(|s| s.peer_received_bytes).sum();
    let served: u64 = stats.iter().map(|s| s.peer_served_bytes).sum();
    for (n, s) in [&a, &b, &c].iter().zip(&stats) {
        eprintln!(
            "node {}: {} bytes from the registry, {} from peers, {} served to peers",
            n.name, s.registry_bytes, s.peer_received_bytes, s.peer_served_bytes
        );
    }
    eprintln!(
        "registry served one node alone {lazy} bytes with peers off, {one_node} with peers on; three nodes with peers {three_nodes} ({:.2}x the one node with peers, {:.2}x its lazy bytes; without peers about 3x); peers: {received} received, {served} served",
        three_nodes as f64 / one_node as f64,
        three_nodes as f64 / lazy as f64,
    );
    assert!(received > 0, "bytes came from peers");
    assert!(served >= received, "peers received only what peers sent");
    // What a user sees: tarn status's line of bytes received.
    let out = Command::new(bins::tarn().expect("tarn built"))
        .arg("status")
        .arg("--admin-address")
        .arg(a.tarn.admin_address())
        .output()
        .expect("run tarn status");
    let status = a.ok("tarn status", &out);
    let line = status
        .lines()
        .find(|l| l.starts_with("received:"))
        .unwrap_or_else(|| panic!("no received line in {status}"));
    assert!(
        line.contains(" from peers; served ")
            && !line.contains(" 0 B from peers")
            && !line.ends_with(" 0 B to peers"),
        "{line}"
    );
    eprintln!("tarn status on a: {line}");
    assert!(
        three_nodes * 2 < one_node * 3,
        "three nodes cost the registry {three_nodes} bytes, one alone {one_node}: not under 1.5x"
    );
    // Issue 17's bound: a cluster costs the registry at most 1.2x one
    // lazy node's bytes (the blocks' rounding; 0.98x measured).
    assert!(
        three_nodes * 5 <= lazy * 6,
        "three nodes cost the registry {three_nodes} bytes, over 1.2x one lazy node's {lazy}"
    );
}

#[test]
fn a_peer_killed_while_the_others_fetch_through_it_changes_nothing_they_see() {
    let cluster = Cluster::new();
    let (a, registry, reference) = registry_node(&cluster);
    let b = Node::up("b", Node::containerd(), &registry, &cluster.section(1));
    let mut c = Node::up("c", Node::containerd(), &registry, &cluster.section(2));

    std::thread::scope(|s| {
        let runs: Vec<_> = [&a, &b]
            .into_iter()
            .map(|n| s.spawn(|| n.pull_and_run(&reference)))
            .collect();
        // c owns a third of the blocks: once it has served some, the
        // others are fetching through it. Then it dies.
        wait_until("c serves blocks to a and b", RUN_BOUND, || {
            (c.stats().peer_served_bytes > 0).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&c.tarn.log())));
        let running = runs.iter().filter(|r| !r.is_finished()).count();
        c.tarn.kill().expect("kill c");
        eprintln!("c killed while {running} of the 2 runs were still going");
        let started = Instant::now();
        for r in runs {
            if let Err(e) = r.join() {
                std::panic::resume_unwind(e);
            }
        }
        assert!(started.elapsed() < RUN_BOUND);
    });
    let (sa, sb) = (a.stats(), b.stats());
    eprintln!(
        "after c was killed: a {} from peers, b {} from peers; a {} failed peer requests, b {}",
        sa.peer_received_bytes,
        sb.peer_received_bytes,
        a.tarn.log().matches("peer did not answer").count(),
        b.tarn.log().matches("peer did not answer").count(),
    );
}

/// One request on its own connection: the status and the body.
fn raw_get(addr: &str, target: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut conn = TcpStream::connect(addr).expect("connect to the peer port");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}\r\n");
    conn.write_all(head.as_bytes()).expect("send");
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).expect("read the answer");
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8_lossy(&answer[..at]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, answer[at..].to_vec())
}

#[test]
fn a_request_without_the_cluster_token_gets_401_and_no_bytes() {
    let bed = Testbed::up(&[Component::Registry]).expect("test bed up");
    let registry = bed.registry().expect("registry").to_owned();
    let reference = bed.push_image(IMAGE).expect("push image");
    let client = RegistryClient::new(RegistryConfig {
        plain_http: vec![registry.clone()],
        ..RegistryConfig::default()
    })
    .expect("registry client");
    let parsed: Reference = reference.parse().expect("reference");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let image = rt.block_on(client.resolve(&parsed)).expect("resolve");
    let layer = image.layers.first().expect("a layer");

    let cluster = Cluster::new();
    let node = Daemon::start_with(
        None,
        &format!(
            "[registry]\nplain_http = [\"{registry}\"]\n{}",
            cluster.section(0)
        ),
    )
    .expect("start tarn-snapshotter");
    let addr = &cluster.addresses[0];
    let target = format!(
        "/v1/blocks/{}/0?repo={}&size={}",
        layer.digest, parsed.repository, layer.size
    );
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, body) = raw_get(addr, &target, token);
        assert_eq!(status, 401, "{token:?}");
        assert!(
            !String::from_utf8_lossy(&body).contains('\0') && body.len() < 100,
            "no block bytes for {token:?}: {} bytes",
            body.len()
        );
    }
    let want = layer.size.min(tarn_fs::peer::BLOCK);
    let (status, body) = raw_get(addr, &target, Some(TOKEN));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.len() as u64, want, "exactly the block");
    let expected = rt
        .block_on(client.read_range(
            &parsed.repository,
            &layer.digest,
            0..want,
            tarn_fs::Intent::OnDemand,
        ))
        .expect("the block from the registry");
    assert!(body == expected[..], "the block's bytes are the registry's");
    let (status, _) = raw_get(addr, &target.replace("/0?", "/99999?"), Some(TOKEN));
    assert_eq!(status, 400, "a block past the blob's end");
    drop(node);
}

#[test]
fn a_daemon_whose_token_file_others_can_read_does_not_start() {
    let cluster = Cluster::new();
    std::fs::set_permissions(&cluster.token_file, std::fs::Permissions::from_mode(0o644))
        .expect("chmod token");
    let started = Daemon::start_with(None, &cluster.section(0));
    let e = match started {
        Ok(_) => panic!("the daemon started with a token file of mode 0644"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("readable by group or others") && e.contains("chmod 600"),
        "{e}"
    );
}
