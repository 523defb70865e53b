//! Coalescing of concurrent pulls (DESIGN.md §4): `tarn pull`s of one
//! reference into one containerd namespace take turns on an exclusive
//! `flock`. The kernel drops the lock when the process dies, so a killed
//! pull never blocks the next one.
//!
//! A pull that finds the lock taken joins the pull in flight, as concurrent
//! `docker pull`s do: it waits for the lock *shared*, so that when the
//! holder ends every waiter gets it at once, and reads what the holder wrote
//! in the lock file: the manifest it finished, into which snapshotter. Each
//! exclusive holder starts by clearing that record, and writes it only once
//! the image record is in containerd, so a record a waiter reads comes from
//! a pull that held the lock after the waiter asked for it and succeeded:
//! the waiter's work is done, with no request of its own. Without a record
//! (that pull failed) a waiter turns its lock exclusive and pulls itself.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tarn_fs::Digest;

const LOCK_DIR: &str = "/run/tarn/pull-locks";

/// Held exclusively while this process pulls; dropping it unlocks.
pub struct PullLock {
    flock: Flock<File>,
    path: PathBuf,
}

/// What the last holder of a lock finished: a hint, to be checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub manifest: Digest,
    /// The snapshotter that unpacked it.
    pub snapshotter: String,
}

/// How this pull got its turn.
pub enum Turn {
    /// Nobody held the lock: this pull holds it exclusively.
    First(PullLock),
    /// Another pull held it and has ended; this one holds it shared.
    After(Waited),
}

/// The lock held shared after another pull's turn, with what that pull
/// recorded.
pub struct Waited {
    lock: PullLock,
    pub done: Option<Done>,
}

impl Waited {
    /// Turns the shared lock exclusive, waiting (blocking the thread) for
    /// the other waiters' checks: this pull does the work after all.
    pub fn take(self) -> Result<PullLock> {
        let Waited { lock, .. } = self;
        lock.flock
            .relock(FlockArg::LockExclusive)
            .with_context(|| format!("cannot lock {}", lock.path.display()))?;
        lock.clear()?;
        Ok(lock)
    }
}

impl PullLock {
    /// Tells the pulls waiting for this lock that `manifest` is now in
    /// containerd, unpacked by `snapshotter`. Call it only once it is.
    pub fn record_done(&self, manifest: &Digest, snapshotter: &str) -> Result<()> {
        self.write(&format!("done {manifest} {snapshotter}\n"))
    }

    /// Forgets an earlier holder's record, so a waiter after a failed pull
    /// does not read an old one.
    fn clear(&self) -> Result<()> {
        self.write("")
    }

    fn write(&self, text: &str) -> Result<()> {
        let mut file: &File = &self.flock;
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write pull lock {}", self.path.display()))
    }

    fn read_done(&self) -> Option<Done> {
        let mut file: &File = &self.flock;
        let mut text = String::new();
        file.seek(SeekFrom::Start(0)).ok()?;
        // A record is two digests: more is not ours.
        file.take(256).read_to_string(&mut text).ok()?;
        parse_done(&text)
    }
}

