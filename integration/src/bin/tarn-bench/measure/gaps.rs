//! The break-even of carrying a cached chunk inside a ranged GET (issue 16):
//! two wanted ranges of `WANT` bytes with a gap of `g` bytes between them,
//! fetched either as one GET that carries the gap or as two GETs sent at
//! once (what `fetch/plan.rs` does beyond `MAX_GAP`), through tarn's own
//! registry client, against the registry or far proxy the bench started.
//!
//! Each gap is timed `reps` times in each shape, alternating which goes
//! first, at offsets that walk through the blob; the facts are the median
//! times (`merged_ms_<KiB>`, `split_ms_<KiB>`) and `break_even_bytes`: the
//! gap at which splitting starts to pay (linear between the two gaps
//! measured on each side; the largest gap measured, doubled, if it never
//! does; 0 if it always does).

use std::ops::Range;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tarn_fs::registry::{Reference, RegistryClient, RegistryConfig, Repository};
use tarn_fs::{Digest, Intent};

use crate::runs::Facts;

/// The bytes of each wanted range: a typical small-file chunk run.
const WANT: u64 = 64 << 10;
/// Gaps measured, in KiB.
const GAPS_KIB: &[u64] = &[4, 16, 32, 64, 128, 256, 512, 1024, 2048];

/// Times the two shapes on the largest layer of `image` (a `host/repo:tag`
/// reference: the bench's registry or its far proxy).
pub fn gaps(image: &str, plain_http: bool, reps: usize) -> Result<Facts> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    runtime.block_on(measure(image, plain_http, reps.max(1)))
}

async fn measure(image: &str, plain_http: bool, reps: usize) -> Result<Facts> {
    let reference: Reference = image
        .parse()
        .with_context(|| format!("bad image reference {image}"))?;
    let mut config = RegistryConfig::default();
    if plain_http {
        config
            .plain_http
            .push(reference.repository.registry.clone());
    }
    let client = RegistryClient::new(config)?;
    let resolved = client.resolve(&reference).await?;
    let Some(layer) = resolved.layers.iter().max_by_key(|l| l.size) else {
        bail!("{image} has no layers");
    };
    let span = 2 * WANT + GAPS_KIB.iter().max().copied().unwrap_or(0) * 1024;
    if layer.size < 2 * span {
        bail!(
            "the largest layer of {image} has {} bytes: too small for gaps up to {span} bytes",
            layer.size
        );
    }
    let blob = Blob {
        client: &client,
        repo: &reference.repository,
        digest: &layer.digest,
    };
    // Two connections open before anything is timed (the split shape uses
    // two at once).
    blob.split(0..WANT, WANT..2 * WANT).await?;

    let mut facts = Facts::default();
    let mut offset = 0u64;
    let mut medians = Vec::new();
    for &kib in GAPS_KIB {
        let gap = kib * 1024;
        let (mut merged, mut split) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            // A different place of the blob each time.
            offset = (offset + span) % (layer.size - span);
            let a = offset..offset + WANT;
            let b = a.end + gap..a.end + gap + WANT;
            if rep % 2 == 0 {
                merged.push(blob.merged(a.start..b.end).await?);
                split.push(blob.split(a, b).await?);
            } else {
                split.push(blob.split(a.clone(), b.clone()).await?);
                merged.push(blob.merged(a.start..b.end).await?);
            }
        }
        let (m, s) = (median(merged), median(split));
        facts.push(&format!("merged_ms_{kib:04}k"), m);
        facts.push(&format!("split_ms_{kib:04}k"), s);
        medians.push((gap, s - m));
    }
    facts.push("break_even_bytes", break_even(&medians));
    facts.push("want_bytes", num(WANT));
    Ok(facts)
}

struct Blob<'a> {
    client: &'a RegistryClient,
    repo: &'a Repository,
    digest: &'a Digest,
}

impl Blob<'_> {
    /// One GET of `range`: milliseconds.
    async fn merged(&self, range: Range<u64>) -> Result<f64> {
        let start = Instant::now();
        self.get(range).await?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// Two GETs sent at once: milliseconds until both are in.
    async fn split(&self, a: Range<u64>, b: Range<u64>) -> Result<f64> {
        let start = Instant::now();
        let (x, y) = tokio::join!(self.get(a), self.get(b));
        x?;
        y?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    async fn get(&self, range: Range<u64>) -> Result<()> {
        self.client
            .read_range(self.repo, self.digest, range, Intent::OnDemand)
            .await
            .with_context(|| format!("cannot read blob {}", self.digest))?;
        Ok(())
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get((xs.len().saturating_sub(1)) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

#[allow(clippy::cast_precision_loss)]
fn num(x: u64) -> f64 {
    x as f64
}

/// The gap at which splitting starts to pay, from (gap, split - merged)
/// in increasing gap order: linear between the last gap where carrying
/// was cheaper and the next one.
fn break_even(points: &[(u64, f64)]) -> f64 {
    let Some(first) = points.iter().position(|&(_, d)| d <= 0.0) else {
        return points.last().map_or(0.0, |&(g, _)| num(g) * 2.0);
    };
    if first == 0 {
        return 0.0;
    }
    let (g0, d0) = points[first - 1];
    let (g1, d1) = points[first];
    let (g0, g1) = (num(g0), num(g1));
    // d0 > 0 >= d1.
    g0 + (g1 - g0) * d0 / (d0 - d1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn break_even_interpolates_between_the_gaps_either_side_of_the_crossing() {
        let points = [(4096, 2.0), (16384, 1.0), (32768, -1.0)];
        assert_eq!(break_even(&points), 16384.0 + 16384.0 * 0.5);
        assert_eq!(break_even(&[(4096, -0.1), (8192, -1.0)]), 0.0);
        assert_eq!(break_even(&[(4096, 0.5), (8192, 1.0)]), 16384.0);
    }
}
