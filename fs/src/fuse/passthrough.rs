//! FUSE passthrough: a regular file whose content sits in the cache as one
//! standalone, verified file is handed to the kernel at `open`, so its reads
//! go to that file's page cache without a round trip through this process.
//!
//! The kernel fixes one I/O mode per inode while it is open: every open of
//! an inode must either pass through the same backing file or none, or the
//! open fails with EIO. So the mode is decided at an inode's first open and
//! kept until its last release (the kernel drops its side first, so keeping
//! ours a little longer is always consistent).
//!
//! Which files have (or can get) such a file, and the work that gives them
//! one, is the cache's business ([`WholeFile`], `cache/assemble.rs`); this
//! module only runs that work on the blocking pool, off the FUSE thread,
//! and opens the file it yields with a backing id.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

use crate::cache::WholeFile;
use crate::format::{FileKind, Inode};
use crate::layer::Layer;

/// Counters of one mount's passthrough decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassthroughStats {
    /// Opens answered with a backing file.
    pub opens: u64,
    /// Opens of a cached standalone file the kernel refused to pass
    /// through (served the normal way instead).
    pub refused: u64,
    /// Whole-file objects this mount assembled from chunks.
    pub assembled: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    opens: AtomicU64,
    refused: AtomicU64,
    assembled: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> PassthroughStats {
        PassthroughStats {
            opens: self.opens.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            assembled: self.assembled.load(Ordering::Relaxed),
        }
    }
}

/// The mode an open inode is in, and how many opens hold it.
struct Open {
    backing: Option<BackingId>,
    count: u64,
}

pub(super) struct Passthrough {
    layer: Arc<Layer>,
    runtime: tokio::runtime::Handle,
    /// Set by `init` once the kernel agreed to passthrough.
    enabled: bool,
    open: Mutex<HashMap<u64, Open>>,
    counters: Arc<Counters>,
}

/// Immutable content: the page cache stays valid across opens.
const CACHED: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

impl Passthrough {
    pub(super) fn new(
        layer: Arc<Layer>,
        runtime: tokio::runtime::Handle,
        counters: Arc<Counters>,
    ) -> Passthrough {
        Passthrough {
            layer,
            runtime,
            enabled: false,
            open: Mutex::new(HashMap::new()),
            counters,
        }
    }

    pub(super) fn enable(&mut self) {
        self.enabled = true;
    }

    /// Answers an open of regular file `ino`: through a backing file when
    /// the inode already has one or can get one now, the normal way else.
    pub(super) fn open(&self, ino: u64, inode: &Inode, reply: ReplyOpen) {
        if !self.enabled || inode.kind() != FileKind::Reg {
            return reply.opened(FileHandle(0), CACHED);
        }
        let mut open = self.open.lock().expect("open-inode table poisoned");
        if let Some(o) = open.get_mut(&ino) {
            o.count += 1;
            return match &o.backing {
                Some(id) => {
                    self.counters.opens.fetch_add(1, Ordering::Relaxed);
                    reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), id)
                }
                None => reply.opened(FileHandle(0), CACHED),
            };
        }
        let backing = self.backing_file(ino, inode).and_then(|file| {
            reply
                .open_backing(&file)
                .inspect_err(|e| {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(ino, error = %e, "kernel refused a passthrough backing file");
                })
                .ok()
            // `file` closes here: the kernel holds its own reference.
        });
        match &backing {
            Some(id) => {
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                // Its reads will not come here: the opening is taken as the
                // use of what hints fetched of it.
                self.layer.opened_whole(inode);
                reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), id);
            }
            None => reply.opened(FileHandle(0), CACHED),
        }
        open.insert(ino, Open { backing, count: 1 });
    }

    /// Notes a release of `ino`; the last one drops the backing id (which
    /// closes it in the kernel) and, for a file read the normal way, starts
    /// assembly if its chunks are all cached by now.
    pub(super) fn release(&self, ino: u64, inode: &Inode) {
        let last = {
            let mut open = self.open.lock().expect("open-inode table poisoned");
            match open.get_mut(&ino) {
                Some(o) if o.count > 1 => {
                    o.count -= 1;
                    None
                }
                Some(_) => open.remove(&ino),
                None => None,
            }
        };
        if let Some(o) = last
            && o.backing.is_none()
        {
            self.prepare(ino, inode);
        }
    }

    /// A standalone, verified cache file holding exactly this file's
    /// content, opened read-only; otherwise starts whatever background work
    /// (verification, assembly) lets a later open pass through.
    fn backing_file(&self, ino: u64, inode: &Inode) -> Option<File> {
        let file = whole_file(&self.layer, ino, inode)?;
        let Some(path) = self.layer.cache().whole_file(&file) else {
            self.start(&file);
            return None;
        };
        File::open(&path)
            .inspect_err(
                |e| tracing::debug!(path = %path.display(), error = %e, "cannot open cache file"),
            )
            .ok()
    }

    /// Starts, on the blocking pool, the work the cache says would give
    /// `inode` a verified standalone file.
    fn prepare(&self, ino: u64, inode: &Inode) {
        if let Some(file) = whole_file(&self.layer, ino, inode) {
            self.start(&file);
        }
    }

    /// [`Passthrough::prepare`] for a file already looked at.
    fn start(&self, file: &WholeFile<'_>) {
        if !self.enabled {
            return;
        }
        let cache = self.layer.cache().clone();
        let Some(work) = cache.prepare_whole_file(file) else {
            return;
        };
        let counters = self.counters.clone();
        self.runtime.spawn_blocking(move || {
            if work.run(&cache) {
                counters.assembled.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// The whole-file object regular file `ino` would pass through, if it is
/// worth one.
fn whole_file<'a>(layer: &'a Layer, ino: u64, inode: &Inode) -> Option<WholeFile<'a>> {
    if inode.kind() != FileKind::Reg {
        return None;
    }
    let index = layer.index();
    WholeFile::of(inode.size(), index.file_chunks(inode), || {
        index.file_digest(ino)
    })
}
