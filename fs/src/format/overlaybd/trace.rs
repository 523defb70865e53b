//! overlaybd's trace prefetch: an image may carry, as an extra top layer
//! (the "acceleration layer", annotated `.../acceleration-layer: yes`),
//! a plain tar whose one file `trace` lists what a container read when
//! the image was recorded. Replayed when a container is prepared on the
//! image, it fetches those bytes ahead, in recorded order.
//!
//! The `trace` file is one of two things:
//!
//! - a recorded trace: a 24-byte header (u32 magic `0xC2EF1820` at 0,
//!   u64 `data_size` at 8, u32 CRC32C of the records at 16, little
//!   endian, the rest padding), then `data_size / 24` records of 24 bytes
//!   (`op` at 0, `R` for a read; u32 layer index at 4, counted from the
//!   bottom layer; u64 byte count at 8; u64 byte offset at 16, in the
//!   layer's LSMT file, i.e. after its ZFile is decompressed);
//! - otherwise a list of paths, one per line (at most 64 KiB): files of
//!   the image to fetch.
//!
//! The layer is hostile until its blob is verified (the caller checks its
//! sha256), and a verified trace may still lie: everything is bounded
//! here ([`MAX_TRACE_BLOB`], [`MAX_RECORDS`], [`MAX_RECORD_BYTES`],
//! [`MAX_LIST`]), and replay only fetches bytes of the image's own layers
//! (`disk/trace.rs`): a wrong trace costs bytes, never a wrong read.

use std::io::Read;

use super::ObdError;
use super::crc32c::crc32c;
use super::le::{le_u32, le_u64};

/// The recorded trace's magic (CRC32 of "Container Image Trace Format").
pub const MAGIC: u32 = 0xC2EF_1820;
const HEADER: usize = 24;
const RECORD: usize = 24;
/// The largest acceleration layer blob fetched.
pub const MAX_TRACE_BLOB: u64 = 32 << 20;
/// Records replayed at most (24 MiB of trace).
pub const MAX_RECORDS: usize = 1 << 20;
/// The most one record may ask for (the reference replays through a
/// 1 MiB buffer; a record past this is cut).
pub const MAX_RECORD_BYTES: u64 = 16 << 20;
/// The largest list of paths read (the reference's bound).
pub const MAX_LIST: usize = 64 << 10;
/// Paths taken from a list at most.
pub const MAX_PATHS: usize = 4096;
/// Tar entries looked at for `trace`.
const MAX_ENTRIES: usize = 64;

/// One recorded read of a layer's LSMT file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRead {
    /// The layer, counted from the bottom of the image.
    pub layer: u32,
    pub offset: u64,
    pub count: u64,
}

/// What an acceleration layer asks to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trace {
    /// Recorded reads, in order.
    Reads(Vec<TraceRead>),
    /// Absolute paths of files, in order.
    Files(Vec<String>),
}

