use std::sync::Arc;

use super::*;
use crate::num::usize_from;

fn data(len: usize, seed: u8) -> Vec<u8> {
    // Byte i is (i mod 256) * 31 + seed.
    (0..=u8::MAX)
        .cycle()
        .take(len)
        .map(|b| b.wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn small_and_large_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let small = data(1000, 1);
    let large = data(300 * 1024, 2);
    let empty: Vec<u8> = Vec::new();
    let (ds, dl, de) = (Digest::of(&small), Digest::of(&large), Digest::of(&empty));
    {
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.read(&ds, 0, 1).unwrap(), None);
        cache.insert(&ds, &small).unwrap();
        cache.insert(&dl, &large).unwrap();
        cache.insert(&de, &empty).unwrap();
        assert_eq!(cache.read(&ds, 10, 20).unwrap().unwrap(), &small[10..30]);
        assert_eq!(
            cache.read(&dl, 70_000, 5000).unwrap().unwrap(),
            &large[70_000..75_000]
        );
        assert_eq!(cache.read(&de, 0, 0).unwrap().unwrap(), Vec::<u8>::new());
        let s = cache.stats();
        assert_eq!((s.entries, s.bytes), (3, 1000 + 300 * 1024));
        assert_eq!((s.hits, s.misses), (3, 1));
        // Only the large item is a standalone file, holding exactly its bytes.
        assert_eq!(cache.file_path(&ds), None);
        let path = cache.file_path(&dl).unwrap();
        assert_eq!(fs::read(path).unwrap(), large);
    }
    let cache = Cache::open(dir.path()).unwrap();
    assert!(cache.contains(&ds) && cache.contains(&dl) && cache.contains(&de));
    assert_eq!(cache.read(&ds, 0, 1000).unwrap().unwrap(), small);
    assert_eq!(cache.read(&dl, 0, large.len()).unwrap().unwrap(), large);
    assert_eq!(cache.stats().corrupt, 0);
}

#[test]
fn out_of_range_read_is_an_error_not_short_data() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let d = Digest::of(b"four");
    cache.insert(&d, b"four").unwrap();
    assert!(matches!(
        cache.read(&d, 2, 3),
        Err(CacheError::OutOfRange { size: 4, .. })
    ));
    assert!(cache.read(&d, u64::MAX, 2).is_err());
}

#[test]
fn second_open_of_a_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Cache::open(dir.path()).unwrap();
    assert!(matches!(
        Cache::open(dir.path()),
        Err(CacheError::Locked(_))
    ));
}

/// Flips one byte of a pack file at the data of the record for `digest`.
fn corrupt_pack_record(root: &Path, needle: &[u8]) {
    for i in 0..PACKS {
        let path = root.join("packs").join(format!("pack-{i}.dat"));
        let mut bytes = fs::read(&path).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[pos] ^= 0xff;
            fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("record not found in any pack");
}

#[test]
fn corrupt_pack_record_is_a_miss_after_reopen_and_others_survive() {
    let dir = tempfile::tempdir().unwrap();
    let bad = b"this record will be corrupted on disk".to_vec();
    let good = data(5000, 9);
    let (db, dg) = (Digest::of(&bad), Digest::of(&good));
    {
        let cache = Cache::open(dir.path()).unwrap();
        cache.insert(&db, &bad).unwrap();
        cache.insert(&dg, &good).unwrap();
    }
    corrupt_pack_record(dir.path(), &bad);

    let cache = Cache::open(dir.path()).unwrap();
    assert_eq!(cache.read(&db, 0, 4).unwrap(), None);
    assert!(!cache.contains(&db), "a corrupt entry is dropped");
    assert_eq!(cache.stats().corrupt, 1);
    assert_eq!(cache.read(&dg, 0, good.len()).unwrap().unwrap(), good);
    // It can be fetched and stored again.
    cache.insert(&db, &bad).unwrap();
    assert_eq!(cache.read(&db, 0, bad.len()).unwrap().unwrap(), bad);
}

#[test]
fn corrupt_or_truncated_object_file_is_a_miss_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = data(100_000, 3);
    let b = data(200_000, 4);
    let (da, db) = (Digest::of(&a), Digest::of(&b));
    let (pa, pb);
    {
        let cache = Cache::open(dir.path()).unwrap();
        cache.insert(&da, &a).unwrap();
        cache.insert(&db, &b).unwrap();
        pa = cache.file_path(&da).unwrap();
        pb = cache.file_path(&db).unwrap();
    }
    // A flipped byte in the middle and a file zeroed past a point, as a
    // power loss can leave behind.
    let mut bytes = fs::read(&pa).unwrap();
    bytes[50_000] ^= 1;
    fs::write(&pa, bytes).unwrap();
    let mut bytes = fs::read(&pb).unwrap();
    bytes[4096..].fill(0);
    fs::write(&pb, bytes).unwrap();

    let cache = Cache::open(dir.path()).unwrap();
    // Even a read of an intact-looking prefix is refused: the entry as a
    // whole is unproven.
    assert_eq!(cache.read(&da, 0, 10).unwrap(), None);
    assert_eq!(
        cache.file_path(&db),
        None,
        "never hand a bad file to the kernel"
    );
    assert!(!pa.exists() && !pb.exists());
    assert_eq!(cache.stats().corrupt, 2);
}

