//! Built-in peers (`[peers]`, issue 17): this node serves the blocks it
//! owns to the other nodes, and reads blocks from their owners before its
//! mirrors and registry.
//!
//! The protocol, the owners (rendezvous hashing) and the client side are
//! `tarn_fs::peer`'s; here is the daemon's side:
//!
//! - [`load`]: `[peers]` checked and the token read; the daemon refuses to
//!   start on a bad one (missing, empty, readable by group or others).
//! - [`BlockStore`] (`store.rs`): the blocks this node owns, each fetched
//!   once from its own mirrors and registry (never from peers: no loops)
//!   however many ask at once, and kept in a bounded in-memory LRU for the
//!   next askers. This node's own reads of its blocks go there too.
//! - [`serve`] (`http.rs`): the block server, hyper HTTP/1.1 like the
//!   metrics endpoint: the token checked, the request checked, the block
//!   from the store.
//!
//! The resolver puts a `PeerBlob` in front of the blob sources of layers
//! whose chunks are verified by digests from elsewhere (eStargz with a TOC
//! digest): `crate::resolve`.

mod dns;
mod http;
mod store;

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use tarn_fs::peer::{PeerSettings, Peers};
use tarn_fs::registry::RegistryError;

use crate::config::PeersSection;

pub use dns::{DnsMembers, watch as watch_dns};
pub use http::serve;
pub use store::BlockStore;

/// The longest token file read.
const MAX_TOKEN: u64 = 4096;

/// The most nodes `static` may list.
const MAX_STATIC: usize = tarn_fs::peer::MAX_MEMBERS;

/// Why `[peers]` cannot be used: the daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("[peers] listen is set but token_file is not: peers authenticate with a shared token")]
    NoTokenFile,
    #[error("[peers] token_file {path}")]
    TokenRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "[peers] token_file {path} is readable by group or others (mode {mode:o}): chmod 600 it"
    )]
    TokenMode { path: PathBuf, mode: u32 },
    #[error("[peers] token_file {path} is empty")]
    TokenEmpty { path: PathBuf },
    #[error("[peers] token_file {path} is over {MAX_TOKEN} bytes")]
    TokenSize { path: PathBuf },
    #[error("[peers] token_file {path}: the token must be one line of visible ASCII")]
    TokenChars { path: PathBuf },
    #[error("[peers] static: {0:?} is not host:port")]
    Member(String),
    #[error("[peers] static lists {0} nodes, more than {MAX_STATIC}")]
    TooMany(usize),
    #[error("[peers] dns: {0:?} is not host:port")]
    Dns(String),
    #[error("[peers] dns_refresh_secs {0} is not between 1 and 86400")]
    DnsRefresh(u64),
    #[error("[peers] timeout_ms {0} is not between 1 and 60000")]
    Timeout(u64),
    #[error("[peers] cache_mb {0} is over 65536")]
    CacheSize(u64),
    #[error("[peers] client")]
    Client(#[from] RegistryError),
}

/// Peers as configured: where to listen, the cluster handle, the memory
/// for blocks.
pub struct Setup {
    pub listen: SocketAddr,
    pub peers: Peers,
    pub cache_bytes: u64,
    /// The `static` list, which DNS members join.
    pub fixed: Vec<String>,
    pub dns: Option<DnsMembers>,
}

/// `[peers]` checked, its token read: `None` when `listen` is unset
/// (peers off). Blocking (reads the token file).
pub fn load(section: &PeersSection) -> Result<Option<Setup>, PeersError> {
    let Some(listen) = section.listen else {
        return Ok(None);
    };
    let path = section.token_file.clone().ok_or(PeersError::NoTokenFile)?;
    let token = read_token(&path)?;
    if section.static_peers.len() > MAX_STATIC {
        return Err(PeersError::TooMany(section.static_peers.len()));
    }
    for m in &section.static_peers {
        if !is_host_port(m) {
            return Err(PeersError::Member(m.clone()));
        }
    }
    let dns = match &section.dns {
        None => None,
        Some(name) if is_host_port(name) => {
            if !(1..=86_400).contains(&section.dns_refresh_secs) {
                return Err(PeersError::DnsRefresh(section.dns_refresh_secs));
            }
            Some(DnsMembers {
                name: name.clone(),
                every: Duration::from_secs(section.dns_refresh_secs),
            })
        }
        Some(name) => return Err(PeersError::Dns(name.clone())),
    };
    if !(1..=60_000).contains(&section.timeout_ms) {
        return Err(PeersError::Timeout(section.timeout_ms));
    }
    if section.cache_mb > 65_536 {
        return Err(PeersError::CacheSize(section.cache_mb));
    }
    let first_byte = Duration::from_millis(section.timeout_ms);
    let peers = Peers::new(PeerSettings {
        own: Some(listen.to_string()),
        members: section.static_peers.clone(),
        token,
        first_byte,
        total: first_byte * 5,
    })?;
    Ok(Some(Setup {
        listen,
        peers,
        cache_bytes: section.cache_mb << 20,
        fixed: section.static_peers.clone(),
        dns,
    }))
}