impl Trace {
    /// The `trace` file of an acceleration layer's blob (a plain tar).
    pub fn from_layer(blob: &[u8]) -> Result<Trace, ObdError> {
        let bad = |why: String| ObdError::Unsupported(format!("acceleration layer: {why}"));
        if blob.len() as u64 > MAX_TRACE_BLOB {
            return Err(bad(format!(
                "{} bytes, more than {MAX_TRACE_BLOB}",
                blob.len()
            )));
        }
        let mut archive = tar::Archive::new(blob);
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("not a tar: {e}")))?;
        for entry in entries.take(MAX_ENTRIES) {
            let mut entry = entry.map_err(|e| bad(format!("tar entry: {e}")))?;
            let path = entry.path_bytes();
            let name = path.strip_prefix(b"./").unwrap_or(&path);
            if name != b"trace" || !entry.header().entry_type().is_file() {
                continue;
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| bad(format!("reading trace: {e}")))?;
            return Trace::parse(&bytes);
        }
        Err(bad("no file `trace` in it".into()))
    }

    /// A `trace` file's bytes: a recorded trace if it starts with the
    /// magic, else a list of paths.
    pub fn parse(bytes: &[u8]) -> Result<Trace, ObdError> {
        let bad = |why: String| ObdError::Unsupported(format!("trace: {why}"));
        if bytes.len() < 4 || le_u32(bytes, 0) != MAGIC {
            return Trace::list(bytes);
        }
        if bytes.len() < HEADER {
            return Err(bad("short header".into()));
        }
        let data_size = le_u64(bytes, 8);
        let records = &bytes[HEADER..];
        if data_size != records.len() as u64 || !records.len().is_multiple_of(RECORD) {
            return Err(bad(format!(
                "header says {data_size} bytes of records, the file holds {}",
                records.len()
            )));
        }
        if records.len() / RECORD > MAX_RECORDS {
            return Err(bad(format!(
                "{} records, more than {MAX_RECORDS}",
                records.len() / RECORD
            )));
        }
        let expected = le_u32(bytes, 16);
        let actual = crc32c(0, records);
        if actual != expected {
            return Err(ObdError::Crc {
                what: "trace records",
                expected,
                actual,
            });
        }
        let reads = records
            .chunks_exact(RECORD)
            .filter(|r| r[0] == b'R')
            .map(|r| TraceRead {
                layer: le_u32(r, 4),
                count: le_u64(r, 8).min(MAX_RECORD_BYTES),
                offset: le_u64(r, 16),
            })
            .filter(|r| r.count > 0)
            .collect();
        Ok(Trace::Reads(reads))
    }

    fn list(bytes: &[u8]) -> Result<Trace, ObdError> {
        if bytes.len() > MAX_LIST {
            return Err(ObdError::Unsupported(format!(
                "trace: a list of {} bytes, more than {MAX_LIST}",
                bytes.len()
            )));
        }
        let text = String::from_utf8_lossy(bytes);
        let paths = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('/'))
            .take(MAX_PATHS)
            .map(str::to_owned)
            .collect();
        Ok(Trace::Files(paths))
    }

    /// A recorded trace of `reads`, as the reference tools write it (for
    /// tests and for images made here).
    pub fn encode(reads: &[TraceRead]) -> Vec<u8> {
        let mut records = Vec::with_capacity(reads.len() * RECORD);
        for r in reads {
            let mut rec = [0u8; RECORD];
            rec[0] = b'R';
            rec[4..8].copy_from_slice(&r.layer.to_le_bytes());
            rec[8..16].copy_from_slice(&r.count.to_le_bytes());
            rec[16..24].copy_from_slice(&r.offset.to_le_bytes());
            records.extend_from_slice(&rec);
        }
        let mut out = vec![0u8; HEADER];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&(records.len() as u64).to_le_bytes());
        out[16..20].copy_from_slice(&crc32c(0, &records).to_le_bytes());
        out.extend_from_slice(&records);
        out
    }

    /// How many reads or files it names.
    pub fn len(&self) -> usize {
        match self {
            Trace::Reads(r) => r.len(),
            Trace::Files(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads() -> Vec<TraceRead> {
        vec![
            TraceRead {
                layer: 0,
                offset: 4096,
                count: 8192,
            },
            TraceRead {
                layer: 2,
                offset: 1 << 20,
                count: 512,
            },
        ]
    }

    fn tar_of(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o444);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn a_recorded_trace_reads_back_in_order() {
        let bytes = Trace::encode(&reads());
        assert_eq!(
            &bytes[..4],
            &[0x20, 0x18, 0xEF, 0xC2],
            "the magic as written"
        );
        assert_eq!(Trace::parse(&bytes).unwrap(), Trace::Reads(reads()));
        let layer = tar_of("trace", &bytes);
        assert_eq!(Trace::from_layer(&layer).unwrap(), Trace::Reads(reads()));
    }

    #[test]
    fn a_list_of_paths_is_a_trace_of_files() {
        let t = Trace::parse(b"/usr/bin/python3\n\nrelative\n /etc/hosts \n").unwrap();
        assert_eq!(
            t,
            Trace::Files(vec!["/usr/bin/python3".into(), "/etc/hosts".into()])
        );
        assert!(Trace::parse(&vec![b'/'; MAX_LIST + 1]).is_err(), "too long");
    }

    #[test]
    fn hostile_traces_are_refused() {
        let good = Trace::encode(&reads());
        let mut crc = good.clone();
        crc[HEADER + 9] ^= 1;
        assert!(matches!(Trace::parse(&crc), Err(ObdError::Crc { .. })));
        let mut size = good.clone();
        size[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(
            Trace::parse(&size).is_err(),
            "a size the file does not hold"
        );
        assert!(Trace::parse(&good[..30]).is_err(), "cut inside a record");
        assert!(Trace::parse(&good[..10]).is_err(), "cut inside the header");
        let mut huge = reads();
        huge[0].count = u64::MAX;
        let Trace::Reads(r) = Trace::parse(&Trace::encode(&huge)).unwrap() else {
            panic!("a trace");
        };
        assert_eq!(r[0].count, MAX_RECORD_BYTES, "a record is bounded");
        assert!(
            Trace::from_layer(&tar_of("other", &good)).is_err(),
            "no trace"
        );
        assert!(Trace::from_layer(b"not a tar at all").is_err());
    }
}