#[test]
fn torn_pack_tail_is_truncated_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<Vec<u8>> = (0..50u8)
        .map(|i| data(100 + usize::from(i) * 37, i))
        .collect();
    {
        let cache = Cache::open(dir.path()).unwrap();
        for it in &items {
            cache.insert(&Digest::of(it), it).unwrap();
        }
    }
    // Tear the last record of every pack in half, as a crash mid-write does.
    let mut torn = 0;
    for i in 0..PACKS {
        let path = dir.path().join("packs").join(format!("pack-{i}.dat"));
        let len = fs::metadata(&path).unwrap().len();
        if len > 0 {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(len - 20).unwrap();
            torn += 1;
        }
    }
    let cache = Cache::open(dir.path()).unwrap();
    let present = items
        .iter()
        .filter(|it| cache.read(&Digest::of(it), 0, it.len()).unwrap().as_deref() == Some(&it[..]))
        .count();
    assert_eq!(
        present,
        items.len() - torn,
        "exactly the torn records are lost"
    );
    // New appends after the truncated tail are found by the next open.
    let extra = data(777, 200);
    cache.insert(&Digest::of(&extra), &extra).unwrap();
    drop(cache);
    let cache = Cache::open(dir.path()).unwrap();
    assert_eq!(
        cache.read(&Digest::of(&extra), 0, 777).unwrap().unwrap(),
        extra
    );
    assert_eq!(usize_from(cache.stats().entries), items.len() - torn + 1);
}

