//! A corpus of hostile eStargz layers, built by code: each [`Case`] is a
//! blob, the TOC digest its manifest vouches for (so every case passes the
//! annotation check and reaches the parser) and the exact [`Outcome`] tarn
//! must reach with it.
//!
//! Valid parts come from tarn's own writer where a case only needs a good
//! layer; malformed ones are assembled here from gzip members, a TOC member
//! (a gzip member holding a tar stream with `stargz.index.json`) and the
//! 51-byte footer, so any field can say anything. The largest cases (a
//! million TOC entries and more) are streamed to a file, never held as JSON
//! in memory.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::{Compress, Compression, Crc, FlushCompress};
use serde_json::{Value, json};
use sha2::Digest as _;
use tarn_fs::Digest;
use tarn_fs::format::estargz::{TOC_TAR_NAME, footer_bytes};

/// What tarn must do with a layer.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Opening fails with one line that names the layer's digest and
    /// contains each of these (the entry at fault, where there is one).
    Refused { message_contains: Vec<String> },
    /// The layer mounts; each `unreadable` path fails to read with EIO (on
    /// every attempt), each `intact` path reads as these bytes, and each
    /// `(path, xattr)` of `no_xattr` does not carry that xattr.
    Contained {
        unreadable: Vec<String>,
        intact: Vec<(String, Vec<u8>)>,
        no_xattr: Vec<(String, String)>,
    },
}

/// One hostile layer.
pub struct Case {
    /// Short, unique, usable as a repository name.
    pub name: String,
    /// Which of issue 13's classes it belongs to, for messages.
    pub class: &'static str,
    pub blob: Vec<u8>,
    /// What the manifest's TOC digest annotation says: the digest of the
    /// TOC JSON the blob really holds.
    pub toc_digest: Digest,
    pub outcome: Outcome,
}

fn refused(parts: &[&str]) -> Outcome {
    Outcome::Refused {
        message_contains: parts.iter().map(|s| s.to_string()).collect(),
    }
}

fn contained(unreadable: &[&str], intact: &[(&str, &[u8])]) -> Outcome {
    Outcome::Contained {
        unreadable: unreadable.iter().map(|s| s.to_string()).collect(),
        intact: intact
            .iter()
            .map(|(p, b)| (p.to_string(), b.to_vec()))
            .collect(),
        no_xattr: Vec::new(),
    }
}

/// The bytes of a well-behaved file every case carries next to its hostile
/// entry: it must stay readable whenever the layer mounts.
pub const GOOD_NAME: &str = "good.txt";
pub const GOOD_BYTES: &[u8] = b"the good file of a hostile layer\n";

