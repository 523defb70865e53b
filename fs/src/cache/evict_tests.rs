//! The size bound, eviction, compaction, release and prune.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::*;

fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn put(cache: &Cache, data: &[u8]) -> Digest {
    let d = Digest::of(data);
    cache.insert(&d, data).unwrap();
    d
}

/// What the cache's files take on disk, as `du` counts it.
fn du(root: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![root.join("packs"), root.join("objects")];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dirs.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// The cache's own figure is real disk use, give or take the last block of
/// each pack (a pack's figure is its length).
fn assert_disk_use(root: &Path, counted: u64) {
    let real = du(root);
    assert!(
        real.abs_diff(counted) <= PACKS as u64 * 4096,
        "du {real} against counted {counted}"
    );
}

#[test]
fn the_bound_evicts_the_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    cache.set_max_bytes(1 << 20);
    let items: Vec<Vec<u8>> = (0..3).map(|i| content(300 * 1024, i)).collect();
    let ds: Vec<Digest> = items
        .iter()
        .map(|d| {
            cache.advance_clock(1);
            put(&cache, d)
        })
        .collect();
    cache.advance_clock(10);
    // The first is read again: now the second is the oldest.
    assert!(cache.read(&ds[0], 0, 10).unwrap().is_some());
    cache.advance_clock(10);
    let fourth = put(&cache, &content(300 * 1024, 3));

    assert!(!cache.contains(&ds[1]), "the least recently used went");
    assert!(cache.contains(&ds[0]) && cache.contains(&ds[2]) && cache.contains(&fourth));
    let s = cache.stats();
    assert_eq!((s.evictions, s.evicted_bytes), (1, 300 * 1024));
    assert!(s.disk_bytes <= 1 << 20, "{s:?}");
    assert_disk_use(dir.path(), s.disk_bytes);
    // Evicted: a miss, and it can come back.
    assert_eq!(cache.read(&ds[1], 0, 10).unwrap(), None);
    cache.insert(&ds[1], &items[1]).unwrap();
    assert_eq!(
        cache.read(&ds[1], 0, 300 * 1024).unwrap().unwrap(),
        items[1]
    );
}

#[test]
fn small_items_are_evicted_and_their_packs_compacted_under_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let max = 256 * 1024;
    cache.set_max_bytes(max);
    let items: Vec<Vec<u8>> = (0..200).map(|i| content(4000, i)).collect();
    for (i, item) in items.iter().enumerate() {
        put(&cache, item);
        if i % 20 == 0 {
            cache.advance_clock(1);
        }
        let s = cache.stats();
        assert!(s.disk_bytes <= max, "after item {i}: {s:?}");
    }
    let s = cache.stats();
    assert!(s.evictions > 100 && s.compactions > 0, "{s:?}");
    assert!(
        du(dir.path()) <= max + PACKS as u64 * 4096,
        "{}",
        du(dir.path())
    );
    // The newest are kept; whatever is there reads right.
    let last = items.last().unwrap();
    assert_eq!(
        cache.read(&Digest::of(last), 0, 4000).unwrap().unwrap(),
        *last
    );
    for item in &items {
        if let Some(got) = cache.read(&Digest::of(item), 0, item.len()).unwrap() {
            assert_eq!(got, *item);
        }
    }
    // And so it does after a restart (the packs were rewritten in place).
    drop(cache);
    let cache = Cache::open(dir.path()).unwrap();
    let mut found = 0;
    for item in &items {
        if let Some(got) = cache.read(&Digest::of(item), 0, item.len()).unwrap() {
            assert_eq!(got, *item);
            found += 1;
        }
    }
    assert!(found > 10);
    assert_eq!(cache.stats().corrupt, 0);
}

#[test]
fn readers_racing_eviction_never_see_a_wrong_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    // A tiny bound: a few of the items at a time.
    cache.set_max_bytes(200 * 1024);
    let items: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..40)
            .map(|i| content(if i % 2 == 0 { 3000 } else { 70_000 }, i))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..6u64 {
        let (cache, items, stop) = (cache.clone(), items.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let (mut hits, mut i) = (0u64, t);
            while !stop.load(Ordering::Relaxed) {
                // A stride prime to the count: every thread visits every
                // item, 7x the bound in all, so misses (and inserts, and
                // passes) go on for as long as the threads run.
                i = (i + 7) % items.len() as u64;
                let item = &items[usize_from(i)];
                let d = Digest::of(item);
                // Readers that miss fetch and insert, like the fetcher does.
                match cache.read(&d, 100, 500).unwrap() {
                    Some(got) => {
                        assert_eq!(got, item[100..600], "wrong bytes for item {i}");
                        hits += 1;
                    }
                    None => cache.insert(&d, item).unwrap(),
                }
            }
            hits
        }));
    }
    let cache2 = cache.clone();
    let pruner = std::thread::spawn(move || {
        for round in 0..50 {
            cache2.advance_clock(1);
            if round % 10 == 0 {
                cache2.prune(Some(&HashSet::new()));
            }
            std::thread::yield_now();
        }
    });
    pruner.join().unwrap();
    tarn_wait(
        || cache.stats().evictions > 200 && cache.stats().compactions > 5,
        || format!("{:?}", cache.stats()),
    );
    stop.store(true, Ordering::Relaxed);
    let hits: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(hits > 0);
    // Inserts that raced a pass's last look (after MAX_PASSES) skipped
    // theirs; the next call settles it.
    cache.set_max_bytes(200 * 1024);
    let s = cache.stats();
    assert!(s.disk_bytes <= 200 * 1024, "{s:?}");
    assert_disk_use(dir.path(), s.disk_bytes);
}

