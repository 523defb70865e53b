//! The credentials the kubelet sent with `PullImage`, per repository, kept
//! in memory and in a root-only file so they outlive a restart of the
//! daemon: a lazily pulled layer keeps fetching from the registry long
//! after its pull, and after a restart the layers are mounted again with
//! no new `PullImage` to learn from.
//!
//! The file (`ROOT/cri-credentials.json`, mode 0600) is rewritten whole
//! on every change (a temp file, fsync, rename, fsync of the directory),
//! so a crash leaves the old or the new file, never a torn one. It is
//! bounded: [`MAX_ENTRIES`] repositories (the least recently captured go
//! first), [`MAX_ENTRY_BYTES`] per entry, [`MAX_FILE_BYTES`] read at
//! start. An entry expires `ttl` after its last capture (the kubelet sends
//! the secret again on every pull of the image, which renews it); expired
//! entries are never used and are dropped at the next write.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tarn_fs::registry::auth::keychain::IDENTITY_TOKEN_USER;
use tarn_fs::registry::auth::{Credentials, Keychain};
use tarn_fs::registry::{Reference, Repository};
use tarn_proto::cri::AuthConfig;

/// The file's name in the daemon's root.
pub const FILE_NAME: &str = "cri-credentials.json";
/// Repositories remembered at most; a node pulls from far fewer.
pub const MAX_ENTRIES: usize = 256;
/// Secret bytes (all fields together) one entry may hold: a registry's
/// JWT is a few KiB.
pub const MAX_ENTRY_BYTES: usize = 16 << 10;
/// The largest file read at start: [`MAX_ENTRIES`] full entries with JSON
/// escaping fit.
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Version of the file's layout.
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has layout version {found}, this daemon reads {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("encode credentials")]
    Encode(#[source] serde_json::Error),
    // Boxed: a RegistryError is large and would bloat every Result here.
    #[error("pulled image {image:?}")]
    Reference {
        image: String,
        #[source]
        source: Box<tarn_fs::registry::RegistryError>,
    },
    #[error("auth of {repository}: {reason}")]
    BadAuth { repository: String, reason: String },
    #[error("credentials task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// What a pull's `AuthConfig` gives a registry client.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Secret {
    /// A username and password: basic auth, or the token endpoint's GET.
    Basic { username: String, password: String },
    /// An OAuth refresh token, traded at the token endpoint.
    IdentityToken { token: String },
    /// A bearer token sent to the registry as it is.
    RegistryToken { token: String },
}

impl Secret {
    /// The secret an `AuthConfig` carries, as containerd's CRI plugin reads
    /// it: username/password, else `auth` (base64 `user:password`), else the
    /// identity token, else the registry token. `None`: an anonymous pull.
    pub fn of(auth: &AuthConfig) -> Result<Option<Secret>, String> {
        if !auth.username.is_empty() || !auth.password.is_empty() {
            return Ok(Some(Secret::Basic {
                username: auth.username.clone(),
                password: auth.password.clone(),
            }));
        }
        if !auth.auth.is_empty() {
            let decoded = STANDARD
                .decode(auth.auth.trim())
                .map_err(|e| format!("auth is not base64: {e}"))?;
            let text = String::from_utf8(decoded).map_err(|_| "auth is not utf-8".to_string())?;
            let (username, password) = text
                .split_once(':')
                .ok_or_else(|| "auth is not user:password".to_string())?;
            return Ok(Some(Secret::Basic {
                username: username.to_string(),
                password: password.to_string(),
            }));
        }
        if !auth.identity_token.is_empty() {
            return Ok(Some(Secret::IdentityToken {
                token: auth.identity_token.clone(),
            }));
        }
        if !auth.registry_token.is_empty() {
            return Ok(Some(Secret::RegistryToken {
                token: auth.registry_token.clone(),
            }));
        }
        Ok(None)
    }

    fn len(&self) -> usize {
        match self {
            Secret::Basic { username, password } => username.len() + password.len(),
            Secret::IdentityToken { token } | Secret::RegistryToken { token } => token.len(),
        }
    }
}

impl std::fmt::Debug for Secret {
    // Never print the secret into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Secret::IdentityToken { .. } => write!(f, "IdentityToken(<redacted>)"),
            Secret::RegistryToken { .. } => write!(f, "RegistryToken(<redacted>)"),
        }
    }
}

/// One repository's credentials in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    registry: String,
    repository: String,
    secret: Secret,
    /// Seconds since the epoch: when it was last captured, and when it
    /// stops being used.
    captured: u64,
    expires: u64,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    entries: Vec<Entry>,
}

