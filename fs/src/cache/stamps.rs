//! The saved access stamps: what keeps the eviction order across restarts.
//!
//! `ROOT/stamps` is a 4-byte magic `TRNS` followed by 36-byte records: a
//! digest (32 bytes) and its stamp (u32 little endian, seconds since the
//! Unix epoch; 0: released). It is written whole under a temp name and
//! renamed into place; a missing, short or foreign file loads as no stamps
//! (entries then count as old, which costs eviction order, never bytes).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::Digest;

pub(super) const FILE: &str = "stamps";
const MAGIC: &[u8; 4] = b"TRNS";
const RECORD: usize = 36;

/// The stamps saved at `path`, or none if it cannot be read.
pub(super) fn load(path: &Path) -> Vec<(Digest, u32)> {
    let Ok(bytes) = fs::read(path) else {
        return Vec::new();
    };
    let Some(body) = bytes.strip_prefix(MAGIC) else {
        tracing::warn!(path = %path.display(), "cache stamps file is not ours; ignoring it");
        return Vec::new();
    };
    body.chunks_exact(RECORD)
        .filter_map(|r| {
            let digest = Digest(r[..32].try_into().ok()?);
            let stamp = u32::from_le_bytes(r[32..].try_into().ok()?);
            Some((digest, stamp))
        })
        .collect()
}

/// Writes `stamps` to `path` (through a temp file and a rename).
pub(super) fn save(path: &Path, stamps: &[(Digest, u32)]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = io::BufWriter::new(fs::File::create(&tmp)?);
    out.write_all(MAGIC)?;
    for (digest, stamp) in stamps {
        out.write_all(&digest.0)?;
        out.write_all(&stamp.to_le_bytes())?;
    }
    out.into_inner().map_err(io::IntoInnerError::into_error)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_a_torn_or_foreign_file_loads_what_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(load(&path).is_empty());
        let stamps = vec![(Digest::of(b"a"), 0), (Digest::of(b"b"), 1_800_000_000)];
        save(&path, &stamps).unwrap();
        assert_eq!(load(&path), stamps);

        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(load(&path), stamps[..1]);

        fs::write(&path, b"something else entirely").unwrap();
        assert!(load(&path).is_empty());
    }
}