/// Hex sha256 with its prefix, as TOC digests are written.
fn sha(data: &[u8]) -> String {
    Digest::of(data).to_string()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(data).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

/// A layer assembled member by member: payload members, then the TOC
/// member, then the footer.
pub struct Assembler {
    blob: Vec<u8>,
    entries: Vec<Value>,
}

impl Default for Assembler {
    fn default() -> Self {
        Self::new()
    }
}

impl Assembler {
    pub fn new() -> Assembler {
        Assembler {
            blob: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Appends raw bytes (a gzip member, or anything); returns their offset.
    pub fn member(&mut self, bytes: &[u8]) -> u64 {
        let off = self.blob.len() as u64;
        self.blob.extend_from_slice(bytes);
        off
    }

    /// Appends a TOC entry as given.
    pub fn entry(&mut self, e: Value) -> &mut Assembler {
        self.entries.push(e);
        self
    }

    /// A regular file in one chunk, honest in every field.
    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Assembler {
        let offset = self.member(&gzip(data));
        let mut e = json!({"name": name, "type": "reg", "mode": 0o644});
        if !data.is_empty() {
            e["size"] = json!(data.len());
            e["offset"] = json!(offset);
            e["digest"] = json!(sha(data));
            e["chunkDigest"] = json!(sha(data));
        }
        self.entry(e)
    }

    /// The good file every case carries.
    pub fn good(&mut self) -> &mut Assembler {
        self.file(GOOD_NAME, GOOD_BYTES)
    }

    /// The TOC JSON of the entries so far.
    pub fn toc_json(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({"version": 1, "entries": self.entries})).expect("json")
    }

    /// The blob with this TOC JSON, and the JSON's digest.
    pub fn finish_with(mut self, json: &[u8]) -> (Vec<u8>, Digest) {
        let toc_offset = self.blob.len() as u64;
        let toc = toc_member(json);
        self.blob.extend_from_slice(&toc);
        self.blob.extend_from_slice(&footer_bytes(toc_offset));
        (self.blob, Digest::of(json))
    }

    pub fn finish(self) -> (Vec<u8>, Digest) {
        let json = self.toc_json();
        self.finish_with(&json)
    }
}

/// The header of the TOC's tar entry for `len` bytes of JSON.
fn toc_tar_header(len: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(TOC_TAR_NAME).expect("short name");
    h.set_size(len);
    h.set_mode(0o444);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// Writes the TOC tar stream for JSON of `len` bytes produced by `body`.
fn write_toc_tar<W: Write>(
    out: &mut W,
    len: u64,
    body: impl FnOnce(&mut W) -> io::Result<()>,
) -> io::Result<()> {
    out.write_all(toc_tar_header(len).as_bytes())?;
    body(out)?;
    let pad = (512 - len % 512) % 512;
    out.write_all(&vec![0u8; usize::try_from(pad + 1024).expect("small")])
}

fn toc_member(json: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    write_toc_tar(&mut gz, json.len() as u64, |w| w.write_all(json)).expect("to memory");
    gz.finish().expect("to memory")
}

fn case(name: &str, class: &'static str, (blob, toc): (Vec<u8>, Digest), o: Outcome) -> Case {
    Case {
        name: name.to_string(),
        class,
        blob,
        toc_digest: toc,
        outcome: o,
    }
}

/// A layer with the good file and one entry `e` (whose payload, if any, the
/// entry points at itself).
fn with_entry(e: Value) -> (Vec<u8>, Digest) {
    let mut a = Assembler::new();
    a.good().entry(e);
    a.finish()
}

/// Components of class 1's name: deep enough to overflow a recursive walk
/// on a 2 MiB worker stack; its path (20 KB) is past PATH_MAX, so tarn
/// refuses it (the kernel could not look it up either).
pub const DEEP_COMPONENTS: usize = 10_000;

/// The deepest name tarn accepts: `d/` 2,000 times, just under PATH_MAX
/// (4096 bytes) with its file name.
pub const DEEPEST_ACCEPTED: usize = 2_000;

/// Class 1: one name of `components` components whose parent directories
/// are all implicit. Under PATH_MAX it mounts and reads back (the index is
/// built by iteration, the kernel walks it one component at a time); past
/// it the layer is refused, naming the entry.
pub fn deep_name(components: usize) -> Case {
    let mut name = "d/".repeat(components - 1);
    name.push_str("deep.txt");
    let mut a = Assembler::new();
    a.good().file(&name, b"at the bottom\n");
    let outcome = if name.len() < 4096 {
        contained(&[], &[(GOOD_NAME, GOOD_BYTES), (&name, b"at the bottom\n")])
    } else {
        refused(&["d/d/d/", "PATH_MAX"])
    };
    case(
        &format!("deep-{components}"),
        "1: a name with thousands of implicit parents",
        a.finish(),
        outcome,
    )
}

/// Class 2: a small file whose only chunk lies in the blob's tail (the
/// whole blob is smaller than the tail tarn fetches when opening) and fails
/// verification. Every read of it must be EIO, the second as cleanly as the
/// first (no panic in the code that splices chunks out of the kept tail).
pub fn tampered_tail_chunk() -> Case {
    let data = b"a small file whose chunk is in the tail\n".repeat(20);
    let mut a = Assembler::new();
    a.good();
    let mut member = gzip(&data);
    // Keep the gzip member well formed but make it decompress to other
    // bytes: recompress flipped data, keep the honest digest.
    let mut other = data.clone();
    other[7] ^= 0x20;
    member.clear();
    member.extend_from_slice(&gzip(&other));
    let offset = a.member(&member);
    a.entry(json!({"name": "victim.txt", "type": "reg", "mode": 0o644,
        "size": data.len(), "offset": offset,
        "digest": sha(&data), "chunkDigest": sha(&data)}));
    a.file("after.txt", b"a file after the victim\n");
    case(
        "tail-tamper",
        "2: a tail chunk that fails verification, read again",
        a.finish(),
        contained(
            &["victim.txt"],
            &[
                (GOOD_NAME, GOOD_BYTES),
                ("after.txt", b"a file after the victim\n"),
            ],
        ),
    )
}

/// A gzip member of `total` zero bytes, built from one compressed MiB
/// repeated (each piece ends on a sync flush, so pieces concatenate into
/// one valid deflate stream: every back reference sees zeros either way).
fn zero_bomb(total: u64) -> Vec<u8> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; 1 << 20];
    let mut c = Compress::new(Compression::best(), false);
    let mut piece = Vec::with_capacity(64 << 10);
    c.compress_vec(&zeros, &mut piece, FlushCompress::Sync)
        .expect("deflate");
    assert_eq!(c.total_in(), PIECE, "one call compresses the MiB");
    let mut crc = Crc::new();
    let mut out = vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..total / PIECE {
        out.extend_from_slice(&piece);
        crc.update(&zeros);
    }
    // A final empty stored block, then the trailer.
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(crc.amount()).to_le_bytes());
    out
}

