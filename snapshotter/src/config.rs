//! The daemon's configuration file (TOML). Every field has a default, so no
//! file is needed.
//!
//! ```toml
//! admin_address = "/run/tarn/admin.sock"  # default: admin.sock beside --address
//! metrics_address = "127.0.0.1:9099"      # default: no metrics endpoint
//! [snapshotter]
//! resolve_timeout_secs = 10
//! allow_unverified_layers = false
//! max_index_mb = 224
//! holder = true                  # false: SIGTERM unmounts lazy layers
//! loop_direct_io = true          # overlaybd disks' loop devices
//! [registry]
//! plain_http = ["127.0.0.1:5000"]
//! docker_config = "/root/.docker/config.json"
//! config_path = "/etc/containerd/certs.d"  # hosts.toml: mirrors; "" for none
//! [cache]
//! dir = "/var/lib/tarn/cache"              # default: ROOT/cache
//! max_bytes = 20_000_000_000                # default: none (max_percent only)
//! max_percent = 10                          # of the cache's filesystem
//! [fetch]
//! background = false
//! [profile]
//! enabled = false                # learn start profiles and prefetch them
//! record_secs = 10               # how long a first start is recorded
//! registry = true                # look for a pushed profile at pull
//! dir = "/var/lib/tarn/profiles" # default: ROOT/profiles
//! [peers]
//! listen = "10.0.0.5:7600"       # default: peers off
//! static = ["10.0.0.5:7600", "10.0.0.6:7600"]  # the nodes; this one may be listed
//! dns = "tarn-peers.kube-system.svc:7600"  # nodes from A/AAAA records too
//! dns_refresh_secs = 30
//! token_file = "/etc/tarn/peers.token"  # required with listen; mode 0600
//! timeout_ms = 2000              # a peer's block answer must begin within it
//! cache_mb = 256                 # blocks kept in memory for peers
//! [cri]
//! image_service_socket = "/run/tarn/cri-image.sock"  # default: off
//! containerd_cri_socket = "/run/containerd/containerd.sock"
//! credentials_ttl_hours = 24
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_ROOT: &str = "/var/lib/tarn";
pub const DEFAULT_ADDRESS: &str = "/run/tarn/tarn.sock";
pub const DEFAULT_CONFIG: &str = "/etc/tarn/config.toml";
/// The admin socket's file name beside the Snapshots socket when neither
/// the flag nor the config names one: `/run/tarn/admin.sock` for the
/// default address (where `tarn status` looks), and distinct per daemon
/// when several run on one machine with different `--address`es.
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config {path}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Socket of tarn's admin API (used by `tarn status`); `--admin-address`
    /// wins over it.
    pub admin_address: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP);
    /// none by default. Anyone who can reach it sees image layer digests
    /// and registry figures: keep it on loopback or a private network.
    pub metrics_address: Option<SocketAddr>,
    pub snapshotter: SnapshotterConfig,
    pub registry: RegistrySection,
    pub cache: CacheSection,
    pub fetch: FetchSection,
    pub cri: CriSection,
    pub profile: ProfileSection,
    pub peers: PeersSection,
}

/// Built-in peers (`crate::peers`): nodes that fetch each block of an
/// image once for the cluster and hand it to each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersSection {
    /// Where this node serves blocks to its peers; unset: peers off.
    pub listen: Option<SocketAddr>,
    /// The nodes (`host:port` of their `listen`); this node's own address
    /// may be among them and is recognised as itself.
    #[serde(rename = "static")]
    pub static_peers: Vec<String>,
    /// A name (`host:port`) whose A/AAAA records are nodes too (a
    /// Kubernetes headless Service), resolved every `dns_refresh_secs`.
    pub dns: Option<String>,
    pub dns_refresh_secs: u64,
    /// The cluster's shared token (one line), required with `listen`:
    /// the daemon refuses to start if it is missing, empty, or readable by
    /// group or others.
    pub token_file: Option<PathBuf>,
    /// A peer's answer to a block request must begin within this long
    /// (else the next source is read); the whole answer within 5 times it.
    pub timeout_ms: u64,
    /// Memory for blocks fetched for peers, MiB: the next askers of a block
    /// get it from there.
    pub cache_mb: u64,
}

impl Default for PeersSection {
    fn default() -> Self {
        PeersSection {
            listen: None,
            static_peers: Vec::new(),
            dns: None,
            dns_refresh_secs: 30,
            token_file: None,
            timeout_ms: 2000,
            cache_mb: 256,
        }
    }
}

