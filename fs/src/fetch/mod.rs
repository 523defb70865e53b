//! The fetch scheduler: turns "these chunks, for this reason" into verified
//! plain bytes, from the cache when it has them, from the blob otherwise.
//!
//! - one cache lookup per miss: the caller looked (the layer's read plan,
//!   answering hits inline on the FUSE thread), so a fetch goes straight to
//!   its flights; a new flight re-checks the cache once (an index lookup),
//!   which closes the race with a flight that finished after the lookup;
//! - singleflight per chunk digest: concurrent misses of one chunk share one
//!   fetch and its result, success or error;
//! - adjacent misses of one request are merged into one ranged GET (up to
//!   [`MAX_MERGED_GET`]), then split, decoded and verified chunk by chunk as
//!   the body streams in (a chunk a reader waits for is handed over as soon
//!   as its bytes are in, so read-ahead at the end of a GET costs the reader
//!   nothing); a chunk failing verification is an error for its readers and
//!   is never cached, the rest of the GET still is;
//! - every request carries its [`Intent`](crate::Intent) down to the
//!   [`BlobSource`](crate::registry::BlobSource), and
//!   the process-wide [`FetchScheduler`] admits it by that intent, per
//!   registry host: reads at once; speculative bytes (prefetch, read-ahead,
//!   background) within what the measured link carries in one round trip;
//!   background also paused while foreground GETs run, bounded in
//!   concurrency and optionally in rate;
//! - what each hint fetched and what reads used of it is counted
//!   ([`HintStats`]), for its hit rate.

mod fetcher;
mod hints;
mod open;
mod plan;
mod scheduler;
mod stats;

pub use fetcher::{FetchError, Fetcher, MAX_CHUNK_RANGE, MAX_MERGED_GET};
pub use hints::{Hint, HintCount, HintCounts, HintStats};
pub use open::OpenError;
pub use plan::MAX_GAP;
pub use scheduler::{FetchScheduler, Permit, SchedulerConfig};
pub use stats::{FetchStats, FetchStatsSnapshot};
