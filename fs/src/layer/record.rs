//! Access recording: which files of a layer a workload opened and read,
//! in the order it first touched them (for `tarn optimize` and start
//! profiles).
//!
//! The FUSE adapter reports every open and every read it serves; with no
//! recording running that is one relaxed atomic load. An open reaches the
//! daemon even when the file's bytes come from the page cache or a
//! passthrough backing file, so a recording sees a file whether or not its
//! bytes were fetched; ranges are those of the reads that reached FUSE.
//!
//! A layer may be recorded by a few sessions at once (two `tarn optimize`
//! runs of images sharing a base layer), each with its own id. Every bound
//! is fixed: sessions per layer, files per session, ranges per file, so a
//! session its caller forgot costs a few megabytes at most.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::format::{FileKind, LayerIndex, ROOT_INO};

/// Sessions recording one layer at once.
pub const MAX_SESSIONS: usize = 16;
/// Files one session keeps; opens of further files are not recorded.
pub const MAX_FILES: usize = 1 << 16;
/// Distinct byte ranges kept per file; past it, the last one grows.
pub const MAX_RANGES: usize = 64;
/// Directory levels a recorded path may have (deeper: left out).
const MAX_DEPTH: usize = 4096;

/// One file a session saw, by inode, while recording.
#[derive(Debug, Clone)]
struct Seen {
    ino: u64,
    first: Duration,
    /// Sorted, disjoint, merged when they touch.
    ranges: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct Session {
    started: Instant,
    by_ino: HashMap<u64, usize>,
    files: Vec<Seen>,
}

impl Session {
    fn touch(&mut self, ino: u64) -> Option<&mut Seen> {
        let next = self.files.len();
        let k = match self.by_ino.entry(ino) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(_) if next >= MAX_FILES => return None,
            Entry::Vacant(e) => {
                e.insert(next);
                self.files.push(Seen {
                    ino,
                    first: self.started.elapsed(),
                    ranges: Vec::new(),
                });
                next
            }
        };
        self.files.get_mut(k)
    }
}

/// A file a recording saw: its path in the layer, when it was first
/// opened or read (since the recording started), and the byte ranges read
/// through FUSE (empty when every read came from the kernel's caches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub path: String,
    pub first: Duration,
    pub ranges: Vec<(u64, u64)>,
}

/// Why a recording could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("recording {0} is already running on this layer")]
    Running(u64),
    #[error("{MAX_SESSIONS} recordings already run on this layer")]
    TooMany,
}

/// The recording state of one layer.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Whether any session runs: the only thing a read looks at otherwise.
    on: AtomicBool,
    sessions: Mutex<Vec<(u64, Session)>>,
}

