//! The eStargz writer: a tar stream in, an eStargz blob out.
//!
//! Layout (DESIGN.md section 3): a gzip member starts at the blob start, at
//! each regular file's payload, at each chunk of a large file, at the TOC and
//! at the footer. Tar headers go into whatever member is open, so the member
//! of a file's last chunk also holds the tar padding and the headers of the
//! entries that follow it. Input headers are copied byte for byte, so the
//! blob's decompressed stream is the input tar with the landmark entry added
//! and the TOC entry appended, and `tar xzf` extracts the same files.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use base64::Engine as _;
use flate2::Compression;
use flate2::write::GzEncoder;

use super::error::WriteError;
use super::tarin::{BLOCK, Kind, Meta, TarIn, read_full};
use crate::Digest;
use crate::digest::Hasher;
use crate::format::estargz::build::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
// The writer cleans names as the reader does.
use crate::format::estargz::footer::footer_bytes;
use crate::format::estargz::names::clean_path as normalize;
use crate::format::estargz::rfc3339;
use crate::format::estargz::toc::{TOC_TAR_NAME, Toc, TocEntry};
use crate::num::usize_from;

/// The landmark files' one byte, as other eStargz writers put it.
const LANDMARK_CONTENT: u8 = 0x0f;

/// How to write a blob.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Largest uncompressed chunk of a regular file (default 4 MiB).
    pub chunk_size: u64,
    /// gzip level 0-9 (default 6: level 9 costs about twice the time for a
    /// few percent).
    pub level: u32,
    /// Paths whose entries go first, followed by `.prefetch.landmark`.
    /// Empty: no reordering and a `.no.prefetch.landmark` at the start.
    /// Reordering needs the whole input in memory.
    pub prioritized: Vec<String>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_size: 4 << 20,
            level: 6,
            prioritized: Vec::new(),
        }
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResult {
    /// sha256 of the TOC JSON: the `containerd.io/snapshot/stargz/toc.digest`
    /// annotation.
    pub toc_digest: Digest,
    /// sha256 of the blob decompressed: the layer's diff ID.
    pub diff_id: Digest,
    pub blob_digest: Digest,
    pub blob_size: u64,
    /// Size of the decompressed blob (the `uncompressed-size` annotation).
    pub uncompressed_size: u64,
    /// Prioritized paths that the input does not hold.
    pub missing_prioritized: Vec<String>,
}

/// Converts the tar stream `input` into an eStargz blob written to `output`.
/// With prioritized files the input is held in memory (it is read three
/// times); [`write_estargz_reopen`] reads a file again instead.
pub fn write_estargz<R: Read, W: Write>(
    mut input: R,
    output: W,
    opts: &WriteOptions,
) -> Result<WriteResult, WriteError> {
    check(opts)?;
    if opts.prioritized.is_empty() {
        return write_in_order(input, output, opts);
    }
    let mut tar = Vec::new();
    input.read_to_end(&mut tar)?;
    write_estargz_reopen(|| Ok(&tar[..]), output, opts)
}

/// Converts the tar stream that `open` yields (each call from the start,
/// the same bytes: a file, decompressed again) into an eStargz blob
/// written to `output`. Without prioritized files the input is read once;
/// with them three times (names; the prioritized entries' data, the only
/// data held in memory; the rest, streamed).
pub fn write_estargz_reopen<R: Read, W: Write>(
    mut open: impl FnMut() -> io::Result<R>,
    output: W,
    opts: &WriteOptions,
) -> Result<WriteResult, WriteError> {
    check(opts)?;
    if opts.prioritized.is_empty() {
        return write_in_order(open()?, output, opts);
    }
    // Pass 1: every entry's header, to know what goes first.
    let mut metas = Vec::new();
    each_entry(open()?, |meta, data| {
        io::copy(data, &mut io::sink())?;
        metas.push(meta);
        Ok(())
    })?;
    let mut missing = Vec::new();
    let order = priority_order(&metas, &opts.prioritized, &mut missing);
    drop(metas);
    let mut first: HashMap<usize, Option<(Meta, Vec<u8>)>> =
        order.iter().map(|&i| (i, None)).collect();
    // Pass 2: the data of those entries.
    let mut i = 0;
    each_entry(open()?, |meta, data| {
        if let Some(slot) = first.get_mut(&i) {
            let mut bytes = Vec::new();
            data.read_to_end(&mut bytes)?;
            *slot = Some((meta, bytes));
        } else {
            io::copy(data, &mut io::sink())?;
        }
        i += 1;
        Ok(())
    })?;
    let mut w = BlobWriter::new(output, opts);
    for k in &order {
        let Some(Some((meta, bytes))) = first.remove(k) else {
            return Err(WriteError::Io(io::Error::other(
                "the input changed between two reads",
            )));
        };
        w.entry(&meta, &mut &bytes[..])?;
    }
    w.landmark(PREFETCH_LANDMARK)?;
    // Pass 3: everything else, streamed.
    let placed: std::collections::HashSet<usize> = order.into_iter().collect();
    let mut i = 0;
    each_entry(open()?, |meta, mut data| {
        if placed.contains(&i) {
            io::copy(data, &mut io::sink())?;
        } else {
            w.entry(&meta, &mut data)?;
        }
        i += 1;
        Ok(())
    })?;
    let mut result = w.finish()?;
    result.missing_prioritized = missing;
    Ok(result)
}

