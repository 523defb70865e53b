//! The TOC: a gzip member holding a tar stream with one entry,
//! `stargz.index.json`, whose JSON lists every entry of the layer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use flate2::read::GzDecoder;
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::format::FormatError;
use crate::num::usize_from;

/// Name of the TOC's tar entry.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Largest TOC JSON we accept; a real one is a few hundred bytes per file.
pub const MAX_TOC_JSON: u64 = 512 << 20;
/// Most TOC entries we accept in one layer.
pub const MAX_TOC_ENTRIES: usize = 4_000_000;

/// The decoded TOC JSON: `{"version":1,"entries":[...]}`. Decoded, its
/// strings borrow from the JSON where they can (those without escapes): a
/// TOC has tens of thousands of entries, and copying each string on the
/// way to the index cost a fifth of a layer's opening.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Toc<'a> {
    pub version: u32,
    #[serde(borrow)]
    pub entries: Vec<TocEntry<'a>>,
}

/// One TOC entry. Field names and omission rules follow the eStargz
/// specification so other readers understand what the writer produces.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TocEntry<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: u64,
    /// RFC 3339, whole seconds; absent means the epoch.
    #[serde(rename = "modtime", skip_serializing_if = "str::is_empty", borrow)]
    pub mod_time: Cow<'a, str>,
    #[serde(skip_serializing_if = "str::is_empty", borrow)]
    pub link_name: Cow<'a, str>,
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(skip_serializing_if = "str::is_empty", borrow)]
    pub user_name: Cow<'a, str>,
    #[serde(skip_serializing_if = "str::is_empty", borrow)]
    pub group_name: Cow<'a, str>,
    /// Blob offset of the gzip member holding this entry's payload.
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Offset of the payload within that member, once decompressed.
    #[serde(skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    /// Extended attributes, values base64 (standard alphabet, padded).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// sha256 of the whole file (`reg` only).
    #[serde(skip_serializing_if = "str::is_empty", borrow)]
    pub digest: Cow<'a, str>,
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    /// Size of this chunk; 0 means up to the end of the file.
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    /// sha256 of this chunk's uncompressed bytes.
    #[serde(skip_serializing_if = "str::is_empty", borrow)]
    pub chunk_digest: Cow<'a, str>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A TOC member's JSON, unpacked.
#[derive(Debug)]
pub struct TocJson {
    /// The raw JSON bytes exactly as stored.
    pub json: Vec<u8>,
    /// sha256 of `json`: what the layer's `toc.digest` annotation names.
    pub digest: Digest,
}

impl TocJson {
    /// The TOC, borrowing from the JSON: check `digest` first.
    pub fn parse(&self) -> Result<Toc<'_>, FormatError> {
        parse_toc_json(&self.json)
    }
}

/// Unpacks the TOC member, `compressed` being the blob bytes from the TOC
/// offset up to the footer, and hashes its JSON. The JSON may be up to
/// [`MAX_TOC_JSON`] bytes; opening a layer bounds it by the layer's index
/// budget instead.
pub fn decode_toc(compressed: &[u8]) -> Result<TocJson, FormatError> {
    decode_toc_within(compressed, MAX_TOC_JSON, |size| {
        FormatError::Toc(format!(
            "TOC JSON of {size} bytes is larger than the limit of {MAX_TOC_JSON}"
        ))
    })
}

/// [`decode_toc`] from any reader of the member's bytes, refusing a JSON
/// larger than `max_json` before reading it (with the error `too_large`
/// makes of its size). What is decompressed is bounded too (the JSON and
/// [`TAR_SLACK`] of tar headers), so a member that inflates without end
/// stops there.
pub(crate) fn decode_toc_within(
    compressed: impl Read,
    max_json: u64,
    too_large: impl FnOnce(u64) -> FormatError,
) -> Result<TocJson, FormatError> {
    let json = read_toc_json(compressed, max_json, too_large)?;
    let digest = Digest::of(&json);
    Ok(TocJson { json, digest })
}

