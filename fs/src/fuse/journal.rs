//! The passthrough choices of one FUSE connection, kept on disk so that a
//! successor process that adopts the connection answers opens the way the
//! kernel still expects.
//!
//! The kernel fixes one I/O mode per open inode (see `passthrough.rs`): an
//! open of an inode that is open in passthrough mode must name the same
//! backing id, and an inode open in cached mode cannot be opened with one.
//! Backing ids are numbers the kernel hands out per connection, not a
//! function of the layer, so the only way a successor can know them is
//! this journal: one line per decision (`p INO ID`: passed through backing
//! id ID; `c INO`: served cached) and per last release (`r INO`). Replaying
//! it gives every inode a predecessor may still hold open, and how.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// A journal larger than this is not read (it is rewritten well before).
const MAX_BYTES: u64 = 64 << 20;
/// Rewritten from the live table once it has this many more lines.
const COMPACT_SLACK: usize = 16 * 1024;

/// How an inode was opened on this connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Cached,
    Backing(u32),
}

pub(super) struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
    /// Only the first failed write is logged: the journal is a best effort
    /// for a successor, never a reason to fail a read.
    failed: bool,
}

impl Journal {
    /// A fresh journal for a new connection (whatever was at `path` belonged
    /// to a connection that is gone).
    pub(super) fn create(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        drop(file);
        Journal::append_to(path, 0)
    }

    /// The journal of an adopted connection and what it says is open.
    pub(super) fn resume(path: &Path) -> io::Result<(Journal, HashMap<u64, Mode>)> {
        let mut text = String::new();
        match File::open(path) {
            Ok(f) => {
                f.take(MAX_BYTES).read_to_string(&mut text)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (live, lines) = replay(&text);
        Ok((Journal::append_to(path, lines)?, live))
    }

    fn append_to(path: &Path, lines: usize) -> io::Result<Journal> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal {
            path: path.to_owned(),
            file,
            lines,
            failed: false,
        })
    }

    pub(super) fn opened(&mut self, ino: u64, mode: Mode) {
        let line = match mode {
            Mode::Cached => format!("c {ino}\n"),
            Mode::Backing(id) => format!("p {ino} {id}\n"),
        };
        self.append(&line);
    }

    pub(super) fn released(&mut self, ino: u64) {
        self.append(&format!("r {ino}\n"));
    }

    /// Rewrites the journal as `live` once it has grown well past it.
    pub(super) fn compact_if_long(&mut self, live: impl ExactSizeIterator<Item = (u64, Mode)>) {
        if self.lines < live.len() + COMPACT_SLACK {
            return;
        }
        let tmp = self.path.with_extension("new");
        let text: String = live
            .map(|(ino, mode)| match mode {
                Mode::Cached => format!("c {ino}\n"),
                Mode::Backing(id) => format!("p {ino} {id}\n"),
            })
            .collect();
        let count = text.lines().count();
        let written = std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .and_then(|()| Journal::append_to(&self.path, count));
        match written {
            Ok(j) => *self = j,
            Err(e) => self.fail(&e),
        }
    }

    fn append(&mut self, line: &str) {
        // One write(2) of a whole line with O_APPEND: a crash leaves whole
        // lines only (a torn last line is skipped by `replay`).
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => self.lines += 1,
            Err(e) => self.fail(&e),
        }
    }

    fn fail(&mut self, e: &io::Error) {
        if !self.failed {
            self.failed = true;
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot keep passthrough journal; a successor may refuse some opens");
        }
    }
}

/// What a journal's text says is open, and how many lines it has.
fn replay(text: &str) -> (HashMap<u64, Mode>, usize) {
    let mut live = HashMap::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let mut words = line.split(' ');
        let (kind, ino) = (words.next(), words.next().and_then(|w| w.parse().ok()));
        let id = words.next().and_then(|w| w.parse().ok());
        match (kind, ino, id) {
            (Some("c"), Some(ino), None) => {
                live.insert(ino, Mode::Cached);
            }
            (Some("p"), Some(ino), Some(id)) => {
                live.insert(ino, Mode::Backing(id));
            }
            (Some("r"), Some(ino), None) => {
                live.remove(&ino);
            }
            _ => {}
        }
    }
    (live, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_what_is_still_open() {
        let (live, lines) = replay("c 5\np 7 3\nr 5\np 9 4\nc 9\np 12 1\nr 12\np 13 2");
        assert_eq!(lines, 8);
        assert_eq!(live.get(&5), None);
        assert_eq!(live.get(&7), Some(&Mode::Backing(3)));
        assert_eq!(live.get(&9), Some(&Mode::Cached), "the last decision wins");
        assert_eq!(live.get(&12), None);
        assert_eq!(live.get(&13), Some(&Mode::Backing(2)));
        let (torn, _) = replay("p 7 3\np 8");
        assert_eq!(torn.len(), 1, "a torn last line is skipped");
    }

    #[test]
    fn a_successor_reads_what_its_predecessor_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passthrough.journal");
        let mut j = Journal::create(&path).unwrap();
        j.opened(4, Mode::Backing(1));
        j.opened(5, Mode::Cached);
        j.opened(6, Mode::Backing(2));
        j.released(6);
        drop(j);
        let (mut j, live) = Journal::resume(&path).unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!(live[&4], Mode::Backing(1));
        j.lines = COMPACT_SLACK + 10;
        j.compact_if_long(live.clone().into_iter());
        j.released(4);
        drop(j);
        let (_, after) = Journal::resume(&path).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[&5], Mode::Cached);
        let fresh = Journal::create(&path).unwrap();
        drop(fresh);
        assert!(Journal::resume(&path).unwrap().1.is_empty());
    }
}
