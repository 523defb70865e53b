//! A minimal tar reader for the writer: it yields each entry's exact header
//! bytes (extension headers included) so they can be copied to the output
//! unchanged, plus the metadata the TOC needs with GNU long names and PAX
//! records applied.

use std::io::{self, Read};

use super::error::WriteError;
use crate::num::usize_from;

pub(crate) const BLOCK: u64 = 512;
/// Largest extension (PAX or GNU long name) record we read.
const MAX_EXTENSION: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Reg,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl Kind {
    pub(crate) fn toc_type(self) -> &'static str {
        match self {
            Kind::Reg => "reg",
            Kind::Hardlink => "hardlink",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Dir => "dir",
            Kind::Fifo => "fifo",
        }
    }
}

/// One tar entry's metadata and the bytes that precede its payload.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    /// Extension headers with their data, then the entry's own header.
    pub raw: Vec<u8>,
    pub kind: Kind,
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    /// Payload bytes after the header (padding not included).
    pub size: u64,
    pub mode: u64,
    pub uid: u64,
    pub gid: u64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub mtime: i64,
    pub dev: (u64, u64),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// Payload plus the padding up to the next 512-byte block.
    pub(crate) fn padded_size(&self) -> u64 {
        self.size.div_ceil(BLOCK) * BLOCK
    }
}

fn bad(msg: impl Into<String>) -> WriteError {
    WriteError::InvalidTar(msg.into())
}

pub(crate) struct TarIn<R> {
    r: R,
    global: Vec<PaxRecord>,
}

impl<R: Read> TarIn<R> {
    pub(crate) fn new(r: R) -> TarIn<R> {
        TarIn {
            r,
            global: Vec::new(),
        }
    }

    /// The reader, positioned at the payload of the entry last returned.
    pub(crate) fn reader(&mut self) -> &mut R {
        &mut self.r
    }

    /// Reads up to the next entry's payload. None at the end of the archive.
    pub(crate) fn next_meta(&mut self) -> Result<Option<Meta>, WriteError> {
        let mut raw = Vec::new();
        let mut long_path = None;
        let mut long_link = None;
        let mut pax: Vec<PaxRecord> = Vec::new();
        loop {
            let mut block = [0u8; usize_from(BLOCK)];
            let n = read_full(&mut self.r, &mut block)?;
            if n == 0 || block.iter().all(|&b| b == 0) {
                if !raw.is_empty() {
                    return Err(bad("extension header not followed by an entry"));
                }
                // End of archive (two zero blocks, or plain EOF).
                return Ok(None);
            }
            if n < block.len() {
                return Err(bad("archive ends inside a header"));
            }
            let mut h = tar::Header::new_old();
            h.as_mut_bytes().copy_from_slice(&block);
            check_checksum(&h, raw.len())?;
            raw.extend_from_slice(&block);
            let size = h
                .entry_size()
                .map_err(|e| bad(format!("entry size: {e}")))?;
            let flag = h.entry_type().as_byte();
            if matches!(flag, b'x' | b'g' | b'L' | b'K') {
                if size > MAX_EXTENSION {
                    return Err(bad(format!("extension header of {size} bytes")));
                }
                let padded = size.div_ceil(BLOCK) * BLOCK;
                let start = raw.len();
                raw.resize(start + usize_from(padded), 0);
                if read_full(&mut self.r, &mut raw[start..])? != usize_from(padded) {
                    return Err(bad("archive ends inside an extension header"));
                }
                let data = &raw[start..start + usize_from(size)];
                match flag {
                    b'x' => pax.extend(parse_pax(data)?),
                    b'g' => self.global.extend(parse_pax(data)?),
                    b'L' => long_path = Some(trim_nul(data).to_vec()),
                    _ => long_link = Some(trim_nul(data).to_vec()),
                }
                continue;
            }
            let kind = match flag {
                b'0' | b'\0' | b'7' => Kind::Reg,
                b'1' => Kind::Hardlink,
                b'2' => Kind::Symlink,
                b'3' => Kind::Char,
                b'4' => Kind::Block,
                b'5' => Kind::Dir,
                b'6' => Kind::Fifo,
                other => {
                    return Err(WriteError::Unsupported(format!(
                        "tar entry {:?} of type {:?}",
                        String::from_utf8_lossy(&h.path_bytes()),
                        char::from(other)
                    )));
                }
            };
            // Blank numeric fields (all NULs or spaces) mean 0, as other tar
            // readers take them.
            let num = |r: io::Result<u64>, field: std::ops::Range<usize>, what: &str| {
                r.or_else(|e| {
                    if block[field].iter().all(|&c| c == 0 || c == b' ') {
                        Ok(0)
                    } else {
                        Err(bad(format!("{what}: {e}")))
                    }
                })
            };
            let dev = |r: io::Result<Option<u32>>| r.ok().flatten().map_or(0, u64::from);
            let mut m = Meta {
                raw,
                kind,
                path: long_path.unwrap_or_else(|| h.path_bytes().into_owned()),
                link: long_link.unwrap_or_else(|| {
                    h.link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default()
                }),
                size,
                mode: num(h.mode().map(u64::from), 100..108, "mode")?,
                uid: num(h.uid(), 108..116, "uid")?,
                gid: num(h.gid(), 116..124, "gid")?,
                uname: h.username_bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                gname: h.groupname_bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                mtime: i64::try_from(num(h.mtime(), 136..148, "mtime")?).unwrap_or(i64::MAX),
                dev: (dev(h.device_major()), dev(h.device_minor())),
                xattrs: Vec::new(),
            };
            // Global records first so the entry's own override them.
            for (k, v) in self.global.iter().chain(pax.iter()) {
                apply_pax(&mut m, k, v)?;
            }
            return Ok(Some(m));
        }
    }
}