/// Start profiles (`crate::profiles`): the first start of an image on this
/// node is recorded; later starts prefetch what it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileSection {
    /// Off by default.
    pub enabled: bool,
    /// How long the first start of an image is recorded, seconds (less if
    /// its container goes first).
    pub record_secs: u64,
    /// Look for a profile pushed to the registry (`tarn profile push`)
    /// when an image without a local one is pulled.
    pub registry: bool,
    /// Where profiles are kept, by manifest digest; default `ROOT/profiles`.
    pub dir: Option<PathBuf>,
}

impl Default for ProfileSection {
    fn default() -> Self {
        ProfileSection {
            enabled: false,
            record_secs: 10,
            registry: true,
            dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// How long Prepare may spend resolving a remote layer (manifest,
    /// footer, TOC) before it falls back to an ordinary pull.
    pub resolve_timeout_secs: u64,
    /// Mount eStargz layers whose TOC digest annotation is missing
    /// (their TOC cannot be verified; chunks still are, against it).
    pub allow_unverified_layers: bool,
    /// On SIGTERM/SIGINT, the longest the process lives: in-flight calls get
    /// all but the last second, unmounting the lazy layers the rest.
    pub shutdown_grace_secs: u64,
    /// FUSE worker threads per mounted layer.
    pub fuse_threads: usize,
    /// Hand fully cached files to the kernel (FUSE passthrough, Linux >=
    /// 6.9), so their reads skip the daemon; ignored where unsupported.
    pub fuse_passthrough: bool,
    /// Memory one layer's index may take, MiB: its TOC as fetched and
    /// decompressed and the index built from it. A layer whose TOC needs
    /// more is refused (and pulled in full by containerd); 256 holds a few
    /// hundred thousand entries.
    pub max_index_mb: u64,
    /// Keep every lazy mount's FUSE connection in a holder process
    /// (`ROOT/holder.sock`), so running containers only stall while the
    /// daemon restarts, is upgraded (`--takeover`) or crashes, instead of
    /// losing their lazy files. Off: SIGTERM unmounts every lazy layer.
    /// On by default: a restart must not break running containers.
    pub holder: bool,
    /// overlaybd disks: the loop device under each ext4 tree reads its
    /// FUSE file with direct I/O, so the disk's blocks are not cached a
    /// second time under the FUSE file (see README, "overlaybd images":
    /// measured no slower to start a container, faster to read cold).
    pub loop_direct_io: bool,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            resolve_timeout_secs: 10,
            allow_unverified_layers: false,
            shutdown_grace_secs: 5,
            fuse_threads: 4,
            fuse_passthrough: true,
            max_index_mb: tarn_fs::format::estargz::IndexBudget::DEFAULT_LIMIT >> 20,
            holder: true,
            loop_direct_io: true,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// Registry hosts (`host` or `host:port`) reached over plain HTTP;
    /// loopback always is.
    pub plain_http: Vec<String>,
    /// Docker config file with credentials; default `$DOCKER_CONFIG` or
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// containerd's registry hosts directory (`<dir>/<registry>/hosts.toml`,
    /// `_default/hosts.toml`): blob reads go to the mirrors it names
    /// first; default `/etc/containerd/certs.d`; `""`: no mirrors.
    pub config_path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Chunk cache directory; default `ROOT/cache`.
    pub dir: Option<PathBuf>,
    /// Bound on the cache's disk use in bytes; with `max_percent`, the
    /// smaller of the two holds.
    pub max_bytes: Option<u64>,
    /// Bound on the cache's disk use as a percentage of its filesystem's
    /// size; 0 or 100 and more: no share bound.
    pub max_percent: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            dir: None,
            max_bytes: None,
            max_percent: DEFAULT_CACHE_PERCENT,
        }
    }
}

/// The cache's default share of its filesystem. kubelet's image garbage
/// collection starts at 85% disk use by default and evicts pods at 90%
/// free-space pressure: a lazy cache that may take a tenth of the disk
/// leaves room for images pulled the ordinary way, containers' writable
/// layers and logs, and still holds the working set of tens of images
/// (lazy images read a few percent of their bytes).
pub const DEFAULT_CACHE_PERCENT: u64 = 10;

