//! Location keys: entries named by where their bytes come from (an
//! overlaybd block: blob digest and block number), not by their content,
//! which is unknown before the fetch. A location key is a sha256 whose last
//! 8 bytes are [`MARK`]; a content digest ends so with chance 2^-64, and
//! would then only be dropped at its first read after a restart, never
//! served wrong.
//!
//! The cache's restart check needs the content: every location-keyed
//! insert appends the key and the sha256 of its bytes to `ROOT/locations`
//! (64-byte records, before the bytes are stored), and an entry found at
//! open is checked against that digest on its first read. A key with no
//! record (a crash between the two writes, a torn tail) is dropped there,
//! as a corrupt content-keyed entry is. The file is rewritten at open with
//! only the records of entries still present.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use dashmap::DashMap;

use crate::Digest;

pub(super) const FILE: &str = "locations";
const MARK: [u8; 8] = *b"tarn@loc";
const RECORD: usize = 64;

/// The location key named by `name` (a domain string and the place).
pub fn location_key(name: &[u8]) -> Digest {
    let mut d = Digest::of(name);
    d.0[24..].copy_from_slice(&MARK);
    d
}

/// Whether `key` is a location key.
pub fn is_location(key: &Digest) -> bool {
    key.0[24..] == MARK
}

/// The content digests of location-keyed entries, and their journal.
pub(super) struct Locations {
    path: PathBuf,
    file: Mutex<Option<File>>,
    content: DashMap<Digest, Digest>,
}

impl Locations {
    /// Loads the journal at `path`, keeping the records whose key `keep`
    /// holds (the entries found at open), and rewrites it with only those.
    pub(super) fn open(path: &Path, keep: impl Fn(&Digest) -> bool) -> Locations {
        let mut kept: HashMap<Digest, Digest> = HashMap::new();
        if let Ok(bytes) = fs::read(path) {
            for r in bytes.chunks_exact(RECORD) {
                let (Ok(key), Ok(content)) = (r[..32].try_into(), r[32..].try_into()) else {
                    continue;
                };
                let key = Digest(key);
                if is_location(&key) && keep(&key) {
                    kept.insert(key, Digest(content));
                }
            }
        }
        if let Err(e) = rewrite(path, &kept) {
            tracing::warn!(path = %path.display(), error = %e, "cannot rewrite the cache's location journal");
        }
        let file = OpenOptions::new().append(true).create(true).open(path);
        let file = file
            .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "location-keyed entries will not survive a restart"))
            .ok();
        Locations {
            path: path.to_owned(),
            file: Mutex::new(file),
            content: kept.into_iter().collect(),
        }
    }

    /// Records that `key` holds bytes with sha256 `content`. A failed
    /// journal write costs only the entry's survival of a restart.
    pub(super) fn record(&self, key: &Digest, content: Digest) {
        let mut record = [0u8; RECORD];
        record[..32].copy_from_slice(&key.0);
        record[32..].copy_from_slice(&content.0);
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write_all(&record)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cache location journal write failed");
        }
        // Not kept in memory: an entry this process wrote is trusted as
        // written; only entries found at open are checked.
    }

    /// The sha256 of what `key` held at open, if recorded.
    pub(super) fn content(&self, key: &Digest) -> Option<Digest> {
        self.content.get(key).map(|c| *c)
    }

    pub(super) fn forget(&self, key: &Digest) {
        self.content.remove(key);
    }
}

/// Writes `records` to `path` through a temp file and a rename.
fn rewrite(path: &Path, records: &HashMap<Digest, Digest>) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = io::BufWriter::new(File::create(&tmp)?);
    for (key, content) in records {
        out.write_all(&key.0)?;
        out.write_all(&content.0)?;
    }
    out.into_inner().map_err(io::IntoInnerError::into_error)?;
    fs::rename(&tmp, path)
}
