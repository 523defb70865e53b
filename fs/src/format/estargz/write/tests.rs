//! The writer's handling of input tars as other tools write them.

use std::io::Read;

use super::write_estargz;
use crate::Digest;
use crate::format::estargz::WriteOptions;

/// A tar of one regular file of `len` bytes, then a symlink, cut right
/// after the file's data when `cut` (no padding, no end blocks: umoci's
/// layers end so).
fn tar_of(len: usize, cut: bool) -> (Vec<u8>, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "link", "file").unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(len as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "file", &data[..]).unwrap();
    let mut tar = b.into_inner().unwrap();
    if cut {
        // Two headers, then the data.
        tar.truncate(1024 + len);
    }
    (tar, data)
}

/// The blob decompressed as one stream, as containerd unpacks it.
fn unpacked(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn a_tar_ending_right_after_its_last_data_gives_a_well_formed_blob() {
    let (tar, data) = tar_of(700, true);
    assert_eq!(
        tar.len(),
        512 + 512 + 700,
        "the input is cut after the data"
    );
    let mut blob = Vec::new();
    let res = write_estargz(&tar[..], &mut blob, &WriteOptions::default()).unwrap();
    let plain = unpacked(&blob);
    assert_eq!(plain.len() % 512, 0, "the stream is whole tar blocks");
    assert_eq!(Digest::of(&plain), res.diff_id);
    assert_eq!(plain.len() as u64, res.uncompressed_size);
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(&plain[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name == "file" {
            let mut got = Vec::new();
            e.read_to_end(&mut got).unwrap();
            assert_eq!(got, data);
        }
        names.push(name);
    }
    assert_eq!(
        names,
        [".no.prefetch.landmark", "link", "file", "stargz.index.json"]
    );
}

#[test]
fn a_whole_tar_is_copied_byte_for_byte() {
    let (tar, _) = tar_of(700, false);
    let mut blob = Vec::new();
    write_estargz(&tar[..], &mut blob, &WriteOptions::default()).unwrap();
    let plain = unpacked(&blob);
    // After the landmark's header and its one block, the input's entries
    // as they were (the input's end blocks are replaced by the TOC's entry).
    let entries = &tar[..512 * 4];
    assert_eq!(&plain[1024..1024 + entries.len()], entries);
}

#[test]
fn a_tar_cut_inside_data_is_refused() {
    let (mut tar, _) = tar_of(700, true);
    tar.truncate(tar.len() - 1);
    let e = write_estargz(&tar[..], &mut Vec::new(), &WriteOptions::default()).unwrap_err();
    assert!(e.to_string().contains("ends inside an entry's data"), "{e}");
}
