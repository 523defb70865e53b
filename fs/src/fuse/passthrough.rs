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
//! A connection outlives its process when a successor adopts it (see
//! `fuse/mod.rs`): the kernel's modes and backing ids stay, this table does
//! not. So every decision is also written to the connection's [`Journal`],
//! and a successor starts with its predecessor's open inodes, kept in the
//! mode they had until the connection ends (how many opens still hold them
//! is not known, so they are never let go).
//!
//! Which files have (or can get) such a file, and the work that gives them
//! one, is the cache's business ([`WholeFile`], `cache/assemble.rs`); this
//! module only runs that work on the blocking pool, off the FUSE thread,
//! and opens the file it yields with a backing id.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

use super::journal::{Journal, Mode};
use crate::cache::{Hold, WholeFile};
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
    /// The kernel agreed to passthrough at INIT (what a successor must
    /// know, since it sees no INIT).
    pub(super) negotiated: AtomicBool,
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

/// How an open inode is served.
enum Kept {
    Cached,
    /// The id and its number (fuser does not say it).
    Backing(BackingId, u32),
    /// A predecessor's backing id, not used by this process yet.
    Inherited(u32),
}

/// The mode an open inode is in, and how many opens hold it.
struct Open {
    kept: Kept,
    count: u64,
    /// Opened by a predecessor: kept until the connection ends.
    inherited: bool,
    /// Keeps the backing file's object from eviction while the kernel
    /// holds it (unlinking it would free nothing).
    _hold: Option<Hold>,
}

impl Open {
    fn mode(&self) -> Mode {
        match &self.kept {
            Kept::Cached => Mode::Cached,
            Kept::Backing(_, raw) => Mode::Backing(*raw),
            Kept::Inherited(id) => Mode::Backing(*id),
        }
    }
}

/// The open-inode table and the journal that mirrors it, under one lock so
/// the journal's order is the table's.
struct Table {
    open: HashMap<u64, Open>,
    journal: Option<Journal>,
}

pub(super) struct Passthrough {
    layer: Arc<Layer>,
    runtime: tokio::runtime::Handle,
    /// Set by `init` once the kernel agreed to passthrough.
    enabled: bool,
    table: Mutex<Table>,
    counters: Arc<Counters>,
    /// The connection's /dev/fuse fd, to register backing files on; set
    /// before the first request is read.
    conn: Arc<OnceLock<OwnedFd>>,
}

/// Immutable content: the page cache stays valid across opens.
const CACHED: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

impl Passthrough {
    pub(super) fn new(
        layer: Arc<Layer>,
        runtime: tokio::runtime::Handle,
        counters: Arc<Counters>,
        conn: Arc<OnceLock<OwnedFd>>,
        journal: Option<Journal>,
    ) -> Passthrough {
        Passthrough {
            layer,
            runtime,
            enabled: false,
            table: Mutex::new(Table {
                open: HashMap::new(),
                journal,
            }),
            counters,
            conn,
        }
    }

    pub(super) fn enable(&mut self) {
        self.enabled = true;
        self.counters.negotiated.store(true, Ordering::Relaxed);
    }

    /// Takes over a predecessor's open inodes (from its journal).
    pub(super) fn inherit(&mut self, open: HashMap<u64, Mode>) {
        let table = self.table.get_mut().unwrap_or_else(|p| p.into_inner());
        for (ino, mode) in open {
            let (kept, hold) = match mode {
                Mode::Cached => (Kept::Cached, None),
                // The kernel still reads the predecessor's backing file.
                Mode::Backing(id) => (Kept::Inherited(id), hold(&self.layer, ino)),
            };
            table.open.insert(
                ino,
                Open {
                    kept,
                    count: 0,
                    inherited: true,
                    _hold: hold,
                },
            );
        }
    }

