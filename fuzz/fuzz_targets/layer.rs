//! A whole blob: the `index_step` loop as the fetcher runs it (footer, TOC
//! digest, TOC, index), then every chunk of every file decoded from the
//! blob, as reading each file would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarn_fs::format::{Estargz, Format};
use tarn_fuzz::{check_index, open_layer, write_seeds_if_asked};

fuzz_target!(init: write_seeds_if_asked(), |blob: &[u8]| {
    let Ok((index, data_end)) = open_layer(blob) else {
        return;
    };
    check_index(&index, data_end);
    for inode in index.inodes() {
        for chunk in index.file_chunks(&inode) {
            let range = usize::try_from(chunk.blob_range.0).expect("checked by check_index")
                ..usize::try_from(chunk.blob_range.1).expect("checked by check_index");
            let _ = Estargz::default().decode_chunk(chunk, &blob[range]);
        }
    }
});