/// Class 3: one chunk declared 4 KiB whose gzip member (about 1.3 MB)
/// decompresses to 1.25 GiB of zeros, with a digest that matches nothing.
pub fn gzip_bomb() -> Case {
    let mut a = Assembler::new();
    a.good();
    let offset = a.member(&zero_bomb(1280 << 20));
    let declared = vec![0u8; 4096];
    let wrong = sha(b"not the bytes of the bomb");
    a.entry(json!({"name": "bomb.bin", "type": "reg", "mode": 0o644,
        "size": declared.len(), "offset": offset, "digest": wrong, "chunkDigest": wrong}));
    a.file("after.txt", b"after the bomb\n");
    case(
        "gzip-bomb",
        "3: a chunk that decompresses to 1.25 GiB",
        a.finish(),
        contained(
            &["bomb.bin"],
            &[(GOOD_NAME, GOOD_BYTES), ("after.txt", b"after the bomb\n")],
        ),
    )
}

/// Class 3 again, declared honestly big: the chunk claims the 1.25 GiB it
/// decompresses to, with a wrong digest. Verifying it must stream in
/// bounded memory (or the declared size be capped): EIO, never 1.25 GiB
/// held at once.
pub fn gzip_bomb_declared() -> Case {
    let total: u64 = 1280 << 20;
    let mut a = Assembler::new();
    a.good();
    let offset = a.member(&zero_bomb(total));
    let wrong = sha(b"not the bytes of the bomb");
    a.entry(json!({"name": "big-bomb.bin", "type": "reg", "mode": 0o644,
        "size": total, "offset": offset, "digest": wrong, "chunkDigest": wrong}));
    a.file("after.txt", b"after the bomb\n");
    case(
        "gzip-bomb-declared",
        "3: a chunk that declares and decompresses to 1.25 GiB",
        a.finish(),
        contained(
            &["big-bomb.bin"],
            &[(GOOD_NAME, GOOD_BYTES), ("after.txt", b"after the bomb\n")],
        ),
    )
}