fn check(opts: &WriteOptions) -> Result<(), WriteError> {
    if opts.chunk_size == 0 || opts.level > 9 {
        return Err(WriteError::Options(format!(
            "chunk size {} (must be > 0), level {} (must be 0-9)",
            opts.chunk_size, opts.level
        )));
    }
    Ok(())
}

/// The input as it comes, after a `.no.prefetch.landmark`.
fn write_in_order<R: Read, W: Write>(
    input: R,
    output: W,
    opts: &WriteOptions,
) -> Result<WriteResult, WriteError> {
    let mut w = BlobWriter::new(output, opts);
    w.landmark(NO_PREFETCH_LANDMARK)?;
    each_entry(input, |meta, mut data| w.entry(&meta, &mut data))?;
    w.finish()
}

/// Calls `f` with each entry of the tar `input` but the input's own
/// landmarks, and a reader of its data and padding (which `f` must read to
/// its end or drain).
fn each_entry<R: Read>(
    input: R,
    mut f: impl FnMut(Meta, &mut dyn Read) -> Result<(), WriteError>,
) -> Result<(), WriteError> {
    let mut tar = TarIn::new(io::BufReader::with_capacity(1 << 20, input));
    while let Some(meta) = tar.next_meta()? {
        let mut data = tar.reader().take(meta.padded_size());
        if is_landmark(&meta) {
            io::copy(&mut data, &mut io::sink())?;
        } else {
            f(meta, &mut data)?;
        }
    }
    Ok(())
}

/// A landmark of the input (a blob converted again, as `tarn optimize`
/// does to an eStargz image): not content; the output gets its own.
fn is_landmark(m: &Meta) -> bool {
    normalize(&String::from_utf8_lossy(&m.path))
        .is_ok_and(|n| n == PREFETCH_LANDMARK || n == NO_PREFETCH_LANDMARK)
}

/// Indices of the entries to put first: each prioritized path after its
/// parent directories (and, for a hardlink, its target), in list order.
fn priority_order(
    entries: &[Meta],
    prioritized: &[String],
    missing: &mut Vec<String>,
) -> Vec<usize> {
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, m) in entries.iter().enumerate() {
        if let Ok(n) = normalize(&String::from_utf8_lossy(&m.path)) {
            by_name.entry(n).or_default().push(i);
        }
    }
    let mut order = Vec::new();
    let mut moved = vec![false; entries.len()];
    for p in prioritized {
        let Ok(name) = normalize(p) else {
            missing.push(p.clone());
            continue;
        };
        if name.is_empty() || !by_name.contains_key(&name) {
            missing.push(p.clone());
            continue;
        }
        move_rec(&name, entries, &by_name, &mut moved, &mut order, 0);
    }
    order
}

fn move_rec(
    name: &str,
    entries: &[Meta],
    by_name: &HashMap<String, Vec<usize>>,
    moved: &mut [bool],
    order: &mut Vec<usize>,
    depth: usize,
) {
    // Hardlink chains are short; the bound only stops a cycle.
    if depth > 64 {
        return;
    }
    if !name.is_empty() {
        let parent = name.rfind('/').map_or("", |i| &name[..i]);
        move_rec(parent, entries, by_name, moved, order, depth + 1);
    }
    for &i in by_name.get(name).map(Vec::as_slice).unwrap_or_default() {
        if moved[i] {
            continue;
        }
        let m = &entries[i];
        if m.kind == Kind::Hardlink
            && let Ok(target) = normalize(&String::from_utf8_lossy(&m.link))
        {
            move_rec(&target, entries, by_name, moved, order, depth + 1);
        }
        moved[i] = true;
        order.push(i);
    }
}