/// What a TOC member may decompress to beyond its JSON: the tar headers
/// before it (a long name or PAX header would be a few KiB).
pub const TAR_SLACK: u64 = 64 << 10;

/// Parses TOC JSON, refusing absurd entry counts.
pub fn parse_toc_json(json: &[u8]) -> Result<Toc<'_>, FormatError> {
    let mut entries = Vec::new();
    let version = for_each_entry(json, |e| {
        entries.push(e);
        Ok(())
    })?;
    Ok(Toc { version, entries })
}

/// Calls `f` on each entry of the TOC JSON as it is decoded, so a TOC
/// never exists as a whole list: peak memory is the JSON and what `f`
/// keeps. Stops at the first error of `f` and returns it. Refuses
/// versions other than 1 and more than [`MAX_TOC_ENTRIES`] entries.
pub(crate) fn for_each_entry<'de>(
    json: &'de [u8],
    mut f: impl FnMut(TocEntry<'de>) -> Result<(), FormatError>,
) -> Result<u32, FormatError> {
    let mut failed = None;
    let mut de = serde_json::Deserializer::from_slice(json);
    let decoded = serde::Deserializer::deserialize_map(
        &mut de,
        TocVisitor {
            f: &mut f,
            failed: &mut failed,
        },
    )
    .and_then(|version| de.end().map(|()| version));
    match (decoded, failed) {
        (_, Some(e)) => Err(e),
        (Ok(version), None) => Ok(version),
        (Err(e), None) => Err(FormatError::Toc(format!("decoding TOC JSON: {e}"))),
    }
}

/// The keys of the TOC object; others are skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Version,
    Entries,
    #[serde(other)]
    Other,
}

/// Decodes `{"version":1,"entries":[...]}`, handing each entry to `f`;
/// an error of `f` is kept in `failed` (serde's errors are strings).
struct TocVisitor<'a, F> {
    f: &'a mut F,
    failed: &'a mut Option<FormatError>,
}