impl Recorder {
    pub fn start(&self, id: u64) -> Result<(), RecordError> {
        let mut s = self.sessions.lock().expect("recorder poisoned");
        if s.iter().any(|(i, _)| *i == id) {
            return Err(RecordError::Running(id));
        }
        if s.len() >= MAX_SESSIONS {
            return Err(RecordError::TooMany);
        }
        s.push((
            id,
            Session {
                started: Instant::now(),
                by_ino: HashMap::new(),
                files: Vec::new(),
            },
        ));
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// Ends session `id` and returns what it saw, paths resolved in
    /// `index`, in first-access order; `None` if no such session runs.
    pub fn stop(&self, id: u64, index: &LayerIndex) -> Option<Vec<Access>> {
        let session = {
            let mut s = self.sessions.lock().expect("recorder poisoned");
            let k = s.iter().position(|(i, _)| *i == id)?;
            let (_, session) = s.swap_remove(k);
            self.on.store(!s.is_empty(), Ordering::Release);
            session
        };
        let names = names_of(index, &session.by_ino);
        Some(
            session
                .files
                .into_iter()
                .filter_map(|f| {
                    Some(Access {
                        path: path_of(f.ino, &names)?,
                        first: f.first,
                        ranges: f.ranges,
                    })
                })
                .collect(),
        )
    }

    /// Whether a session runs (tests).
    pub fn running(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// A file was opened.
    pub fn open(&self, ino: u64) {
        if self.on.load(Ordering::Relaxed) {
            self.each(|s| {
                s.touch(ino);
            });
        }
    }

    /// `len` bytes at `offset` of a file were read through FUSE.
    pub fn read(&self, ino: u64, offset: u64, len: u64) {
        if !self.on.load(Ordering::Relaxed) || len == 0 {
            return;
        }
        let range = (offset, offset.saturating_add(len));
        self.each(|s| {
            if let Some(seen) = s.touch(ino) {
                add_range(&mut seen.ranges, range);
            }
        });
    }

    fn each(&self, mut f: impl FnMut(&mut Session)) {
        let mut s = self.sessions.lock().expect("recorder poisoned");
        for (_, session) in s.iter_mut() {
            f(session);
        }
    }
}

/// Adds `r` to sorted, disjoint `ranges`, merging what it touches. Past
/// [`MAX_RANGES`], the range is merged into its nearest neighbour instead.
fn add_range(ranges: &mut Vec<(u64, u64)>, r: (u64, u64)) {
    // First range ending at or after r's start: the only ones r can touch
    // begin there.
    let at = ranges.partition_point(|&(_, end)| end < r.0);
    let mut merged = r;
    let mut upto = at;
    while let Some(&(s, e)) = ranges.get(upto) {
        if s > merged.1 {
            break;
        }
        merged = (merged.0.min(s), merged.1.max(e));
        upto += 1;
    }
    if upto == at && ranges.len() >= MAX_RANGES {
        // Touches nothing and there is no room: widen a neighbour.
        let k = at.min(ranges.len() - 1);
        let n = &mut ranges[k];
        *n = (n.0.min(r.0), n.1.max(r.1));
        // Widening may make it touch the next one over.
        if let Some(&(s, e)) = ranges.get(k + 1)
            && s <= ranges[k].1
        {
            ranges[k].1 = ranges[k].1.max(e);
            ranges.remove(k + 1);
        }
        if k > 0 && ranges[k - 1].1 >= ranges[k].0 {
            ranges[k - 1].1 = ranges[k - 1].1.max(ranges[k].1);
            ranges.remove(k);
        }
        return;
    }
    ranges.splice(at..upto, [merged]);
}

/// One name (parent directory, entry name) of each inode in `want`,
/// found by walking the tree breadth first from the root, with a queue
/// (never recursion); the first name met wins for a hard link.
fn names_of(index: &LayerIndex, want: &HashMap<u64, usize>) -> HashMap<u64, (u64, Vec<u8>)> {
    let mut names: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([ROOT_INO]);
    let mut dirs_seen = std::collections::HashSet::from([ROOT_INO]);
    while let Some(dir) = queue.pop_front() {
        let Some(inode) = index.inode(dir) else {
            continue;
        };
        for (name, child) in index.children(&inode) {
            let is_dir = index
                .inode(child)
                .is_some_and(|c| c.kind() == FileKind::Dir);
            if is_dir {
                if dirs_seen.insert(child) {
                    names.entry(child).or_insert((dir, name.to_vec()));
                    queue.push_back(child);
                }
            } else if want.contains_key(&child) {
                names.entry(child).or_insert((dir, name.to_vec()));
            }
        }
    }
    names
}

/// The path of `ino` from the root, without a leading slash.
fn path_of(ino: u64, names: &HashMap<u64, (u64, Vec<u8>)>) -> Option<String> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut at = ino;
    while at != ROOT_INO {
        if parts.len() >= MAX_DEPTH {
            return None;
        }
        let (parent, name) = names.get(&at)?;
        parts.push(name);
        at = *parent;
    }
    parts.reverse();
    let joined: Vec<u8> = parts.join(&b'/');
    Some(String::from_utf8_lossy(&joined).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_stay_bounded() {
        let mut r = Vec::new();
        add_range(&mut r, (10, 20));
        add_range(&mut r, (30, 40));
        add_range(&mut r, (20, 30));
        assert_eq!(r, vec![(10, 40)]);
        add_range(&mut r, (0, 5));
        add_range(&mut r, (50, 60));
        assert_eq!(r, vec![(0, 5), (10, 40), (50, 60)]);
        add_range(&mut r, (3, 55));
        assert_eq!(r, vec![(0, 60)]);
        let mut r = Vec::new();
        for k in 0..1000u64 {
            add_range(&mut r, (k * 100, k * 100 + 10));
        }
        assert!(r.len() <= MAX_RANGES);
        // Still sorted, disjoint, and covering every read.
        assert!(r.windows(2).all(|w| w[0].1 < w[1].0));
        for k in 0..1000u64 {
            assert!(r.iter().any(|&(s, e)| s <= k * 100 && k * 100 + 10 <= e));
        }
    }

    #[test]
    fn sessions_are_bounded_and_off_costs_nothing() {
        let rec = Recorder::default();
        assert!(!rec.running());
        rec.open(5); // nothing recorded, nothing to stop
        for id in 0..MAX_SESSIONS as u64 {
            rec.start(id).unwrap();
        }
        assert_eq!(rec.start(99), Err(RecordError::TooMany));
        assert_eq!(rec.start(0), Err(RecordError::Running(0)));
    }
}