/// Counts and hashes what reaches the output.
struct Counter<W> {
    w: W,
    n: u64,
    hash: Hasher,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.w.write(buf)?;
        self.n += k as u64;
        self.hash.update(&buf[..k]);
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

enum Sink<W: Write> {
    Member(Box<GzEncoder<Counter<W>>>),
    Between(Counter<W>),
}

struct BlobWriter<W: Write> {
    /// Always Some except while switching members.
    sink: Option<Sink<W>>,
    level: Compression,
    chunk_size: u64,
    diff: Hasher,
    uncompressed: u64,
    toc: Toc<'static>,
}

impl<W: Write> BlobWriter<W> {
    fn new(w: W, opts: &WriteOptions) -> BlobWriter<W> {
        BlobWriter {
            sink: Some(Sink::Between(Counter {
                w,
                n: 0,
                hash: Hasher::default(),
            })),
            level: Compression::new(opts.level),
            chunk_size: opts.chunk_size,
            diff: Hasher::default(),
            uncompressed: 0,
            toc: Toc {
                version: 1,
                entries: Vec::new(),
            },
        }
    }

    fn take_sink(&mut self) -> Sink<W> {
        self.sink
            .take()
            .expect("the sink is put back after every switch")
    }

    /// Ends the open member, if any. Returns the blob offset after it.
    fn close_member(&mut self) -> io::Result<u64> {
        let out = match self.take_sink() {
            Sink::Member(gz) => gz.finish()?,
            Sink::Between(out) => out,
        };
        let n = out.n;
        self.sink = Some(Sink::Between(out));
        Ok(n)
    }

    /// Writes uncompressed tar bytes into the open member, opening one if
    /// none is.
    fn write_tar(&mut self, data: &[u8]) -> io::Result<()> {
        let mut gz = match self.take_sink() {
            Sink::Member(gz) => gz,
            Sink::Between(out) => Box::new(GzEncoder::new(out, self.level)),
        };
        let r = gz.write_all(data);
        self.sink = Some(Sink::Member(gz));
        r?;
        self.diff.update(data);
        self.uncompressed += data.len() as u64;
        Ok(())
    }

    /// Copies one entry: `payload` yields its data and tar padding.
    fn entry(&mut self, m: &Meta, payload: &mut impl Read) -> Result<(), WriteError> {
        let name = String::from_utf8_lossy(&m.path).into_owned();
        if normalize(&name).is_ok_and(|n| n == TOC_TAR_NAME) {
            // A blob converted twice: the old TOC is not content.
            io::copy(payload, &mut io::sink())?;
            return Ok(());
        }
        self.write_tar(&m.raw)?;
        let mut ent = TocEntry {
            name: name.into(),
            kind: m.kind.toc_type().into(),
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            user_name: String::from_utf8_lossy(&m.uname).into_owned().into(),
            group_name: String::from_utf8_lossy(&m.gname).into_owned().into(),
            mod_time: if m.mtime == 0 {
                "".into()
            } else {
                rfc3339::format(m.mtime).into()
            },
            xattrs: m
                .xattrs
                .iter()
                .map(|(k, v)| {
                    let v = base64::engine::general_purpose::STANDARD.encode(v);
                    (String::from_utf8_lossy(k).into_owned(), v)
                })
                .collect(),
            ..TocEntry::default()
        };
        match m.kind {
            Kind::Hardlink | Kind::Symlink => {
                ent.link_name = String::from_utf8_lossy(&m.link).into_owned().into();
            }
            Kind::Char | Kind::Block => (ent.dev_major, ent.dev_minor) = m.dev,
            _ => {}
        }
        if m.kind != Kind::Reg {
            self.copy(payload, m.size, None)?;
            self.padding(payload, m.padded_size() - m.size)?;
            self.toc.entries.push(ent);
            return Ok(());
        }
        ent.size = m.size;
        let first = self.toc.entries.len();
        let mut whole = Hasher::default();
        let mut written = 0;
        let mut ent = Some(ent);
        while written < m.size {
            let mut e = ent.take().unwrap_or_else(|| TocEntry {
                name: self.toc.entries[first].name.clone(),
                kind: "chunk".into(),
                ..TocEntry::default()
            });
            let remain = m.size - written;
            let size = remain.min(self.chunk_size);
            if size == self.chunk_size {
                e.chunk_size = size;
            }
            e.offset = self.close_member()?;
            e.chunk_offset = written;
            let mut chunk = Hasher::default();
            self.copy(payload, size, Some((&mut chunk, &mut whole)))?;
            e.chunk_digest = chunk.finish().to_string().into();
            self.toc.entries.push(e);
            written += size;
        }
        if let Some(e) = ent {
            self.toc.entries.push(e); // an empty file: no payload member
        }
        self.toc.entries[first].digest = whole.finish().to_string().into();
        // The padding goes into the last chunk's member.
        self.padding(payload, m.padded_size() - m.size)?;
        Ok(())
    }

