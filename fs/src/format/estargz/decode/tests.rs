//! The chunk decoder in bounded memory: a bomb stops at the declared size,
//! a declared size past the cap is refused before anything is inflated, a
//! short chunk is an error, a right one decodes.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

use super::*;

fn gzip(plain: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(plain).unwrap();
    gz.finish().unwrap()
}

/// A chunk of `compressed` (one member at blob offset 0) that says it is
/// `size` plain bytes from `inner_offset`, named by `digest`.
fn chunk(compressed: &[u8], size: u64, inner_offset: u64, digest: Digest) -> Chunk {
    Chunk {
        file_offset: 0,
        size,
        digest,
        blob_range: (0, compressed.len() as u64),
        inner_offset,
    }
}

#[test]
fn a_right_chunk_decodes_from_its_inner_offset() {
    let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let member = gzip(&plain);
    let want = &plain[512..60_512];
    let c = chunk(&member, 60_000, 512, Digest::of(want));
    let got = decode_chunk(&c, &member).unwrap();
    assert_eq!(got, want);
    assert_eq!(got.capacity(), want.len(), "exactly the declared size");
}

#[test]
fn a_bomb_stops_at_the_declared_size() {
    // 64 MiB of zeros in 64 KiB of gzip, declared as 4 KiB: only 4 KiB is
    // ever inflated into the output, and the digest (of the whole member's
    // bytes, as a hostile TOC would name) does not match.
    let member = gzip(&vec![0; 64 << 20]);
    assert!(member.len() < 1 << 20);
    let c = chunk(&member, 4096, 0, Digest::of(b"not these bytes"));
    let err = decode_chunk(&c, &member).unwrap_err();
    assert!(
        matches!(err, FormatError::ChunkDigestMismatch { .. }),
        "{err}"
    );
    // The same bytes named right decode: the output is the declared 4 KiB.
    let c = chunk(&member, 4096, 0, Digest::of(&[0; 4096]));
    let got = decode_chunk(&c, &member).unwrap();
    assert_eq!((got.len(), got.capacity()), (4096, 4096));
}

#[test]
fn a_declared_size_past_the_cap_is_refused_before_inflating() {
    let member = gzip(&[0; 16]);
    let c = chunk(&member, MAX_CHUNK_SIZE + 1, 0, Digest::of(b""));
    let err = decode_chunk(&c, &member).unwrap_err();
    assert!(matches!(err, FormatError::ChunkTooLarge { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("blob offset 0"), "names the chunk: {msg}");

    let c = chunk(&member, 16, MAX_CHUNK_SIZE + 1, Digest::of(b""));
    let err = decode_chunk(&c, &member).unwrap_err();
    assert!(matches!(err, FormatError::ChunkTooLarge { .. }), "{err}");
}

#[test]
fn a_chunk_shorter_than_declared_is_an_error() {
    let plain = vec![7; 1000];
    let member = gzip(&plain);
    let c = chunk(&member, 1001, 0, Digest::of(&plain));
    let err = decode_chunk(&c, &member).unwrap_err();
    assert!(matches!(err, FormatError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("short"), "{err}");

    // Shorter than the inner offset: nothing is left for the chunk.
    let c = chunk(&member, 10, 2000, Digest::of(&plain[..10]));
    assert!(matches!(
        decode_chunk(&c, &member),
        Err(FormatError::Corrupt(_))
    ));
}

#[test]
fn a_truncated_member_is_an_error() {
    let plain = vec![7; 100_000];
    let member = gzip(&plain);
    let c = chunk(&member, 100_000, 0, Digest::of(&plain));
    let half = &member[..member.len() / 2];
    assert!(decode_chunk(&c, half).is_err());
    assert!(decode_chunk(&c, b"not gzip at all").is_err());
    assert!(decode_chunk(&c, &[]).is_err());
}