/// The token in `path`: a file only its owner may read, one line.
fn read_token(path: &std::path::Path) -> Result<String, PeersError> {
    let read = |source| PeersError::TokenRead {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let md = file.metadata().map_err(read)?;
    let mode = md.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(PeersError::TokenMode {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    let mut text = String::new();
    file.take(MAX_TOKEN + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_TOKEN {
        return Err(PeersError::TokenSize {
            path: path.to_owned(),
        });
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(PeersError::TokenEmpty {
            path: path.to_owned(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PeersError::TokenChars {
            path: path.to_owned(),
        });
    }
    Ok(token.to_string())
}

/// `host:port`: a port, and a host name or address without a scheme,
/// path or user.
fn is_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok_and(|p| p > 0)
        && !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn section(token_file: Option<PathBuf>) -> PeersSection {
        PeersSection {
            listen: Some("127.0.0.2:7600".parse().unwrap()),
            static_peers: vec!["127.0.0.2:7600".into(), "node-b.lan:7600".into()],
            token_file,
            ..PeersSection::default()
        }
    }

    #[test]
    fn peers_are_off_without_listen() {
        assert!(load(&PeersSection::default()).unwrap().is_none());
    }

    #[test]
    fn the_token_file_must_exist_hold_a_token_and_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        assert!(matches!(load(&section(None)), Err(PeersError::NoTokenFile)));
        assert!(matches!(
            load(&section(Some(path.clone()))),
            Err(PeersError::TokenRead { .. })
        ));
        write("secret\n", 0o644);
        let e = load(&section(Some(path.clone()))).err().unwrap();
        assert!(
            matches!(e, PeersError::TokenMode { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        write("  \n", 0o600);
        assert!(matches!(
            load(&section(Some(path.clone()))),
            Err(PeersError::TokenEmpty { .. })
        ));
        write("two words\n", 0o600);
        assert!(matches!(
            load(&section(Some(path.clone()))),
            Err(PeersError::TokenChars { .. })
        ));
        write(&"x".repeat(5000), 0o600);
        assert!(matches!(
            load(&section(Some(path.clone()))),
            Err(PeersError::TokenSize { .. })
        ));
        write("secret\n", 0o600);
        let setup = load(&section(Some(path.clone()))).unwrap().unwrap();
        assert!(setup.peers.authorized(Some(b"Bearer secret")));
        assert_eq!(
            &*setup.peers.members(),
            ["node-b.lan:7600".to_string()],
            "this node's own address is recognised"
        );
        assert_eq!(setup.cache_bytes, 256 << 20);
    }

    #[test]
    fn static_entries_and_bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "secret").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        for bad in [
            "http://a:1",
            "a",
            "a:0",
            "a:99999",
            "a/b:1",
            "user@a:1",
            ":1",
        ] {
            let mut s = section(Some(path.clone()));
            s.static_peers = vec![bad.into()];
            assert!(
                matches!(load(&s), Err(PeersError::Member(_))),
                "{bad} is refused"
            );
        }
        for good in ["[::1]:7600", "10.0.0.5:7600", "node-a:1"] {
            let mut s = section(Some(path.clone()));
            s.static_peers = vec![good.into()];
            assert!(load(&s).is_ok(), "{good}");
        }
        let mut s = section(Some(path.clone()));
        s.timeout_ms = 0;
        assert!(matches!(load(&s), Err(PeersError::Timeout(0))));

        // The DNS name is host:port like a static entry, refreshed within
        // a second and a day.
        let mut s = section(Some(path.clone()));
        s.dns = Some("tarn-peers.kube-system.svc".into());
        assert!(matches!(load(&s), Err(PeersError::Dns(_))), "no port");
        s.dns = Some("tarn-peers.kube-system.svc:7600".into());
        s.dns_refresh_secs = 0;
        assert!(matches!(load(&s), Err(PeersError::DnsRefresh(0))));
        s.dns_refresh_secs = 30;
        let setup = load(&s).unwrap().expect("peers on");
        let dns = setup.dns.expect("dns members");
        assert_eq!(
            (dns.name.as_str(), dns.every),
            ("tarn-peers.kube-system.svc:7600", Duration::from_secs(30))
        );
    }
}
