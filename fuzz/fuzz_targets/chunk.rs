//! eStargz's chunk decoder on arbitrary compressed bytes with an arbitrary
//! declared chunk (size, offset in its member, digest: see
//! `tarn_fuzz::split_chunk_input`). Whatever it returns must be the
//! declared size with the declared digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarn_fs::Digest;
use tarn_fs::format::{Estargz, Format};
use tarn_fuzz::split_chunk_input;

fuzz_target!(|data: &[u8]| {
    let Some((chunk, compressed)) = split_chunk_input(data) else {
        return;
    };
    if let Ok(plain) = Estargz::default().decode_chunk(&chunk, compressed) {
        assert_eq!(u64::try_from(plain.len()).ok(), Some(chunk.size));
        assert_eq!(Digest::of(&plain), chunk.digest);
    }
});