#[test]
fn concurrent_inserts_and_reads_from_threads() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    // Every thread inserts the same 64 items (half small, half large) and
    // reads each back; duplicates must be harmless.
    let items: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..64u8)
            .map(|i| data(if i % 2 == 0 { 3000 } else { 70_000 }, i))
            .collect(),
    );
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cache = Arc::clone(&cache);
            let items = Arc::clone(&items);
            std::thread::spawn(move || {
                for k in 0..items.len() {
                    let it = &items[(k + t * 7) % items.len()];
                    let d = Digest::of(it);
                    cache.insert(&d, it).unwrap();
                    assert_eq!(cache.read(&d, 0, it.len()).unwrap().unwrap(), *it);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = cache.stats();
    let total: u64 = items.iter().map(|i| i.len() as u64).sum();
    assert_eq!((s.entries, s.bytes), (64, total));
    assert_eq!(s.dedup_bytes, total * 7);
    drop(cache);
    // No duplicate or interleaved records: a reopen finds each item intact.
    let cache = Cache::open(dir.path()).unwrap();
    for it in items.iter() {
        assert_eq!(
            cache.read(&Digest::of(it), 0, it.len()).unwrap().unwrap(),
            *it
        );
    }
    assert_eq!(cache.stats().bytes, total);
}

/// Parts (a pack item and two objects) of a file and the file itself.
fn file_in_parts(cache: &Cache) -> (Vec<u8>, Vec<(Digest, u64)>) {
    let pieces = [data(200 * 1024, 7), data(100, 8), data(1_300_000, 9)];
    let mut parts = Vec::new();
    for p in &pieces {
        let d = Digest::of(p);
        cache.insert(&d, p).unwrap();
        parts.push((d, p.len() as u64));
    }
    (pieces.concat(), parts)
}

#[test]
fn assembled_whole_file_is_a_verified_standalone_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (whole, parts) = file_in_parts(&cache);
    let d = Digest::of(&whole);
    assert_eq!(cache.verified_file(&d), None);
    assert_eq!(cache.assemble(&d, &parts).unwrap(), Assembled::Done);
    let (path, len) = cache.verified_file(&d).expect("assembled file is trusted");
    assert_eq!(len, whole.len() as u64);
    assert_eq!(fs::read(&path).unwrap(), whole);
    assert_eq!(cache.read(&d, 5, 10).unwrap().unwrap(), &whole[5..15]);
    // Again: nothing to do.
    assert_eq!(cache.assemble(&d, &parts).unwrap(), Assembled::Done);
    drop(cache);

    // After a restart the object is known but not trusted until verified.
    let cache = Cache::open(dir.path()).unwrap();
    assert!(cache.contains(&d));
    assert_eq!(cache.verified_file(&d), None);
    assert!(cache.file_path(&d).is_some());
    assert!(cache.verified_file(&d).is_some());
}

#[test]
fn an_assembled_file_holds_its_chunks_once_and_serves_them_until_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (whole, parts) = file_in_parts(&cache);
    let before = cache.stats().disk_bytes;
    let d = Digest::of(&whole);
    assert_eq!(cache.assemble(&d, &parts).unwrap(), Assembled::Done);
    // The chunks' own objects went; the pack item's record is dead until
    // its pack is compacted. Block rounding aside, no byte is stored twice.
    assert!(
        cache.stats().disk_bytes <= before + 16 * 1024,
        "{} after assembling, {before} before",
        cache.stats().disk_bytes
    );
    assert_eq!(
        cache.verified_file(&parts[0].0),
        None,
        "no object of its own"
    );
    let mut at = 0;
    for (part, len) in &parts {
        let n = usize::try_from(*len).unwrap();
        let got = cache.read(part, 0, n).unwrap().expect("a slice is a hit");
        assert_eq!(got, &whole[at..at + n]);
        at += n;
    }
    assert_eq!(
        cache.read(&parts[2].0, 10, 5).unwrap().unwrap(),
        &whole[at - n_of(&parts[2]) + 10..at - n_of(&parts[2]) + 15]
    );

    // Pruning every entry no layer lists keeps the object of listed chunks.
    let keep: std::collections::HashSet<Digest> = parts.iter().map(|(p, _)| *p).collect();
    cache.prune(Some(&keep));
    assert!(cache.contains(&d), "the object holds kept chunks");

    // The object is evicted (a bound below anything): its slices are
    // misses, never an error or other bytes, and then they are gone.
    cache.set_max_bytes(1);
    assert!(!cache.contains(&d));
    for (part, len) in &parts {
        assert_eq!(cache.read(part, 0, n_of(&(*part, *len))).unwrap(), None);
        assert!(!cache.contains(part));
    }
    // Fetched again, a chunk is stored again.
    cache.set_max_bytes(u64::MAX);
    let piece = data(200 * 1024, 7);
    cache.insert(&parts[0].0, &piece).unwrap();
    assert_eq!(
        cache.read(&parts[0].0, 0, piece.len()).unwrap().unwrap(),
        piece
    );
}

#[test]
fn a_whole_file_is_released_and_pruned_with_the_last_of_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (whole, parts) = file_in_parts(&cache);
    let d = Digest::of(&whole);
    assert_eq!(cache.assemble(&d, &parts).unwrap(), Assembled::Done);
    cache.release(parts[..2].iter().map(|(p, _)| p));
    cache.prune(None);
    assert!(cache.contains(&d), "one of its chunks is still in use");
    let last = n_of(&parts[2]);
    assert_eq!(
        cache.read(&parts[2].0, 0, last).unwrap().unwrap(),
        &whole[whole.len() - last..]
    );
    cache.release([&parts[2].0]);
    cache.prune(None);
    assert!(!cache.contains(&d));
    assert_eq!(cache.stats().disk_bytes, 0, "{:?}", cache.stats());
}