/// Counts bytes and hashes them: the first pass over streamed JSON.
struct Measure {
    len: u64,
    sha: sha2::Sha256,
}

impl Write for Measure {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.len += b.len() as u64;
        self.sha.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The TOC JSON of `n` empty files, 1000 to a directory, plus the good file
/// (whose payload starts the blob, at offset 0).
fn write_many_entries<W: Write>(w: &mut W, n: u64) -> io::Result<()> {
    write!(
        w,
        r#"{{"version":1,"entries":[{{"name":"{GOOD_NAME}","type":"reg","mode":420,"size":{},"digest":"{}","chunkDigest":"{}"}}"#,
        GOOD_BYTES.len(),
        sha(GOOD_BYTES),
        sha(GOOD_BYTES)
    )?;
    // With the good file, `n` entries in all.
    for i in 1..n {
        write!(
            w,
            r#",{{"name":"d{}/f{i}","type":"reg","mode":420}}"#,
            i / 1000
        )?;
    }
    w.write_all(b"]}")
}

/// Class 4: a TOC of `n` entries, streamed twice (once to measure and hash
/// the JSON, once through gzip into `dir`), never held in memory. Returns
/// the blob's path and its TOC digest.
pub fn many_entries_to_file(n: u64, dir: &Path) -> io::Result<(PathBuf, Digest)> {
    let mut m = Measure {
        len: 0,
        sha: sha2::Sha256::new(),
    };
    write_many_entries(&mut io::BufWriter::new(&mut m), n)?;
    let toc = Digest(m.sha.finalize().into());
    let path = dir.join(format!("toc-{n}.blob"));
    let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
    let good = gzip(GOOD_BYTES);
    file.write_all(&good)?;
    let mut gz = GzEncoder::new(file, Compression::fast());
    {
        let mut w = io::BufWriter::with_capacity(1 << 20, &mut gz);
        write_toc_tar(&mut w, m.len, |w| write_many_entries(w, n))?;
        w.flush()?;
    }
    let mut file = gz.finish()?;
    file.write_all(&footer_bytes(good.len() as u64))?;
    file.flush()?;
    Ok((path, toc))
}

/// Class 4's expected outcomes: 150,000 entries mount within the bounds;
/// a million and four million are refused (their index would not fit the
/// default per-layer memory bound of 256 MB), naming the layer and the
/// bound's config key.
pub fn many_entries_outcome(n: u64) -> Outcome {
    if n <= 150_000 {
        contained(&[], &[(GOOD_NAME, GOOD_BYTES), ("d0/f1", b"")])
    } else {
        refused(&["max_index_mb"])
    }
}

/// Oversized TOC: JSON longer than tarn's TOC limit (padded with
/// whitespace, valid JSON all the same), streamed into `dir`.
pub fn oversized_toc_to_file(json_len: u64, dir: &Path) -> io::Result<(PathBuf, Digest)> {
    let head = br#"{"version":1,"entries":[]}"#;
    let pad = json_len - head.len() as u64;
    let spaces = vec![b' '; 1 << 20];
    let body = |w: &mut dyn Write| -> io::Result<()> {
        w.write_all(head)?;
        let mut left = pad;
        while left > 0 {
            let n = left.min(spaces.len() as u64);
            w.write_all(&spaces[..usize::try_from(n).expect("at most 1 MiB")])?;
            left -= n;
        }
        Ok(())
    };
    let mut m = Measure {
        len: 0,
        sha: sha2::Sha256::new(),
    };
    body(&mut m)?;
    let toc = Digest(m.sha.finalize().into());
    let path = dir.join("oversized-toc.blob");
    let mut gz = GzEncoder::new(
        io::BufWriter::new(std::fs::File::create(&path)?),
        Compression::fast(),
    );
    write_toc_tar(&mut gz, json_len, |w| body(w))?;
    let mut file = gz.finish()?;
    file.write_all(&footer_bytes(0))?;
    file.flush()?;
    Ok((path, toc))
}

/// Every small case: the issue's classes 2, 5 and 6, and the classes that
/// already held (escapes, overflows, orphans, duplicates, footers, TOC
/// members, names, modes, owners, devices, times, base64).
pub fn small_cases() -> Vec<Case> {
    let mut v = vec![tampered_tail_chunk()];
    let long = "L".repeat(300);
    // Class 5: names that are not names.
    for (name, entry, must) in [
        ("wh-dot", ".wh..", ".wh.."),
        ("wh-dotdot", ".wh...", ".wh..."),
        ("nul-name", "nul\u{0}name", "nul"),
        ("long-component", &format!("dir/{long}") as &str, "LLLLLLLL"),
    ] {
        v.push(case(
            name,
            "5: names that are not names",
            with_entry(json!({"name": entry, "type": "reg", "mode": 0o644})),
            refused(&[must]),
        ));
    }
    // Class 6: overlay-private xattrs are dropped; the file stays.
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let mut a = Assembler::new();
    a.good();
    a.member(&[]);
    let data = b"steered\n";
    let off = a.member(&gzip(data));
    a.entry(
        json!({"name": "steer.txt", "type": "reg", "mode": 0o644, "size": data.len(),
        "offset": off, "digest": sha(data), "chunkDigest": sha(data),
        "xattrs": {
            "trusted.overlay.redirect": b64("/etc"),
            "trusted.overlay.origin": b64("\u{0}\u{fb}origin"),
            "trusted.overlay.metacopy": b64(""),
            "trusted.overlay.upper": b64("x"),
            "user.kept": b64("fine"),
        }}),
    );
    let mut o = contained(&[], &[(GOOD_NAME, GOOD_BYTES), ("steer.txt", data)]);
    if let Outcome::Contained { no_xattr, .. } = &mut o {
        for x in ["redirect", "origin", "metacopy", "upper"] {
            no_xattr.push(("steer.txt".into(), format!("trusted.overlay.{x}")));
        }
    }
    v.push(case("overlay-xattrs", "6: overlay xattrs", a.finish(), o));

    // Path escapes.
    let held = "held before: path escapes";
    v.push(case(
        "dotdot-name",
        held,
        with_entry(json!({"name": "../escape.txt", "type": "reg", "mode": 0o644})),
        refused(&["escape.txt"]),
    ));
    v.push(case(
        "dotdot-inside",
        held,
        with_entry(json!({"name": "a/../../escape2.txt", "type": "reg"})),
        refused(&["escape2.txt"]),
    ));
    v.push(case(
        "absolute-name",
        held,
        {
            let mut a = Assembler::new();
            a.good().file("/etc/abs.txt", b"inside the layer\n");
            a.finish()
        },
        contained(
            &[],
            &[
                (GOOD_NAME, GOOD_BYTES),
                ("etc/abs.txt", b"inside the layer\n"),
            ],
        ),
    ));
    v.push(case(
        "hardlink-escape",
        held,
        with_entry(
            json!({"name": "hardlink-out", "type": "hardlink", "linkName": "../../etc/passwd"}),
        ),
        refused(&["hardlink-out"]),
    ));
    v.push(case(
        "hardlink-absent",
        held,
        with_entry(json!({"name": "hardlink-abs", "type": "hardlink", "linkName": "/etc/passwd"})),
        refused(&["hardlink-abs"]),
    ));
    // A symlink's target is data: it is stored as written and resolved by
    // whoever follows it (the container's root), never by tarn.
    v.push(case(
        "symlink-escape",
        held,
        with_entry(json!({"name": "sl", "type": "symlink", "linkName": "../../../../etc/shadow"})),
        contained(&[], &[(GOOD_NAME, GOOD_BYTES)]),
    ));

    // Offsets, sizes and chunks that overflow.
    let held = "held before: offset, size and chunk overflows";
    let d = sha(b"x");
    for (name, e, must) in [
        (
            "offset-max",
            json!({"name": "big-off", "type": "reg", "size": 1, "offset": u64::MAX,
                "digest": d, "chunkDigest": d}),
            "big-off",
        ),
        (
            "offset-past-toc",
            json!({"name": "past-toc", "type": "reg", "size": 1, "offset": 1u64 << 40,
                "digest": d, "chunkDigest": d}),
            "past-toc",
        ),
        (
            "size-max",
            json!({"name": "huge", "type": "reg", "size": u64::MAX, "offset": 0,
                "digest": d, "chunkDigest": d}),
            "huge",
        ),
        (
            "chunk-past-size",
            json!({"name": "runs-past", "type": "reg", "size": 10, "offset": 0,
                "chunkOffset": 0, "chunkSize": 11, "digest": d, "chunkDigest": d}),
            "runs-past",
        ),
        (
            "chunk-size-max",
            json!({"name": "wraps", "type": "reg", "size": 10, "offset": 0,
                "chunkOffset": 0, "chunkSize": u64::MAX, "digest": d, "chunkDigest": d}),
            "wraps",
        ),
    ] {
        v.push(case(name, held, with_entry(e), refused(&[must])));
    }
    let mut a = Assembler::new();
    a.good();
    a.entry(
        json!({"name": "gappy", "type": "reg", "size": 20, "offset": 0,
        "chunkSize": 10, "digest": d, "chunkDigest": d}),
    );
    a.entry(json!({"name": "gappy", "type": "chunk", "offset": 0,
        "chunkOffset": u64::MAX - 5, "chunkSize": 10, "chunkDigest": d}));
    v.push(case(
        "chunk-offset-max",
        held,
        a.finish(),
        refused(&["gappy"]),
    ));

    // Orphan chunks.
    let held = "held before: orphan chunks";
    let mut a = Assembler::new();
    a.entry(
        json!({"name": "orphan", "type": "chunk", "offset": 0, "chunkOffset": 0,
        "chunkSize": 4, "chunkDigest": d}),
    );
    a.good();
    v.push(case("orphan-chunk", held, a.finish(), refused(&["orphan"])));
    let mut a = Assembler::new();
    a.good();
    a.entry(json!({"name": "someone-else", "type": "chunk", "offset": 0,
        "chunkOffset": 0, "chunkDigest": d}));
    v.push(case(
        "foreign-chunk",
        held,
        a.finish(),
        refused(&["someone-else"]),
    ));

    // Duplicate and conflicting entries.
    let held = "held before: duplicate and conflicting entries";
    let mut a = Assembler::new();
    a.good().file("twice", b"one\n").file("twice", b"two\n");
    v.push(case("conflict", held, a.finish(), refused(&["twice"])));
    let mut a = Assembler::new();
    a.good()
        .file("file-then-dir", b"one\n")
        .entry(json!({"name": "file-then-dir/child", "type": "reg"}));
    v.push(case(
        "file-as-dir",
        held,
        a.finish(),
        refused(&["file-then-dir"]),
    ));
    let mut a = Assembler::new();
    a.good().file("same", b"same\n").file("same", b"same\n");
    v.push(case(
        "identical-duplicate",
        held,
        a.finish(),
        contained(&[], &[(GOOD_NAME, GOOD_BYTES), ("same", b"same\n")]),
    ));

    // Bad footers.
    let held = "held before: bad footers";
    let (good_blob, toc) = {
        let mut a = Assembler::new();
        a.good();
        a.finish()
    };
    let mut bad_magic = good_blob.clone();
    let n = bad_magic.len();
    bad_magic[n - 19..n - 13].copy_from_slice(b"NOTGZ!");
    v.push(case(
        "footer-magic",
        held,
        (bad_magic, toc),
        refused(&["footer"]),
    ));
    let mut past = good_blob[..good_blob.len() - 51].to_vec();
    past.extend_from_slice(&footer_bytes(u64::MAX));
    v.push(case(
        "footer-offset-max",
        held,
        (past, toc),
        refused(&["TOC"]),
    ));
    v.push(case(
        "footer-only",
        held,
        (footer_bytes(0).to_vec(), toc),
        refused(&[]),
    ));

    // Truncated and garbled TOC members.
    let held = "held before: truncated or oversized TOC members";
    let mut a = Assembler::new();
    a.good();
    let json = a.toc_json();
    let toc_offset = gzip(GOOD_BYTES).len();
    let (blob, toc) = a.finish_with(&json);
    let toc_end = blob.len() - 51;
    let mut cut = blob[..toc_offset + (toc_end - toc_offset) / 2].to_vec();
    cut.extend_from_slice(&footer_bytes(toc_offset as u64));
    v.push(case("toc-truncated", held, (cut, toc), refused(&["TOC"])));
    let mut a = Assembler::new();
    a.good();
    let off = a.member(&[]);
    let mut blob = a.blob.clone();
    blob.extend_from_slice(&gzip(b"not a tar stream at all"));
    blob.extend_from_slice(&footer_bytes(off));
    v.push(case(
        "toc-not-tar",
        held,
        (blob, Digest::of(b"not a tar stream at all")),
        refused(&["TOC"]),
    ));

    // Names that are not UTF-8: JSON cannot carry them, so the TOC does
    // not decode (a lone surrogate escape is the closest a TOC can get).
    let held = "held before: non-UTF-8 names";
    let mut a = Assembler::new();
    a.good();
    let mut json = a.toc_json();
    json.truncate(json.len() - 2);
    json.extend_from_slice(br#",{"name":"bad\udc80name","type":"reg"}]}"#);
    v.push(case(
        "lone-surrogate",
        held,
        a.finish_with(&json),
        refused(&["TOC"]),
    ));
    let mut a = Assembler::new();
    a.good();
    let mut json = a.toc_json();
    json.truncate(json.len() - 2);
    json.extend_from_slice(b",{\"name\":\"bad\xff\xfename\",\"type\":\"reg\"}]}");
    v.push(case(
        "raw-latin1",
        held,
        a.finish_with(&json),
        refused(&["TOC"]),
    ));

    // Modes, owners, devices, times, base64.
    let held = "held before: bad modes, owners, devices, times, base64";
    for (name, e, must) in [
        (
            "uid-max",
            json!({"name": "owned", "type": "reg", "uid": u64::MAX}),
            "owned",
        ),
        (
            "gid-2p32",
            json!({"name": "grouped", "type": "reg", "gid": 1u64 << 32}),
            "grouped",
        ),
        (
            "dev-major-max",
            json!({"name": "devnode", "type": "char", "devMajor": u64::MAX, "devMinor": 1}),
            "devnode",
        ),
        (
            "bad-time",
            json!({"name": "when", "type": "reg", "modtime": "yesterday at noon"}),
            "when",
        ),
        (
            "bad-base64",
            json!({"name": "xattr-entry", "type": "reg", "xattrs": {"user.a": "!!not base64!!"}}),
            "xattr-entry",
        ),
        (
            "unknown-type",
            json!({"name": "weird", "type": "socket"}),
            "weird",
        ),
    ] {
        v.push(case(name, held, with_entry(e), refused(&[must])));
    }
    // A mode with more than permission bits: tarn keeps the permission
    // bits and the type comes from the entry's type.
    v.push(case(
        "mode-max",
        held,
        {
            let mut a = Assembler::new();
            a.good()
                .entry(json!({"name": "moded", "type": "reg", "mode": u64::MAX}));
            a.finish()
        },
        contained(&[], &[(GOOD_NAME, GOOD_BYTES), ("moded", b"")]),
    ));
    v
}