/// The captured credentials: a cheap handle shared by the CRI proxy (which
/// captures) and the registry client (which looks up).
#[derive(Debug)]
pub struct CriCredentials {
    path: PathBuf,
    ttl: Duration,
    // A std mutex: held for map operations only, never across `.await` or
    // the file write (the write works on a snapshot).
    entries: Mutex<BTreeMap<Repository, Entry>>,
    /// Serialises writers so an older snapshot never replaces a newer one.
    write: tokio::sync::Mutex<()>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CriCredentials {
    /// Opens the store under `root`, reading what an earlier run persisted
    /// (expired entries are skipped). A missing file is an empty store; an
    /// unreadable, oversized or malformed one is an error (the daemon logs
    /// it and starts empty rather than guess). Blocking.
    pub fn open(root: &Path, ttl: Duration) -> Result<CriCredentials, StoreError> {
        let path = root.join(FILE_NAME);
        let store = CriCredentials {
            path: path.clone(),
            ttl,
            entries: Mutex::new(BTreeMap::new()),
            write: tokio::sync::Mutex::new(()),
        };
        let loaded = read_file(&path)?;
        let t = now();
        let mut map = store.lock();
        for e in loaded.into_iter().filter(|e| e.expires > t) {
            if e.secret.len() > MAX_ENTRY_BYTES || map.len() >= MAX_ENTRIES {
                continue;
            }
            let repo = Repository {
                registry: e.registry.clone(),
                name: e.repository.clone(),
            };
            map.insert(repo, e);
        }
        drop(map);
        Ok(store)
    }

    /// An empty store that never touches a file, for tests and for a daemon
    /// whose file could not be read.
    pub fn in_memory_at(root: &Path, ttl: Duration) -> CriCredentials {
        CriCredentials {
            path: root.join(FILE_NAME),
            ttl,
            entries: Mutex::new(BTreeMap::new()),
            write: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Repository, Entry>> {
        // A panic while holding it leaves a plain map: still consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers `auth` for the repository of `image` (a reference as the
    /// kubelet sends it) and persists the store before returning, so a
    /// restart right after the pull still has it. An empty `auth` is an
    /// anonymous pull and changes nothing. Returns the repository captured.
    pub async fn capture(
        &self,
        image: &str,
        auth: &AuthConfig,
    ) -> Result<Option<Repository>, StoreError> {
        let reference: Reference = image.parse().map_err(|source| StoreError::Reference {
            image: image.to_string(),
            source: Box::new(source),
        })?;
        let repo = reference.repository;
        let bad = |reason: String| StoreError::BadAuth {
            repository: repo.to_string(),
            reason,
        };
        let Some(secret) = Secret::of(auth).map_err(bad)? else {
            return Ok(None);
        };
        if secret.len() > MAX_ENTRY_BYTES {
            return Err(bad(format!(
                "{} secret bytes, over the {MAX_ENTRY_BYTES}-byte limit",
                secret.len()
            )));
        }
        let _writer = self.write.lock().await;
        let t = now();
        let snapshot = {
            let mut map = self.lock();
            map.retain(|_, e| e.expires > t);
            map.insert(
                repo.clone(),
                Entry {
                    registry: repo.registry.clone(),
                    repository: repo.name.clone(),
                    secret,
                    captured: t,
                    expires: t.saturating_add(self.ttl.as_secs()),
                },
            );
            while map.len() > MAX_ENTRIES {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, e)| e.captured)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => map.remove(&k),
                    None => break,
                };
            }
            map.values().cloned().collect::<Vec<_>>()
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_file(&path, snapshot)).await??;
        Ok(Some(repo))
    }

    /// The unexpired credentials captured for `repo`, if any.
    pub fn lookup(&self, repo: &Repository) -> Option<Secret> {
        let t = now();
        self.lock()
            .get(repo)
            .filter(|e| e.expires > t)
            .map(|e| e.secret.clone())
    }

    /// Repositories with unexpired credentials.
    pub fn len(&self) -> usize {
        let t = now();
        self.lock().values().filter(|e| e.expires > t).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read_file(path: &Path) -> Result<Vec<Entry>, StoreError> {
    let io = |what| {
        let path = path.to_owned();
        move |source| StoreError::Io { what, path, source }
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("open")(e)),
    };
    let size = f.metadata().map_err(io("stat"))?.len();
    if size > MAX_FILE_BYTES {
        return Err(StoreError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let mut text = Vec::new();
    f.take(MAX_FILE_BYTES)
        .read_to_end(&mut text)
        .map_err(io("read"))?;
    let file: File = serde_json::from_slice(&text).map_err(|source| StoreError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if file.version != VERSION {
        return Err(StoreError::Version {
            path: path.to_owned(),
            found: file.version,
        });
    }
    Ok(file.entries)
}

/// Replaces the file atomically with `entries`, root-only from its first
/// byte (the temp file is created 0600).
fn write_file(path: &Path, entries: Vec<Entry>) -> Result<(), StoreError> {
    let io = |what, p: &Path| {
        let path = p.to_owned();
        move |source| StoreError::Io { what, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let bytes = serde_json::to_vec(&File {
        version: VERSION,
        entries,
    })
    .map_err(StoreError::Encode)?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    // The mode given at create is masked by the umask; make sure.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))?;
    Ok(())
}

/// The registry client's view: a credential source asked before the docker
/// config. A registry token (a bearer token for the registry itself) has no
/// place in the client's credentials: it is kept but not used, and such a
/// repository is fetched as if no secret had been sent.
impl Keychain for CriCredentials {
    fn name(&self) -> &str {
        "cri"
    }

    fn credentials(&self, repo: &Repository) -> Option<Credentials> {
        match self.lookup(repo)? {
            Secret::Basic { username, password } => Some(Credentials { username, password }),
            Secret::IdentityToken { token } => Some(Credentials {
                username: IDENTITY_TOKEN_USER.to_string(),
                password: token,
            }),
            Secret::RegistryToken { .. } => {
                tracing::debug!(repository = %repo, "cri: a registry token is not used by tarn");
                None
            }
        }
    }
}
