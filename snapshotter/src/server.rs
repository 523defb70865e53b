//! Serving: root-only unix sockets, the gRPC services on them, and a
//! graceful stop.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tarn_fs::registry::auth::Keychains;
use tarn_proto::admin::admin_server::AdminServer;
use tarn_proto::snapshots::snapshots_server::SnapshotsServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::time::Instant;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::cri::{CriCredentials, ImageProxy};
use crate::errors::chain;
use crate::metrics::{self, Metrics, SnapshotterFigures};
use crate::remote::RemoteSnapshotter;
use crate::service::{AdminService, SnapshotsService};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0} is in use by a running process")]
    InUse(PathBuf),
    #[error("open snapshotter")]
    Snapshotter(#[from] crate::remote::OpenError),
    #[error("serve {path}")]
    Serve {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("server task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Peers(#[from] crate::peers::PeersError),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Binds a unix socket at `path` readable and writable by root only.
/// Creates the parent directory and replaces a stale socket file, but
/// refuses one that a live process still answers on. Blocking (filesystem,
/// a probe connect): call it off the async workers.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(Error::Io {
                context: format!("bind {}", path.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io(format!("remove stale {}", path.display())))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(io(format!("bind {}", path.display())))?;
    // Before the first accept: whoever can connect can create and delete
    // container filesystems.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io(format!("set {} non-blocking", path.display())))?;
    Ok(listener)
}

async fn bind_async(path: &Path) -> Result<UnixListener, Error> {
    let p = path.to_owned();
    let listener = tokio::task::spawn_blocking(move || bind(&p)).await??;
    UnixListener::from_std(listener).map_err(io(format!("listen on {}", path.display())))
}

/// Of the grace period, the part kept for unmounting: in-flight calls get
/// the rest.
const UNMOUNT_SHARE: Duration = Duration::from_secs(1);

/// Serves the Snapshots API on `address` and the admin API on
/// `admin_address` until `shutdown` resolves, then stops within the
/// configured grace period: in-flight calls may finish until
/// [`UNMOUNT_SHARE`] before its end, then the remote layers are unmounted
/// (detached: a layer a running container uses stays usable to it until
/// this process exits; then its reads fail with ENOTCONN). Waiting stops
/// at the end of the grace period whatever is left. State stays on disk.
///
/// Remote layers are mounted again before either socket exists, so
/// containerd never sees a remote snapshot whose layer is missing.
pub async fn run(
    root: &Path,
    address: &Path,
    admin_address: &Path,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics = Metrics::new();
    let cri = open_cri_credentials(root, config).await?;
    let mut keychains = Keychains::default();
    if let Some(c) = &cri {
        keychains.push(c.clone());
    }
    // Checked before anything is opened: a bad token file stops the start.
    let section = config.peers.clone();
    let peers = tokio::task::spawn_blocking(move || crate::peers::load(&section)).await??;
    let rs =
        Arc::new(RemoteSnapshotter::open(root, config, &metrics, keychains, peers.as_ref()).await?);
    let figures = Arc::downgrade(&rs);
    metrics.register_collector(metrics::Snapshotter(move || {
        // Weak: the registry must not keep the snapshotter (and its
        // mounts) alive past shutdown.
        match figures.upgrade().map(|rs| rs.figures()) {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                tracing::warn!(error = %chain(&e), "metrics: reading the snapshotter's figures");
                SnapshotterFigures::default()
            }
            None => SnapshotterFigures::default(),
        }
    }));
    let optional = Optional { cri, peers };
    let (deadline, served) = serve(
        &rs,
        &metrics,
        optional,
        address,
        admin_address,
        config,
        shutdown,
    )
    .await;
    // Unmounted even when serving failed: a FUSE mount without its daemon
    // only answers ENOTCONN.
    rs.shutdown(deadline).await;
    served
}

/// The credentials captured through CRI, when the CRI proxy is on: what an
/// earlier run persisted is read before the layers are mounted again, so a
/// restored layer fetches with them. A file that cannot be read is logged
/// and set aside (the next capture replaces it): the daemon still serves.
async fn open_cri_credentials(
    root: &Path,
    config: &Config,
) -> Result<Option<Arc<CriCredentials>>, Error> {
    if config.cri.image_service_socket.is_none() {
        return Ok(None);
    }
    let (root, ttl) = (root.to_owned(), config.cri_credentials_ttl());
    let store = tokio::task::spawn_blocking(move || {
        CriCredentials::open(&root, ttl).unwrap_or_else(|e| {
            tracing::warn!(error = %crate::errors::chain(&e), "cri: starting without the persisted credentials");
            CriCredentials::in_memory_at(&root, ttl)
        })
    })
    .await?;
    tracing::info!(repositories = store.len(), file = %store.path().display(), "cri: credentials loaded");
    Ok(Some(Arc::new(store)))
}

/// The services only some configs have.
struct Optional {
    /// CRI's image service proxy (`[cri]`).
    cri: Option<Arc<CriCredentials>>,
    /// The block server for peers (`[peers]`).
    peers: Option<crate::peers::Setup>,
}

/// Serves until `shutdown`, then drains; returns when stopping must be done.
async fn serve(
    rs: &Arc<RemoteSnapshotter>,
    metrics: &Metrics,
    optional: Optional,
    address: &Path,
    admin_address: &Path,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Instant, Result<(), Error>) {
    let grace = config.shutdown_grace();
    let Optional { cri, peers } = optional;
    // The Snapshots socket last: once it exists, everything is up (callers
    // and tests take its appearance as the ready signal).
    let cri_socket = config
        .cri
        .image_service_socket
        .as_deref()
        .filter(|_| cri.is_some());
    let listeners = async {
        let metrics = match config.metrics_address {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("bind metrics_address {addr}")))?,
            ),
            None => None,
        };
        let peers = match &peers {
            Some(p) => Some((
                TcpListener::bind(p.listen)
                    .await
                    .map_err(io(format!("bind [peers] listen {}", p.listen)))?,
                p.peers.clone(),
                p.dns.clone().map(|d| (p.fixed.clone(), d)),
            )),
            None => None,
        };
        let admin = bind_async(admin_address).await?;
        let cri_listener = match cri_socket {
            Some(path) => Some(bind_async(path).await?),
            None => None,
        };
        Ok::<_, Error>((
            metrics,
            peers,
            admin,
            cri_listener,
            bind_async(address).await?,
        ))
    };
    let (metrics_listener, peers_listener, admin_listener, cri_listener, snap_listener) =
        match listeners.await {
            Ok(l) => l,
            Err(e) => return (Instant::now() + grace, Err(e)),
        };
    tracing::info!(address = %address.display(), admin = %admin_address.display(), "serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let snap = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(SnapshotsService::new(rs.clone())))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(snap_listener),
                stopped(stop_rx.clone()),
            ),
    );
    let admin = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(AdminService::new(rs.clone())))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(admin_listener),
                stopped(stop_rx.clone()),
            ),
    );
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving metrics");
        }
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            stopped(stop_rx.clone()),
        ));
    }
    if let Some((listener, peers, dns)) = peers_listener {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, members = peers.members().len(), "serving blocks to peers");
        }
        if let Some((fixed, dns)) = dns {
            tokio::spawn(crate::peers::watch_dns(
                peers.clone(),
                fixed,
                dns,
                stopped(stop_rx.clone()),
            ));
        }
        tokio::spawn(crate::peers::serve(
            listener,
            peers,
            stopped(stop_rx.clone()),
        ));
    }
    let cri_server = match (cri_listener, cri) {
        (Some(listener), Some(credentials)) => {
            let upstream = config.cri.containerd_cri_socket.clone();
            let channel = crate::cri::proxy::containerd_channel(upstream.clone());
            tracing::info!(
                socket = %cri_socket.unwrap_or(Path::new("")).display(),
                containerd = %upstream.display(),
                "cri: serving the image service"
            );
            Some(tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(ImageProxy::new(channel, credentials))
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(listener),
                        stopped(stop_rx.clone()),
                    ),
            ))
        }
        _ => None,
    };
    shutdown.await;
    let deadline = Instant::now() + grace;
    tracing::info!(grace_secs = grace.as_secs(), "shutting down");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout_at(deadline - UNMOUNT_SHARE.min(grace / 2), async {
        if let Some(c) = cri_server {
            // A failed image proxy is logged: the snapshotter is the job
            // containerd needs finished.
            match c.await {
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::errors::chain(&e), "cri: image service failed")
                }
                Err(e) => tracing::warn!(error = %e, "cri: image service task failed"),
                Ok(Ok(())) => {}
            }
        }
        (snap.await, admin.await)
    })
    .await;
    // Gone with the process, so containerd sees the plugin down rather
    // than a socket nobody answers.
    let mut sockets = vec![address.to_owned(), admin_address.to_owned()];
    sockets.extend(cri_socket.map(Path::to_owned));
    let _ = tokio::task::spawn_blocking(move || {
        for path in sockets {
            let _ = std::fs::remove_file(path);
        }
    })
    .await;
    let served = match drained {
        Ok((s, a)) => (|| {
            s?.map_err(|source| Error::Serve {
                path: address.to_owned(),
                source,
            })?;
            a?.map_err(|source| Error::Serve {
                path: admin_address.to_owned(),
                source,
            })
        })(),
        Err(_) => {
            tracing::warn!("in-flight calls did not finish within the grace period");
            Ok(())
        }
    };
    (deadline, served)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn bind_makes_root_only_sockets_and_replaces_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/tarn/tarn.sock");
        let live = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(
            matches!(bind(&path), Err(Error::InUse(_))),
            "a socket someone listens on is not stale"
        );
        // What a SIGKILLed daemon leaves behind: the file without a listener.
        drop(live);
        assert!(path.exists());
        let _again = bind(&path).expect("stale socket replaced");
        let other = dir.path().join("plain-file");
        std::fs::write(&other, "x").unwrap();
        assert!(
            bind(&other).is_err(),
            "never delete a file that is not a socket"
        );
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "x");
    }
}