/// Waits until `f` holds (a failure bound, not a timing assertion).
fn tarn_wait(f: impl Fn() -> bool, state: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition never held: {}",
            state()
        );
        std::thread::yield_now();
    }
}

#[test]
fn released_entries_go_first_and_prune_frees_them() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let small = put(&cache, &content(1000, 1));
    let large = put(&cache, &content(100_000, 2));
    let kept = put(&cache, &content(100_000, 3));
    let shared = put(&cache, &content(2000, 4));
    assert_eq!(cache.release([&small, &large]), 101_000);
    assert_eq!(cache.stats().released_bytes, 101_000);

    let p = cache.prune(None);
    assert_eq!((p.entries, p.bytes), (2, 101_000));
    assert!(p.disk_after < p.disk_before);
    assert!(!cache.contains(&small) && !cache.contains(&large));
    assert!(cache.contains(&kept) && cache.contains(&shared));
    assert_eq!(cache.stats().released_bytes, 0);
    assert_disk_use(dir.path(), cache.stats().disk_bytes);

    // A read takes a released entry back into use.
    cache.release([&kept]);
    assert!(cache.read(&kept, 0, 1).unwrap().is_some());
    assert_eq!(cache.stats().released_bytes, 0);
    assert_eq!(cache.prune(None).entries, 0);

    // All unused: everything not kept goes.
    let keep: HashSet<Digest> = [shared].into_iter().collect();
    assert_eq!(cache.prune(Some(&keep)).entries, 1);
    assert!(cache.contains(&shared) && !cache.contains(&kept));
}

#[test]
fn a_held_object_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let held = put(&cache, &content(200_000, 1));
    let hold = cache.hold(&held);
    cache.release([&held]);
    cache.set_max_bytes(100_000);
    assert!(cache.contains(&held));
    assert_eq!(cache.prune(None).entries, 0);
    drop(hold);
    assert_eq!(cache.prune(None).entries, 1);
}

#[test]
fn access_order_and_releases_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, released);
    {
        let cache = Cache::open(dir.path()).unwrap();
        old = put(&cache, &content(100_000, 1));
        new = put(&cache, &content(100_000, 2));
        released = put(&cache, &content(100_000, 3));
        cache.advance_clock(100);
        assert!(cache.read(&new, 0, 1).unwrap().is_some());
        cache.release([&released]);
    }
    let cache = Cache::open(dir.path()).unwrap();
    assert_eq!(cache.stats().released_bytes, 100_000);
    // Room for about one: the released one goes, then the older.
    cache.set_max_bytes(150_000);
    assert!(!cache.contains(&released) && !cache.contains(&old));
    assert!(cache.contains(&new));
}

#[test]
fn evicting_what_was_just_used_puts_the_cache_under_pressure_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    cache.set_max_bytes(1 << 20);
    for i in 0..3 {
        put(&cache, &content(300 * 1024, i));
    }
    cache.advance_clock(evict::PRESSURE_SECS + 5);
    // Each new entry evicts one of yesterday's: the bound holds the
    // working set.
    for i in 3..6 {
        put(&cache, &content(300 * 1024, i));
        assert!(!cache.under_pressure(), "entry {i} evicted an old one only");
    }
    assert_eq!(cache.stats().evictions, 3);
    // The next evicts one just inserted: the bound is below the working set.
    put(&cache, &content(300 * 1024, 6));
    assert_eq!(cache.stats().evictions, 4);
    assert!(cache.under_pressure());
    // A prune takes what it is told to: it says nothing of the working set.
    cache.advance_clock(evict::PRESSURE_SECS + 1);
    assert!(!cache.under_pressure(), "pressure passes");
    cache.prune(Some(&HashSet::new()));
    assert!(!cache.under_pressure());
}
