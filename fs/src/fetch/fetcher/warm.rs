//! Bringing chunks into the cache ahead of reads: `warm` and its
//! speculative form, `warm_for`, admitted within the link's budget.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

use super::{Admission, FetchError, Fetcher};
use crate::Intent;
use crate::fetch::hints::Hint;
use crate::fetch::plan::merge_adjacent;
use crate::fetch::scheduler::Permit;
use crate::format::Chunk;

impl Fetcher {
    /// [`Fetcher::warm`] with `Intent::Prefetch` for `hint`: the chunks
    /// neither cached nor on the wire are noted for its hit rate, then
    /// fetched within the link's speculation budget. Nothing while the
    /// cache thrashes ([`Cache::under_pressure`](crate::cache::Cache::under_pressure)):
    /// reads fetch what they need.
    pub async fn warm_for(&self, hint: Hint, chunks: &[Chunk]) -> Result<usize, FetchError> {
        if self.inner.cache.under_pressure() {
            tracing::debug!(
                hint = hint.name(),
                chunks = chunks.len(),
                "cache under pressure: no prefetch"
            );
            return Ok(0);
        }
        let fresh: Vec<Chunk> = chunks
            .iter()
            .filter(|c| !self.inner.cache.contains(&c.digest) && !self.in_flight(&c.digest))
            .copied()
            .collect();
        self.speculating(hint, &fresh);
        tracing::debug!(
            hint = hint.name(),
            blob = self.inner.source.size(),
            from = fresh.first().map_or(0, |c| c.blob_range.0),
            to = fresh.last().map_or(0, |c| c.blob_range.1),
            chunks = fresh.len(),
            "prefetch asked"
        );
        self.warm(chunks, Intent::Prefetch).await
    }

    /// Brings `chunks` into the cache: those not cached yet are fetched
    /// (adjacent ones merged), those another fetch is producing are waited
    /// for. Returns how many chunks were fetched by this call, or the first
    /// error (the other chunks are still fetched and cached).
    ///
    /// For `Intent::Background` the scheduler's admission is taken *before*
    /// the flights are registered, so an on-demand reader never joins a
    /// flight that is paused behind it.
    pub async fn warm(&self, chunks: &[Chunk], intent: Intent) -> Result<usize, FetchError> {
        self.warm_admitted(chunks, intent, None).await
    }

    /// [`Fetcher::warm`] with the scheduler's admission already in hand
    /// (`permit`), for callers that pace themselves on admission.
    pub async fn warm_admitted(
        &self,
        chunks: &[Chunk],
        intent: Intent,
        permit: Option<Permit>,
    ) -> Result<usize, FetchError> {
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<Chunk> = chunks
            .iter()
            .filter(|c| seen.insert(c.digest) && !self.inner.cache.contains(&c.digest))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        // A speculative warm is cut into GETs of the link's speculative
        // size, each admitted within its budget *before* its flights are
        // registered: a reader never joins a flight that waits for room,
        // it fetches the chunk itself, on demand.
        let batches: Vec<(Vec<Chunk>, Option<Permit>)> = match (intent, permit) {
            (_, Some(p)) => vec![(missing, Some(p))],
            (Intent::Background | Intent::Prefetch, None) => {
                let size = self.inner.scheduler.speculative_get();
                merge_adjacent(missing, size)
                    .into_iter()
                    .map(|g| (g.chunks, None))
                    .collect()
            }
            (_, None) => vec![(missing, None)],
        };
        let mut waits = Vec::new();
        let mut led = 0;
        for (batch, permit) in batches {
            let permit = match (intent, permit) {
                (_, Some(p)) => Some(p),
                (Intent::Background | Intent::Prefetch, None) => {
                    // Fetched meanwhile (by a read, say): nothing to admit.
                    let batch: Vec<&Chunk> = batch
                        .iter()
                        .filter(|c| !self.inner.cache.contains(&c.digest))
                        .collect();
                    let bytes = batch
                        .iter()
                        .map(|c| c.blob_range.1.saturating_sub(c.blob_range.0))
                        .sum();
                    if bytes == 0 {
                        continue;
                    }
                    Some(self.inner.scheduler.admit(intent, bytes).await)
                }
                (_, None) => None,
            };
            let mut lead = Vec::new();
            for c in &batch {
                match self.inner.inflight.entry(c.digest) {
                    Entry::Occupied(e) => waits.push((c.digest, e.get().subscribe())),
                    Entry::Vacant(e) => {
                        let (tx, rx) = watch::channel(None);
                        e.insert(Arc::new(tx));
                        waits.push((c.digest, rx));
                        lead.push(*c);
                    }
                }
            }
            led += lead.len();
            if !lead.is_empty() {
                let admission = match permit {
                    Some(p) => Admission::Taken(p),
                    None => Admission::Ask,
                };
                tokio::spawn(self.inner.clone().run_flights(lead, intent, admission));
            }
        }
        let mut first_err = None;
        for (digest, mut rx) in waits {
            let res = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().expect("waited for Some").map(|_| ()),
                Err(_) => Err(FetchError::Abandoned(digest)),
            };
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(led),
        }
    }
}
