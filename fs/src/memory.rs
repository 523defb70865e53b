//! The process's memory, seen from the allocator: glibc's malloc keeps what
//! a program frees for reuse, and a daemon that decodes a large TOC once
//! per layer would otherwise keep the decoding's peak for its lifetime
//! (issue 5: daemon memory per TOC entry). Both functions do nothing where
//! the C library is not glibc.

/// Largest allocation served from malloc's heaps; larger ones get their own
/// mapping, returned to the system when freed. Fixing it (glibc raises it
/// by itself, up to 32 MiB, each time a large block is freed) keeps FUSE's
/// 16 MiB request buffers (one per worker thread, almost never written past
/// their first page) out of the heaps, where `calloc` would have to zero,
/// and so make resident, all of each. 4 MiB stays above the largest FUSE
/// read (1 MiB), so the hot read path still reuses heap memory.
pub const MMAP_THRESHOLD: usize = 4 << 20;

/// Tunes malloc for a long-running daemon. Call first thing in `main`,
/// before any thread starts. False if malloc refused.
///
/// Besides the [`MMAP_THRESHOLD`], malloc gets one arena per CPU instead of
/// eight: the daemon runs five threads per mounted layer, and each arena
/// keeps free memory of its own.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cpus).unwrap_or(libc::c_int::MAX);
        let threshold = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc parameter; it is safe to call
        // at any time (and here no other thread exists yet).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) == 1
                && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

/// Returns malloc's free pages to the system: worth it after a burst of
/// short-lived allocations (decoding a TOC), whose pages malloc would
/// otherwise keep.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks malloc's own free lists under its
        // locks; it is thread-safe and touches no memory the program holds.
        unsafe { libc::malloc_trim(0) };
    }
}
