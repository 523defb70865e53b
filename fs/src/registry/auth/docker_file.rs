//! [`DockerFile`]: the docker config file as a long-lived daemon sees it.
//! The file is re-read when it changes (its inode, size or mtime differ
//! from the last read), checked each time credentials are asked for: the
//! client asks at most every [`ANSWER_TTL`](super::keychain::ANSWER_TTL)
//! per repository, and at once after a refusal, so a `docker login` or a
//! rotated secret reaches the daemon without a restart and without
//! inotify. Credential helpers' answers are kept [`HELPER_ANSWER_TTL`]
//! (they are processes, some of which make a network call), and dropped
//! when the file changes or the registry refuses them.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::docker::DockerConfig;
use super::keychain::{Credentials, Keychain};
use crate::registry::error::RegistryError;
use crate::registry::reference::Repository;

/// How long a credential helper's answer is used before it is asked again:
/// helpers hand out short-lived secrets (a cloud registry's last hours).
pub const HELPER_ANSWER_TTL: Duration = Duration::from_secs(600);
/// Registries whose helper answers are kept at most; past it the answers
/// are dropped and asked for again (a node pulls from a handful).
const MAX_HELPED: usize = 1024;

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

struct State {
    config: Arc<DockerConfig>,
    /// `None`: the file did not exist at the last look.
    stamp: Option<Stamp>,
    /// Helper answers per registry, with when they were got.
    helped: HashMap<String, (Option<Credentials>, Instant)>,
}

/// The docker config file, re-read when it changes.
pub struct DockerFile {
    path: PathBuf,
    /// Where helpers are looked for (`PATH`'s syntax); `None`: `PATH`.
    search_path: Option<OsString>,
    state: Mutex<State>,
}

impl DockerFile {
    /// Reads `path` now: a file that does not parse is an error at start
    /// (later it is a warning, and the last good version stays). A missing
    /// file means no credentials until it appears.
    pub fn open(path: PathBuf) -> Result<DockerFile, RegistryError> {
        let stamp = stamp(&path);
        let config = DockerConfig::load(&path)?;
        Ok(DockerFile {
            path,
            search_path: None,
            state: Mutex::new(State {
                config: Arc::new(config),
                stamp,
                helped: HashMap::new(),
            }),
        })
    }

    /// Looks for credential helpers in `path` (`PATH`'s syntax) instead of
    /// the process's `PATH`.
    pub fn with_search_path(mut self, path: impl Into<OsString>) -> DockerFile {
        let path = path.into();
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        state.config = Arc::new(DockerConfig::clone(&state.config).with_search_path(path.clone()));
        self.search_path = Some(path);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current config: re-read first if the file changed.
    fn current(&self) -> Arc<DockerConfig> {
        let now = stamp(&self.path);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now != state.stamp {
            state.stamp = now;
            match DockerConfig::load(&self.path) {
                Ok(mut config) => {
                    if let Some(p) = &self.search_path {
                        config = config.with_search_path(p.clone());
                    }
                    tracing::info!(path = %self.path.display(), "docker config changed; re-read it");
                    state.config = Arc::new(config);
                    state.helped.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "docker config changed but does not parse; keeping the last good one");
                }
            }
        }
        state.config.clone()
    }
}

impl Keychain for DockerFile {
    fn name(&self) -> &str {
        "docker-config"
    }

    fn credentials(&self, repo: &Repository) -> Option<Credentials> {
        let config = self.current();
        let registry = &repo.registry;
        if !config.uses_helper(registry) {
            return config.credentials_for(registry);
        }
        {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((answer, at)) = state.helped.get(registry)
                && at.elapsed() < HELPER_ANSWER_TTL
            {
                return answer.clone();
            }
        }
        // The helper runs without the lock: it may take a while.
        let answer = config.credentials_for(registry);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.helped.len() >= MAX_HELPED {
            state.helped.clear();
        }
        state
            .helped
            .insert(registry.clone(), (answer.clone(), Instant::now()));
        answer
    }

    fn refused(&self, repo: &Repository) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.helped.remove(&repo.registry);
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

#[cfg(test)]
mod tests;