fn parse_done(text: &str) -> Option<Done> {
    let mut words = text.strip_suffix('\n')?.split(' ');
    let (Some("done"), Some(manifest), Some(snapshotter), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    if snapshotter.is_empty() {
        return None;
    }
    Some(Done {
        manifest: manifest.parse().ok()?,
        snapshotter: snapshotter.to_string(),
    })
}

/// The lock file of one (containerd, namespace, reference).
pub fn lock_path(dir: &Path, address: &Path, namespace: &str, reference: &str) -> PathBuf {
    let key = format!("{}\n{namespace}\n{reference}", address.display());
    dir.join(format!("{}.lock", Digest::of(key.as_bytes()).hex()))
}

/// Takes the pull lock: exclusively if it is free, else shared once the
/// pull holding it ends, calling `on_wait` first. Blocks the thread while it
/// waits: call it before starting an async runtime, or off its workers.
pub fn acquire(
    address: &Path,
    namespace: &str,
    reference: &str,
    on_wait: impl FnOnce(),
) -> Result<Turn> {
    let dir = lock_dir();
    let path = lock_path(&dir, address, namespace, reference);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open pull lock {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(flock) => {
            let lock = PullLock { flock, path };
            lock.clear()?;
            Ok(Turn::First(lock))
        }
        Err((file, Errno::EWOULDBLOCK)) => {
            on_wait();
            let flock = Flock::lock(file, FlockArg::LockShared)
                .map_err(|(_, e)| e)
                .with_context(|| format!("cannot lock {}", path.display()))?;
            let lock = PullLock { flock, path };
            let done = lock.read_done();
            Ok(Turn::After(Waited { lock, done }))
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

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    fn digest(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    /// A lock key of this test alone: tests run side by side in one process.
    fn address(test: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tarn-lock-test-{}-{test}", std::process::id()))
    }

    fn first(addr: &Path) -> PullLock {
        match acquire(addr, "ns", "ref", || {}).unwrap() {
            Turn::First(lock) => lock,
            Turn::After(_) => panic!("a free lock was taken as if held by another pull"),
        }
    }

    /// Starts a pull that waits for the lock; true in the flag once it waits.
    fn waiter(addr: &Path) -> (JoinHandle<Result<Turn>>, Arc<AtomicBool>) {
        let waited = Arc::new(AtomicBool::new(false));
        let w = waited.clone();
        let addr = addr.to_path_buf();
        let thread = std::thread::spawn(move || {
            acquire(&addr, "ns", "ref", move || w.store(true, Ordering::SeqCst))
        });
        (thread, waited)
    }

    /// A waiter that has found the lock held.
    fn waiting(addr: &Path) -> JoinHandle<Result<Turn>> {
        let (thread, waited) = waiter(addr);
        for _ in 0..500 {
            if waited.load(Ordering::SeqCst) {
                return thread;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("a pull never found the lock held");
    }

    /// `thread`'s result, if it ends within 5 s.
    fn within_5s<T>(thread: JoinHandle<T>) -> Option<T> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        thread
            .is_finished()
            .then(|| thread.join().expect("lock thread panicked"))
    }

    fn after(thread: JoinHandle<Result<Turn>>) -> Waited {
        match within_5s(thread) {
            Some(Ok(Turn::After(w))) => w,
            Some(Ok(Turn::First(_))) => panic!("a waiter did not see that it waited"),
            _ => panic!("a waiting pull never got the lock"),
        }
    }

    #[test]
    fn waiters_wait_for_the_holder_then_all_read_its_record_together() {
        let addr = address("record");
        let holder = first(&addr);
        let (a, a_waited) = waiter(&addr);
        let (b, b_waited) = waiter(&addr);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !a.is_finished() && !b.is_finished(),
            "a pull got the lock while another held it"
        );
        assert!(a_waited.load(Ordering::SeqCst) && b_waited.load(Ordering::SeqCst));

        holder.record_done(&digest("m"), "tarn").unwrap();
        drop(holder);
        // Both hold it at once: neither waits for the other's check.
        let (a, b) = (after(a), after(b));
        let want = Done {
            manifest: digest("m"),
            snapshotter: "tarn".into(),
        };
        assert_eq!(a.done.as_ref(), Some(&want));
        assert_eq!(b.done.as_ref(), Some(&want));

        // A waiter that must pull after all waits until the others are done.
        let taking = std::thread::spawn(move || a.take());
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !taking.is_finished(),
            "the lock turned exclusive while another pull held it shared"
        );
        drop(b);
        let Some(Ok(lock)) = within_5s(taking) else {
            panic!("the lock never turned exclusive");
        };
        // Every holder starts from no record, so a failure leaves none.
        let c = waiting(&addr);
        drop(lock);
        assert_eq!(after(c).done, None);
        let recorder = first(&addr);
        let d = waiting(&addr);
        recorder.record_done(&digest("m"), "tarn").unwrap();
        drop(recorder);
        assert!(after(d).done.is_some());
        let next = first(&addr);
        let e = waiting(&addr);
        drop(next);
        assert_eq!(after(e).done, None);
    }

    #[test]
    fn records_parse_only_when_whole() {
        let m = digest("m");
        assert_eq!(
            parse_done(&format!("done {m} tarn\n")),
            Some(Done {
                manifest: m,
                snapshotter: "tarn".into()
            })
        );
        for bad in [
            String::new(),
            format!("done {m} tarn"),
            format!("done {m}\n"),
            format!("done {m} tarn x\n"),
            format!("ready {m} tarn\n"),
            "done sha256:12 tarn\n".to_string(),
            "done  tarn\n".to_string(),
            format!("done {m} \n"),
        ] {
            assert_eq!(parse_done(&bad), None, "{bad:?}");
        }
    }
}