    /// Answers an open of regular file `ino`: through a backing file when
    /// the inode already has one or can get one now, the normal way else.
    pub(super) fn open(&self, ino: u64, inode: &Inode, reply: ReplyOpen) {
        if inode.kind() != FileKind::Reg {
            return reply.opened(FileHandle(0), CACHED);
        }
        let mut table = self.table.lock().expect("open-inode table poisoned");
        if let Some(o) = table.open.get_mut(&ino) {
            o.count += 1;
            if let Kept::Inherited(raw) = o.kept {
                // SAFETY: `raw` is a backing id registered on this very
                // connection by a predecessor and never closed (its
                // journal says so); from now on this BackingId owns it.
                o.kept = Kept::Backing(unsafe { reply.wrap_backing(raw) }, raw);
            }
            return match &o.kept {
                Kept::Backing(id, _) => {
                    self.counters.opens.fetch_add(1, Ordering::Relaxed);
                    reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), id)
                }
                Kept::Cached | Kept::Inherited(_) => reply.opened(FileHandle(0), CACHED),
            };
        }
        if !self.enabled {
            return reply.opened(FileHandle(0), CACHED);
        }
        let mut hold = None;
        let backing = self.backing_file(ino, inode).and_then(|(file, held)| {
            let conn = self.conn.get()?;
            let id = BackingId::create_raw(conn, &file)
                .inspect_err(|e| {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(ino, error = %e, "kernel refused a passthrough backing file");
                })
                .ok();
            hold = id.as_ref().map(|_| held);
            id
            // `file` closes here: the kernel holds its own reference.
        });
        let kept = match backing {
            Some(raw) => {
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                // Its reads will not come here: the opening is taken as the
                // use of what hints fetched of it.
                self.layer.opened_whole(inode);
                // SAFETY: `raw` was just registered on this connection and
                // nothing else owns it.
                let id = unsafe { reply.wrap_backing(raw) };
                reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id);
                Kept::Backing(id, raw)
            }
            None => {
                reply.opened(FileHandle(0), CACHED);
                Kept::Cached
            }
        };
        let open = Open {
            kept,
            count: 1,
            inherited: false,
            _hold: hold,
        };
        let Table {
            open: table_open,
            journal,
        } = &mut *table;
        if let Some(j) = journal {
            j.opened(ino, open.mode());
        }
        table_open.insert(ino, open);
    }

    /// Notes a release of `ino`; the last one drops the backing id (which
    /// closes it in the kernel) and, for a file read the normal way, starts
    /// assembly if its chunks are all cached by now.
    pub(super) fn release(&self, ino: u64, inode: &Inode) {
        let last = {
            let mut table = self.table.lock().expect("open-inode table poisoned");
            let Table { open, journal } = &mut *table;
            let last = match open.get_mut(&ino) {
                Some(o) if o.count > 1 || o.inherited => {
                    o.count = o.count.saturating_sub(1);
                    None
                }
                Some(_) => open.remove(&ino),
                None => None,
            };
            if let (Some(_), Some(j)) = (&last, journal.as_mut()) {
                j.released(ino);
                j.compact_if_long(open.iter().map(|(i, o)| (*i, o.mode())));
            }
            last
        };
        if let Some(o) = last
            && matches!(o.kept, Kept::Cached)
        {
            self.prepare(ino, inode);
        }
    }

    /// A standalone, verified cache file holding exactly this file's
    /// content, opened read-only; otherwise starts whatever background work
    /// (verification, assembly) lets a later open pass through.
    fn backing_file(&self, ino: u64, inode: &Inode) -> Option<(File, Hold)> {
        let file = whole_file(&self.layer, ino, inode)?;
        // Held before it is opened: an eviction between would leave the
        // open to fail (served the normal way), never a wrong file.
        let hold = self.layer.cache().hold(&file.key());
        let Some(path) = self.layer.cache().whole_file(&file) else {
            self.start(&file);
            return None;
        };
        File::open(&path)
            .inspect_err(
                |e| tracing::debug!(path = %path.display(), error = %e, "cannot open cache file"),
            )
            .ok()
            .map(|f| (f, hold))
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

/// Keeps `ino`'s whole-file object from eviction.
fn hold(layer: &Layer, ino: u64) -> Option<Hold> {
    let inode = layer.inode(ino).ok()?;
    let file = whole_file(layer, ino, &inode)?;
    Some(layer.cache().hold(&file.key()))
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
