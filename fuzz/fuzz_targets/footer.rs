//! The eStargz footer parser on an arbitrary blob tail: as the whole blob,
//! and as the tail of a larger one (the TOC then may start before it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarn_fs::format::estargz::parse_footer;

fuzz_target!(|tail: &[u8]| {
    let len = u64::try_from(tail.len()).expect("a fuzz input fits in u64");
    for blob_size in [len, len + (1 << 30)] {
        let Ok(loc) = parse_footer(tail, blob_size) else {
            continue;
        };
        assert!(
            loc.toc_offset == loc.toc_range.start
                && loc.toc_range.start < loc.toc_range.end
                && loc.toc_range.end + loc.footer_size == blob_size,
            "{loc:?} for a blob of {blob_size} bytes"
        );
        if let Some(r) = loc.toc_in_tail {
            assert!(
                r.start <= r.end && r.end <= tail.len(),
                "{r:?} is not in the tail"
            );
        }
    }
});