/// When and how much tarn fetches beyond what containers read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSection {
    /// Fetch every chunk of a mounted layer in the background, below
    /// on-demand reads, until the layer is complete.
    pub background: bool,
    /// How long a Prepare waits for a layer's prioritized files (those
    /// before its `.prefetch.landmark`) before it answers; the rest goes on
    /// in the background. 0: do not prefetch. Short by default: a read of
    /// a chunk still on the wire joins its GET, and the files arrive in the
    /// order the workload reads them, so waiting longer only holds back
    /// containerd's and runc's own work on the container.
    pub prefetch_timeout_ms: u64,
    /// Background GETs on the wire at once, all layers together; sized to
    /// fill the bandwidth-delay product of a far registry.
    pub background_requests: usize,
    /// Limit on background fetching in MB/s (10^6 bytes); 0: none.
    pub background_rate_mbps: u64,
    /// KiB an on-demand miss also fetches, in the same GET, of what follows
    /// it in the blob; 0: no read-ahead.
    pub read_ahead_kib: u64,
    /// KiB the read-ahead window grows to (doubling) while reads walk along
    /// the blob, and never past what the link carries in one round trip.
    pub read_ahead_max_kib: u64,
    /// Fetch anything before a read asks for it: read-ahead, a
    /// program's libraries, the image's entrypoint, the
    /// prioritized files. `false` fetches on demand only (what the bench's
    /// no-speculation baseline runs); `background` is separate.
    pub speculate: bool,
}

impl Default for FetchSection {
    fn default() -> Self {
        let sched = tarn_fs::fetch::SchedulerConfig::default();
        FetchSection {
            background: false,
            prefetch_timeout_ms: 50,
            background_requests: sched.background_concurrency,
            background_rate_mbps: 0,
            read_ahead_kib: sched.read_ahead / 1024,
            read_ahead_max_kib: sched.read_ahead_max / 1024,
            speculate: sched.speculate,
        }
    }
}

/// CRI's image service, proxied to containerd's so tarn learns the
/// credentials of the kubelet's pulls (`crate::cri`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriSection {
    /// Socket tarn serves `runtime.v1.ImageService` on (root-only), for the
    /// kubelet's `--image-service-endpoint`; unset: no proxy.
    pub image_service_socket: Option<PathBuf>,
    /// containerd's CRI socket, where every call is forwarded.
    pub containerd_cri_socket: PathBuf,
    /// How long captured credentials are kept after the last pull that
    /// sent them, hours (each pull of the image renews them).
    pub credentials_ttl_hours: u64,
}

impl Default for CriSection {
    fn default() -> Self {
        CriSection {
            image_service_socket: None,
            containerd_cri_socket: PathBuf::from("/run/containerd/containerd.sock"),
            credentials_ttl_hours: 24,
        }
    }
}

impl Config {
    /// Loads `path`. A missing file gives the defaults unless the user named
    /// it explicitly (`required`).
    pub fn load(path: &Path, required: bool) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Where start profiles are kept, when they are on.
    pub fn profile_dir(&self, root: &Path) -> Option<PathBuf> {
        let p = &self.profile;
        p.enabled
            .then(|| p.dir.clone().unwrap_or_else(|| root.join("profiles")))
    }

    pub fn cache_dir(&self, root: &Path) -> PathBuf {
        self.cache.dir.clone().unwrap_or_else(|| root.join("cache"))
    }

    /// The bound on the cache's disk use (`u64::MAX`: none): `max_bytes`,
    /// or `max_percent` of the filesystem holding `cache_dir`, whichever
    /// is smaller. A filesystem whose size cannot be read bounds nothing.
    pub fn cache_bound(&self, cache_dir: &Path) -> u64 {
        let percent = self.cache.max_percent;
        let share = match percent {
            1..=99 => match tarn_fs::cache::filesystem_bytes(cache_dir) {
                Ok(size) => size / 100 * percent,
                Err(e) => {
                    tracing::warn!(dir = %cache_dir.display(), error = %e, "cannot size the cache's filesystem");
                    u64::MAX
                }
            },
            _ => u64::MAX,
        };
        self.cache.max_bytes.unwrap_or(u64::MAX).min(share)
    }

    /// The admin socket: the configured one, else `admin.sock` beside the
    /// Snapshots socket `address`.
    pub fn admin_address(&self, address: &Path) -> PathBuf {
        self.admin_address.clone().unwrap_or_else(|| {
            address
                .parent()
                .unwrap_or(Path::new("/"))
                .join(ADMIN_SOCKET_NAME)
        })
    }

    /// The fetch scheduler's settings from `[fetch]`.
    pub fn scheduler_config(&self) -> tarn_fs::fetch::SchedulerConfig {
        let f = &self.fetch;
        tarn_fs::fetch::SchedulerConfig {
            background_concurrency: f.background_requests.max(1),
            background_rate: (f.background_rate_mbps > 0)
                .then(|| f.background_rate_mbps * 1_000_000),
            read_ahead: if f.speculate {
                f.read_ahead_kib * 1024
            } else {
                0
            },
            read_ahead_max: f.read_ahead_max_kib * 1024,
            speculate: f.speculate,
            ..tarn_fs::fetch::SchedulerConfig::default()
        }
    }