fn check_checksum(h: &tar::Header, at: usize) -> Result<(), WriteError> {
    let b = h.as_bytes();
    let sum: u64 = b
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(c)
            }
        })
        .sum();
    match h.cksum() {
        Ok(c) if u64::from(c) == sum => Ok(()),
        _ => Err(bad(format!(
            "header checksum mismatch (header block {at} bytes into the entry)"
        ))),
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    &b[..end]
}

/// Reads until `buf` is full or EOF; returns how much was read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A PAX record: key, raw value.
type PaxRecord = (Vec<u8>, Vec<u8>);

/// PAX records: `"<len> <key>=<value>\n"`, values raw bytes.
fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord>, WriteError> {
    let mut out = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or_else(|| bad("PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= data.len())
            .ok_or_else(|| bad("PAX record with a bad length"))?;
        let rec = &data[sp + 1..len];
        let rec = rec
            .strip_suffix(b"\n")
            .ok_or_else(|| bad("PAX record without newline"))?;
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| bad("PAX record without '='"))?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

fn apply_pax(m: &mut Meta, key: &[u8], value: &[u8]) -> Result<(), WriteError> {
    let text = || String::from_utf8_lossy(value);
    let number = |what: &str| {
        text()
            .parse::<u64>()
            .map_err(|_| bad(format!("PAX {what} {:?} is not a number", text())))
    };
    match key {
        b"path" => m.path = value.to_vec(),
        b"linkpath" => m.link = value.to_vec(),
        b"size" => m.size = number("size")?,
        b"uid" => m.uid = number("uid")?,
        b"gid" => m.gid = number("gid")?,
        b"uname" => m.uname = value.to_vec(),
        b"gname" => m.gname = value.to_vec(),
        b"mtime" => {
            // Seconds with an optional fraction; whole seconds are kept.
            let t = text();
            let secs = t.split('.').next().unwrap_or_default();
            m.mtime = secs
                .parse()
                .map_err(|_| bad(format!("PAX mtime {t:?} is not a time")))?;
        }
        k if k.starts_with(b"SCHILY.xattr.") => {
            let name = k[b"SCHILY.xattr.".len()..].to_vec();
            m.xattrs.retain(|(n, _)| *n != name);
            m.xattrs.push((name, value.to_vec()));
        }
        k if k.starts_with(b"GNU.sparse.") => {
            return Err(WriteError::Unsupported("GNU sparse files".into()));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_parse_and_reject_garbage() {
        let recs = parse_pax(b"27 SCHILY.xattr.user.a=\x00\xff1\n10 uid=42\n").unwrap();
        assert_eq!(
            recs[0],
            (b"SCHILY.xattr.user.a".to_vec(), b"\x00\xff1".to_vec())
        );
        assert_eq!(recs[1], (b"uid".to_vec(), b"42".to_vec()));
        assert!(parse_pax(b"99 uid=42\n").is_err());
        assert!(parse_pax(b"x uid=42\n").is_err());
        assert!(parse_pax(b"9 uid42\n\n").is_err());
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let mut h = tar::Header::new_gnu();
        h.set_path("a").unwrap();
        h.set_size(0);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes[0] = b'b'; // checksum no longer matches
        let e = TarIn::new(&bytes[..]).next_meta().unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = TarIn::new(&h.as_bytes()[..100]).next_meta().unwrap_err();
        assert!(e.to_string().contains("inside a header"), "{e}");
    }
}