fn n_of(part: &(Digest, u64)) -> usize {
    usize::try_from(part.1).unwrap()
}

#[test]
fn parts_that_do_not_hash_to_the_file_digest_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (_whole, parts) = file_in_parts(&cache);
    let claimed = Digest::of(b"some other file");
    assert_eq!(
        cache.assemble(&claimed, &parts).unwrap(),
        Assembled::Mismatch
    );
    assert!(!cache.contains(&claimed));
    assert_eq!(cache.verified_file(&claimed), None);
    let hex = claimed.hex();
    let sub = dir.path().join("objects/sha256").join(&hex[..2]);
    let left = fs::read_dir(&sub).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no temp or final file remains");
}

#[test]
fn a_missing_part_means_no_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (whole, mut parts) = file_in_parts(&cache);
    parts.push((Digest::of(b"never inserted"), 14));
    let d = Digest::of(&whole);
    assert_eq!(cache.assemble(&d, &parts).unwrap(), Assembled::PartMissing);
    assert!(!cache.contains(&d));
}

/// `parts` as the chunks of one file, back to back.
fn as_chunks(parts: &[(Digest, u64)]) -> Vec<crate::format::Chunk> {
    let mut at = 0;
    parts
        .iter()
        .map(|&(digest, size)| {
            let c = crate::format::Chunk {
                file_offset: at,
                size,
                digest,
                blob_range: (at, at + size),
                inner_offset: 0,
            };
            at += size;
            c
        })
        .collect()
}

#[test]
fn only_files_of_a_pack_items_size_or_more_are_worth_a_whole_file_object() {
    let d = Digest::of(b"file");
    let one = as_chunks(&[(Digest::of(b"only"), SMALL_MAX as u64)]);
    let file = WholeFile::of(SMALL_MAX as u64, &one, || Some(d)).unwrap();
    assert_eq!(file.key(), one[0].digest, "a one-chunk file is its chunk");
    let small = as_chunks(&[(Digest::of(b"only"), SMALL_MAX as u64 - 1)]);
    assert!(WholeFile::of(SMALL_MAX as u64 - 1, &small, || Some(d)).is_none());
    let two = as_chunks(&[(Digest::of(b"a"), SMALL_MAX as u64), (Digest::of(b"b"), 1)]);
    let size = SMALL_MAX as u64 + 1;
    assert_eq!(WholeFile::of(size, &two, || Some(d)).unwrap().key(), d);
    assert!(
        WholeFile::of(size, &two, || None).is_none(),
        "no whole-file digest, no key"
    );
}

#[test]
fn a_whole_file_is_assembled_once_its_chunks_are_cached_and_only_for_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (whole, parts) = file_in_parts(&cache);
    let d = Digest::of(&whole);
    let mut missing = parts.clone();
    missing.push((Digest::of(b"not cached"), 10));
    let chunks = as_chunks(&missing);
    let size = whole.len() as u64 + 10;
    let file = WholeFile::of(size, &chunks, || Some(d)).unwrap();
    assert!(
        cache.prepare_whole_file(&file).is_none(),
        "a chunk is missing"
    );

    let chunks = as_chunks(&parts);
    let file = WholeFile::of(whole.len() as u64, &chunks, || Some(d)).unwrap();
    assert_eq!(cache.whole_file(&file), None);
    let work = cache.prepare_whole_file(&file).expect("all chunks cached");
    assert!(matches!(work, Preparation::Assemble { .. }));
    assert!(work.run(&cache));
    let path = cache.whole_file(&file).expect("assembled and verified");
    assert_eq!(fs::read(path).unwrap(), whole);
    assert!(
        cache.prepare_whole_file(&file).is_none(),
        "nothing left to do"
    );

    // A TOC claiming that digest for a file of another size is lying.
    let other = WholeFile::of(whole.len() as u64 + 1, &chunks, || Some(d)).unwrap();
    assert_eq!(cache.whole_file(&other), None);
    drop(cache);

    // Found on disk after a restart: verified first, off the open path.
    let cache = Cache::open(dir.path()).unwrap();
    assert_eq!(cache.whole_file(&file), None);
    let work = cache.prepare_whole_file(&file).expect("to verify");
    assert!(matches!(work, Preparation::Verify(k) if k == d));
    assert!(!work.run(&cache));
    assert!(cache.whole_file(&file).is_some());
}

