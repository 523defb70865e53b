//! TOC JSON to `LayerIndex`: the JSON decoder, then the index builder, then
//! a walk of the index checking what the builder promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarn_fs::format::estargz::{build_index, parse_toc_json};
use tarn_fuzz::{BLOB_SIZE, TOC_OFFSET, check_index};

fuzz_target!(|json: &[u8]| {
    let Ok(toc) = parse_toc_json(json) else {
        return;
    };
    if let Ok(index) = build_index(toc, BLOB_SIZE, TOC_OFFSET) {
        check_index(&index, TOC_OFFSET);
    }
});
