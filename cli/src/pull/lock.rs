//! Coalescing of concurrent pulls (DESIGN.md §4): `tarn pull`s of one
//! reference into one containerd namespace take turns on an exclusive
//! `flock`, and each re-checks after getting it whether the image is already
//! complete, so N concurrent pulls cost about one pull. The kernel drops the
//! lock when the process dies, so a killed pull never blocks the next one.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tarn_fs::Digest;

const LOCK_DIR: &str = "/run/tarn/pull-locks";

/// Held while this process pulls; dropping it unlocks.
pub struct PullLock {
    _flock: Flock<File>,
}

/// The lock file of one (containerd, namespace, reference).
pub fn lock_path(dir: &Path, address: &Path, namespace: &str, reference: &str) -> PathBuf {
    let key = format!("{}\n{namespace}\n{reference}", address.display());
    dir.join(format!("{}.lock", Digest::of(key.as_bytes()).hex()))
}

/// Takes the pull lock, calling `on_wait` once if another pull holds it.
pub async fn acquire(
    address: &Path,
    namespace: &str,
    reference: &str,
    on_wait: impl FnOnce(),
) -> Result<PullLock> {
    let dir = lock_dir();
    let path = lock_path(&dir, address, namespace, reference);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open pull lock {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(PullLock { _flock: flock }),
        Err((file, Errno::EWOULDBLOCK)) => {
            on_wait();
            // flock(2) blocks: keep it off the async workers.
            let flock =
                tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
                    .await
                    .context("pull lock task failed")?
                    .map_err(|(_, e)| e)
                    .with_context(|| format!("cannot lock {}", path.display()))?;
            Ok(PullLock { _flock: flock })
        }
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// `/run/tarn/pull-locks` where we may create it (root), else a directory
/// under the temp dir so unprivileged use (e.g. `--help` checks, tests)
/// still coalesces.
fn lock_dir() -> PathBuf {
    let run = PathBuf::from(LOCK_DIR);
    if std::fs::create_dir_all(&run).is_ok() {
        return run;
    }
    let tmp = std::env::temp_dir().join("tarn-pull-locks");
    // If even this fails, opening the lock file reports the error.
    let _ = std::fs::create_dir_all(&tmp);
    tmp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_path_separates_containerds_namespaces_and_refs() {
        let d = Path::new("/x");
        let a = lock_path(d, Path::new("/run/c.sock"), "default", "r/a:1");
        assert_eq!(
            a,
            lock_path(d, Path::new("/run/c.sock"), "default", "r/a:1")
        );
        assert_ne!(
            a,
            lock_path(d, Path::new("/run/c2.sock"), "default", "r/a:1")
        );
        assert_ne!(a, lock_path(d, Path::new("/run/c.sock"), "k8s.io", "r/a:1"));
        assert_ne!(
            a,
            lock_path(d, Path::new("/run/c.sock"), "default", "r/a:2")
        );
    }

    #[tokio::test]
    async fn second_holder_waits_until_the_first_drops() {
        let addr = std::env::temp_dir().join(format!("tarn-lock-test-{}", std::process::id()));
        let first = acquire(&addr, "ns", "ref", || {}).await.unwrap();
        let waited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = waited.clone();
        let second = tokio::spawn(async move {
            acquire(&addr, "ns", "ref", move || {
                w.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !second.is_finished(),
            "second pull got the lock while the first held it"
        );
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
        drop(first);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), second).await;
        assert!(
            matches!(got, Ok(Ok(Ok(_)))),
            "second pull never got the lock"
        );
    }
}
