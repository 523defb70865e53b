//! [`Estargz`] as a [`Format`]: what it asks for, in which order, and that
//! a TOC is checked against its digest before it is parsed.

use std::io::Write as _;

use bytes::Bytes;

use super::*;
use crate::format::LayerIndex;
use crate::format::estargz::{
    FOOTER_SIZE, TOC_TAR_NAME, WriteOptions, footer_bytes, write_estargz,
};
use crate::num::usize_from;

/// An eStargz blob of a few small files, and its TOC digest.
fn small_blob() -> (Vec<u8>, Digest) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, body) in [("a", &b"alpha"[..]), ("dir/b", b"bravo bravo"), ("c", b"")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, body).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut blob = Vec::new();
    let res = write_estargz(&tar[..], &mut blob, &WriteOptions::default()).unwrap();
    (blob, res.toc_digest)
}

fn piece(blob: &[u8], r: std::ops::Range<u64>) -> Piece {
    Piece {
        offset: r.start,
        bytes: Bytes::copy_from_slice(&blob[usize_from(r.start)..usize_from(r.end)]),
    }
}

fn ready(step: IndexStep) -> (LayerIndex, u64) {
    match step {
        IndexStep::Ready { index, data_end } => (index, data_end),
        IndexStep::Fetch(r) => panic!("asked for {r:?} again"),
    }
}

#[test]
fn the_tail_first_then_the_index_when_the_toc_is_in_it() {
    let (blob, toc_digest) = small_blob();
    let size = blob.len() as u64;
    let first = Estargz::default()
        .index_step(&[], size, Some(toc_digest))
        .unwrap();
    let IndexStep::Fetch(tail) = first else {
        panic!("the tail is asked for first")
    };
    assert_eq!(tail, size - size.min(TAIL_FETCH)..size);

    let step = Estargz::default().index_step(&[piece(&blob, tail)], size, Some(toc_digest));
    let (index, data_end) = ready(step.unwrap());
    assert!(index.resolve("dir/b").is_some());
    let loc = parse_footer(&blob, size).unwrap();
    assert_eq!(
        data_end, loc.toc_offset,
        "chunk data ends where the TOC begins"
    );
}

#[test]
fn a_tail_without_the_whole_toc_asks_only_for_what_it_lacks() {
    let (blob, toc_digest) = small_blob();
    let size = blob.len() as u64;
    // A tail of the footer and a few TOC bytes, as if the TOC were large.
    let tail = size - FOOTER_SIZE as u64 - 10..size;
    let fetched = vec![piece(&blob, tail.clone())];
    let step = Estargz::default()
        .index_step(&fetched, size, Some(toc_digest))
        .unwrap();
    let IndexStep::Fetch(head) = step else {
        panic!("the TOC's start is asked for")
    };
    let loc = parse_footer(&blob, size).unwrap();
    assert_eq!(head, loc.toc_offset..tail.start);

    let fetched = vec![fetched[0].clone(), piece(&blob, head)];
    let (index, _) = ready(
        Estargz::default()
            .index_step(&fetched, size, Some(toc_digest))
            .unwrap(),
    );
    assert!(index.resolve("a").is_some());

    // Anything but that range is refused, not misread.
    let wrong = vec![fetched[0].clone(), piece(&blob, 0..tail.start)];
    assert!(
        Estargz::default()
            .index_step(&wrong, size, Some(toc_digest))
            .is_err()
    );
}

#[test]
fn a_toc_is_checked_against_its_digest_before_it_is_parsed() {
    // A TOC member whose JSON is not even JSON: with a digest that does not
    // match, the mismatch is the error, so the JSON was never parsed.
    let mut tar = tar::Builder::new(Vec::new());
    let json = b"not json at all";
    let mut h = tar::Header::new_gnu();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, TOC_TAR_NAME, &json[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let mut blob = gz.finish().unwrap();
    blob.extend_from_slice(&footer_bytes(0));
    let size = blob.len() as u64;

    let fetched = [piece(&blob, 0..size)];
    let wrong = Digest::of(b"another TOC");
    match Estargz::default().index_step(&fetched, size, Some(wrong)) {
        Err(FormatError::TocDigestMismatch { expected, actual }) => {
            assert_eq!((expected, actual), (wrong, Digest::of(json)));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(
        matches!(
            Estargz::default().index_step(&fetched, size, Some(Digest::of(json))),
            Err(FormatError::Toc(_))
        ),
        "with the right digest it is parsed, and refused as JSON"
    );
}

#[test]
fn a_toc_larger_than_the_budget_is_refused_before_it_is_fetched() {
    // A footer that puts the TOC at the blob's start: 4 MiB to fetch.
    let mut blob = vec![0u8; 4 << 20];
    blob.extend_from_slice(&footer_bytes(0));
    let size = blob.len() as u64;
    let format = Estargz::with_max_index_bytes(1 << 20);
    let IndexStep::Fetch(tail) = format.index_step(&[], size, None).unwrap() else {
        panic!("the tail first")
    };
    match format.index_step(&[piece(&blob, tail)], size, None) {
        Err(e @ FormatError::IndexBudget { .. }) => {
            assert!(e.to_string().contains("budget of 1 MiB"), "{e}");
        }
        other => panic!("want a refusal instead of a fetch, got {other:?}"),
    }
    // The same TOC within the default budget is fetched (and then found
    // not to be one).
    let step = Estargz::default().index_step(&[piece(&blob, size - TAIL_FETCH..size)], size, None);
    assert!(matches!(step, Ok(IndexStep::Fetch(_))), "{step:?}");
}