    /// Copies an entry's tar padding, writing zeros for what the input
    /// lacks: a tar that ends right after its last entry's data (umoci
    /// writes layers so) still gives a well-formed output. Only the end of
    /// the input can be short: a padding cut short is followed by nothing.
    fn padding(&mut self, r: &mut impl Read, n: u64) -> Result<(), WriteError> {
        let mut buf = [0u8; usize_from(BLOCK)];
        let want = usize_from(n.min(BLOCK));
        // What the input has is copied as is (byte for byte, as headers
        // are); the buffer's zeros stand in for the rest.
        read_full(r, &mut buf[..want])?;
        self.write_tar(&buf[..want])?;
        Ok(())
    }

    fn copy(
        &mut self,
        r: &mut impl Read,
        mut n: u64,
        mut hashers: Option<(&mut Hasher, &mut Hasher)>,
    ) -> Result<(), WriteError> {
        let mut buf = vec![0u8; n.min(256 << 10) as usize];
        while n > 0 {
            let want = usize_from(n.min(buf.len() as u64));
            let got = read_full(r, &mut buf[..want])?;
            if got < want {
                return Err(WriteError::InvalidTar(
                    "archive ends inside an entry's data".into(),
                ));
            }
            if let Some((a, b)) = hashers.as_mut() {
                a.update(&buf[..got]);
                b.update(&buf[..got]);
            }
            self.write_tar(&buf[..got])?;
            n -= got as u64;
        }
        Ok(())
    }

    /// A landmark file: one byte, in its own member like any payload.
    fn landmark(&mut self, name: &str) -> Result<(), WriteError> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let meta = Meta {
            raw: h.as_bytes().to_vec(),
            kind: Kind::Reg,
            path: name.as_bytes().to_vec(),
            link: Vec::new(),
            size: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            uname: Vec::new(),
            gname: Vec::new(),
            mtime: 0,
            dev: (0, 0),
            xattrs: Vec::new(),
        };
        let mut data = [0u8; usize_from(BLOCK)];
        data[0] = LANDMARK_CONTENT;
        self.entry(&meta, &mut &data[..])
    }

    fn finish(mut self) -> Result<WriteResult, WriteError> {
        let toc_offset = self.close_member()?;
        let json = serde_json::to_vec(&self.toc)
            .map_err(|e| io::Error::other(format!("encoding TOC JSON: {e}")))?;
        let toc_digest = Digest::of(&json);
        let mut h = tar::Header::new_ustar();
        h.set_path(TOC_TAR_NAME)?;
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        self.write_tar(h.as_bytes())?;
        self.write_tar(&json)?;
        let pad = (json.len() as u64).div_ceil(BLOCK) * BLOCK - json.len() as u64;
        // Padding, then the two zero blocks that end the archive.
        self.write_tar(&vec![0u8; usize_from(pad + 2 * BLOCK)])?;
        self.close_member()?;
        let Some(Sink::Between(mut out)) = self.sink.take() else {
            unreachable!("close_member leaves the sink between members");
        };
        out.write_all(&footer_bytes(toc_offset))?;
        out.flush()?;
        Ok(WriteResult {
            toc_digest,
            diff_id: self.diff.finish(),
            blob_digest: out.hash.finish(),
            blob_size: out.n,
            uncompressed_size: self.uncompressed,
            missing_prioritized: Vec::new(),
        })
    }
}