    /// `None` when prefetching is off (or all speculation).
    pub fn prefetch_timeout(&self) -> Option<Duration> {
        (self.fetch.speculate && self.fetch.prefetch_timeout_ms > 0)
            .then(|| Duration::from_millis(self.fetch.prefetch_timeout_ms))
    }

    pub fn resolve_timeout(&self) -> Duration {
        Duration::from_secs(self.snapshotter.resolve_timeout_secs)
    }

    /// The per-layer index budget, bytes.
    pub fn max_index_bytes(&self) -> u64 {
        self.snapshotter.max_index_mb.saturating_mul(1 << 20)
    }

    /// How overlaybd disks' loop devices read their FUSE files.
    pub fn loop_io(&self) -> crate::obd::LoopIo {
        if self.snapshotter.loop_direct_io {
            crate::obd::LoopIo::Direct
        } else {
            crate::obd::LoopIo::Buffered
        }
    }

    /// The holder of the daemon whose root is `root`, if configured: this
    /// very binary started with `--fd-holder`.
    pub fn holder(&self, root: &Path) -> Option<crate::holder::Holder> {
        if !self.snapshotter.holder {
            return None;
        }
        let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("tarn-snapshotter"));
        Some(crate::holder::Holder::new(
            root.join(crate::holder::SOCKET_NAME),
            program,
        ))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.snapshotter.shutdown_grace_secs)
    }

    /// How long captured CRI credentials are kept.
    pub fn cri_credentials_ttl(&self) -> Duration {
        Duration::from_secs(self.cri.credentials_ttl_hours.saturating_mul(3600))
    }

    /// How tarn-fs reaches registries.
    pub fn registry_config(&self) -> tarn_fs::registry::RegistryConfig {
        tarn_fs::registry::RegistryConfig {
            plain_http: self.registry.plain_http.clone(),
            docker_config: self.registry.docker_config.clone(),
            hosts_dir: match &self.registry.config_path {
                None => Some(tarn_fs::registry::hosts::DEFAULT_CONFIG_DIR.into()),
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p.clone()),
            },
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_default_file_is_fine_missing_explicit_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        assert_eq!(Config::load(&missing, false).unwrap(), Config::default());
        let e = Config::load(&missing, true).unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
    }

    #[test]
    fn sections_keep_other_defaults_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[registry]\nplain_http = [\"127.0.0.1:5000\"]\n[snapshotter]\nresolve_timeout_secs = 2\n",
        )
        .unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.registry.plain_http, vec!["127.0.0.1:5000"]);
        assert_eq!(c.resolve_timeout(), Duration::from_secs(2));
        assert!(!c.snapshotter.allow_unverified_layers);
        assert_eq!(c.cache_dir(Path::new("/r")), PathBuf::from("/r/cache"));
        assert_eq!(
            c.admin_address(Path::new("/run/tarn/tarn.sock")),
            PathBuf::from("/run/tarn/admin.sock"),
            "the default admin socket is where `tarn status` looks"
        );
        assert!(c.registry_config().is_plain_http("127.0.0.1:5000"));
        assert_eq!(c.max_index_bytes(), 224 << 20, "the default budget");

        for typo in [
            "resolve_timeout_secs = 2\n",
            "[snapshotter]\nresolve_timeout = 2\n",
            "[cache]\ndirectory = \"/x\"\n",
        ] {
            std::fs::write(&p, typo).unwrap();
            assert!(
                Config::load(&p, true).is_err(),
                "a misplaced or misspelt key must not be ignored: {typo:?}"
            );
        }
        assert_eq!(c.metrics_address, None, "no metrics endpoint by default");
        std::fs::write(&p, "metrics_address = \"127.0.0.1:9099\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.metrics_address, Some(([127, 0, 0, 1], 9099).into()));
        std::fs::write(&p, "metrics_address = \"localhost\"\n").unwrap();
        assert!(
            Config::load(&p, true).is_err(),
            "an address without a port is refused, not ignored"
        );
        assert_eq!(
            c.cri.image_service_socket, None,
            "the CRI proxy is off by default"
        );
        std::fs::write(
            &p,
            "[cri]\nimage_service_socket = \"/run/tarn/cri.sock\"\ncredentials_ttl_hours = 2\n",
        )
        .unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(
            c.cri.image_service_socket,
            Some(PathBuf::from("/run/tarn/cri.sock"))
        );
        assert_eq!(
            c.cri.containerd_cri_socket,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(c.cri_credentials_ttl(), Duration::from_secs(7200));
        std::fs::write(&p, "admin_address = \"/a/admin.sock\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(
            c.admin_address(Path::new("/x/tarn.sock")),
            PathBuf::from("/a/admin.sock")
        );
    }
}
