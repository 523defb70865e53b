//! TEMPORARY stand-ins for the `BlobSource` trait (registry/) and `Cache`
//! (cache/) contracts, so fetch/, layer/ and fuse/ compile before those
//! modules land. Deleted when the real ones are merged.

use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::Digest;
use crate::fetch::Intent;

/// Why a ranged read of a blob failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Other(String),
}

/// A blob that can be read by ranges.
pub trait BlobSource: Send + Sync {
    fn size(&self) -> u64;
    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>>;
}

/// Why the cache failed.
#[derive(Debug, thiserror::Error)]
#[error("cache: {0}")]
pub struct CacheError(#[from] std::io::Error);

/// A file per digest, written to a temp name and renamed.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        std::fs::create_dir_all(dir)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn file_path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.file_path(d).exists()
    }

    pub fn read(&self, d: &Digest, offset: u64, len: usize) -> Result<Option<Vec<u8>>, CacheError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(self.file_path(d)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        f.take(len as u64).read_to_end(&mut buf)?;
        Ok(Some(buf))
    }

    pub fn insert(&self, d: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let tmp = self
            .dir
            .join(format!("{}.tmp{}", d.hex(), std::process::id()));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, self.file_path(d))?;
        Ok(())
    }
}