#[test]
fn location_keyed_entries_survive_a_restart_checked_against_their_journaled_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (small, large) = (data(4096, 7), data(64 * 1024, 8));
    let (ks, kl) = (location_key(b"block 1"), location_key(b"block 2"));
    let (kept, torn) = (location_key(b"block 3"), location_key(b"block 4"));
    assert!(is_location(&ks) && !is_location(&Digest::of(&small)));
    {
        let cache = Cache::open(dir.path()).unwrap();
        for (k, d) in [
            (&ks, &small),
            (&kl, &large),
            (&kept, &small),
            (&torn, &small),
        ] {
            cache.insert(k, d).unwrap();
        }
    }
    // A torn journal tail: the last record (block 4's) lost half.
    let journal = dir.path().join(locations::FILE);
    let len = fs::metadata(&journal).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(len - 32)
        .unwrap();
    // Block 3's stored bytes go bad on disk (same length, other content).
    let cache = Cache::open(dir.path()).unwrap();
    let at = cache.pack_offset(&kept).unwrap();
    let pack = usize::from(kept.0[0]) % PACKS;
    cache.packs[pack]
        .file
        .read()
        .unwrap()
        .write_all_at(&data(4096, 9), at)
        .unwrap();

    assert_eq!(cache.read(&ks, 0, 4096).unwrap().unwrap(), small);
    assert_eq!(
        cache.read(&kl, 1000, 10).unwrap().unwrap(),
        &large[1000..1010]
    );
    assert_eq!(cache.read(&kept, 0, 1).unwrap(), None, "bad bytes dropped");
    assert_eq!(
        cache.read(&torn, 0, 1).unwrap(),
        None,
        "no journaled digest: dropped"
    );
    assert_eq!(cache.stats().corrupt, 2);
    // A content-keyed entry holding other bytes is still refused.
    drop(cache);
    let cache = Cache::open(dir.path()).unwrap();
    let wrong = Digest::of(b"not these bytes");
    cache.insert(&wrong, &small).unwrap();
    drop(cache);
    let cache = Cache::open(dir.path()).unwrap();
    assert_eq!(cache.read(&wrong, 0, 1).unwrap(), None);
    assert_eq!(
        cache.read(&ks, 0, 4).unwrap().unwrap(),
        &small[..4],
        "journal rewritten at open keeps what is there"
    );
}

#[test]
fn after_a_restart_a_whole_files_chunks_are_slices_again_each_checked_on_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let (whole, parts) = file_in_parts(&cache);
    let d = Digest::of(&whole);
    assert_eq!(cache.assemble(&d, &parts).unwrap(), Assembled::Done);
    drop(cache);

    // Slices live in memory: after a restart the object is known, the
    // large chunks (their own files unlinked) are not.
    let cache = Cache::open(dir.path()).unwrap();
    assert!(cache.contains(&d));
    assert!(!cache.contains(&parts[0].0) && !cache.contains(&parts[2].0));

    // A TOC that lies about one chunk: its digest names other bytes.
    let mut told = parts.clone();
    told[1].0 = Digest::of(b"not these bytes");
    let chunks = as_chunks(&told);
    let file = WholeFile::of(whole.len() as u64, &chunks, || Some(d)).unwrap();
    cache.reslice(&file);

    let mut at = 0;
    for (i, (part, len)) in told.iter().enumerate() {
        let n = usize_from(*len);
        let got = cache.read(part, 0, n).unwrap();
        if i == 1 {
            assert_eq!(got, None, "a slice whose bytes fail its digest is a miss");
            assert!(!cache.contains(part), "and is dropped");
        } else {
            assert_eq!(got.as_deref(), Some(&whole[at..at + n]), "part {i}");
        }
        at += n;
    }
    // Checked once: the next read of a part is served from the object.
    assert_eq!(
        cache.read(&told[2].0, 10, 5).unwrap().unwrap(),
        &whole[at - n_of(&told[2]) + 10..at - n_of(&told[2]) + 15]
    );
    assert_eq!(cache.stats().corrupt, 1, "{:?}", cache.stats());
}