impl<'de, F> Visitor<'de> for TocVisitor<'_, F>
where
    F: FnMut(TocEntry<'de>) -> Result<(), FormatError>,
{
    type Value = u32;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a TOC object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u32, A::Error> {
        let (mut version, mut entries) = (None, false);
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Version => {
                    let v: u32 = map.next_value()?;
                    if v != 1 {
                        *self.failed =
                            Some(FormatError::Toc(format!("unsupported TOC version {v}")));
                        return Err(A::Error::custom("unsupported version"));
                    }
                    version = Some(v);
                }
                Key::Entries if entries => return Err(A::Error::duplicate_field("entries")),
                Key::Entries => {
                    entries = true;
                    map.next_value_seed(EntriesSeed {
                        f: &mut *self.f,
                        failed: &mut *self.failed,
                    })?;
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !entries {
            return Err(A::Error::missing_field("entries"));
        }
        version.ok_or_else(|| A::Error::missing_field("version"))
    }
}

struct EntriesSeed<'a, F> {
    f: &'a mut F,
    failed: &'a mut Option<FormatError>,
}

impl<'de, F> DeserializeSeed<'de> for EntriesSeed<'_, F>
where
    F: FnMut(TocEntry<'de>) -> Result<(), FormatError>,
{
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F> Visitor<'de> for EntriesSeed<'_, F>
where
    F: FnMut(TocEntry<'de>) -> Result<(), FormatError>,
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0usize;
        while let Some(entry) = seq.next_element::<TocEntry<'de>>()? {
            count += 1;
            let done = if count > MAX_TOC_ENTRIES {
                Err(FormatError::Toc(format!(
                    "more entries than the limit of {MAX_TOC_ENTRIES}"
                )))
            } else {
                (self.f)(entry)
            };
            if let Err(e) = done {
                *self.failed = Some(e);
                return Err(A::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

fn read_toc_json(
    compressed: impl Read,
    max_json: u64,
    too_large: impl FnOnce(u64) -> FormatError,
) -> Result<Vec<u8>, FormatError> {
    let corrupt = |e: std::io::Error| FormatError::Toc(format!("reading TOC member: {e}"));
    // One member only: the footer after it is not part of the TOC. What it
    // inflates to is bounded, whatever its tar headers claim.
    let inflated = GzDecoder::new(compressed).take(max_json.saturating_add(TAR_SLACK));
    let mut archive = tar::Archive::new(inflated);
    let mut entries = archive.entries().map_err(corrupt)?;
    let mut entry = entries
        .next()
        .ok_or_else(|| FormatError::Toc("TOC member holds no tar entry".into()))?
        .map_err(corrupt)?;
    let name = entry.path_bytes().into_owned();
    if name != TOC_TAR_NAME.as_bytes() {
        return Err(FormatError::Toc(format!(
            "TOC tar entry is named {:?}, want {TOC_TAR_NAME}",
            String::from_utf8_lossy(&name)
        )));
    }
    let size = entry.header().entry_size().map_err(corrupt)?;
    if size > max_json {
        return Err(too_large(size));
    }
    // `size` is bounded above, so the capacity is sane.
    let mut json = Vec::with_capacity(usize_from(size));
    (&mut entry)
        .take(size)
        .read_to_end(&mut json)
        .map_err(corrupt)?;
    if json.len() as u64 != size {
        return Err(FormatError::Toc(format!(
            "TOC JSON truncated: {} of {size} bytes",
            json.len()
        )));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    pub(crate) fn toc_member(name: &str, json: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let mut h = tar::Header::new_ustar();
        h.set_size(json.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, name, json).unwrap();
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn decodes_json_and_digest() {
        let json = br#"{"version":1,"entries":[{"name":"a","type":"reg","size":3,"modtime":"2009-02-13T23:31:30Z","xattrs":{"user.x":"eQ=="},"chunkDigest":"sha256:00"}]}"#;
        let mut member = toc_member(TOC_TAR_NAME, json);
        member.extend_from_slice(&[1, 2, 3]); // trailing bytes are not read
        let d = decode_toc(&member).unwrap();
        assert_eq!(d.json, json);
        assert_eq!(d.digest, Digest::of(json));
        let toc = d.parse().unwrap();
        let e = &toc.entries[0];
        assert_eq!((&*e.name, &*e.kind, e.size), ("a", "reg", 3));
        assert!(matches!(e.name, Cow::Borrowed(_)), "copied: {e:?}");
        assert_eq!(e.xattrs["user.x"], "eQ==");
        assert_eq!(e.mod_time, "2009-02-13T23:31:30Z");
    }

    #[test]
    fn rejects_wrong_name_bad_json_and_garbage() {
        // Unpacked and parsed, as a layer's opening does.
        let decode = |member: &[u8]| decode_toc(member).and_then(|d| d.parse().map(drop));
        let e = decode(&toc_member("other.json", b"{}")).unwrap_err();
        assert!(e.to_string().contains("named \"other.json\""), "{e}");
        let e = decode(&toc_member(TOC_TAR_NAME, b"{not json")).unwrap_err();
        assert!(e.to_string().contains("decoding TOC JSON"), "{e}");
        let e = decode(&toc_member(TOC_TAR_NAME, br#"{"version":2,"entries":[]}"#)).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        let e = decode(&toc_member(
            TOC_TAR_NAME,
            br#"{"version":1,"entries":[{"name":"a","type":"reg","size":-1}]}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("decoding TOC JSON"), "{e}");
        let e = decode(b"definitely not gzip").unwrap_err();
        assert!(e.to_string().contains("reading TOC member"), "{e}");
    }

    #[test]
    fn rejects_oversized_toc_without_reading_it() {
        // A tar header claiming a 1 TiB JSON, and nothing after it.
        let mut h = tar::Header::new_ustar();
        h.set_path(TOC_TAR_NAME).unwrap();
        h.set_size(1 << 40);
        h.set_cksum();
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(h.as_bytes()).unwrap();
        let e = decode_toc(&gz.finish().unwrap()).unwrap_err();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
    }
}
