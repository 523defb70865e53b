//! The report: records written by scripts/bench.sh (one JSON object per
//! line) become a table of measurements, ratios against the baselines of the
//! same run, and the targets of issue 5 (and those of issues 16, 17, 18
//! and 20) with PASS/FAIL. A scenario variant that failed shows FAILED
//! with its reason, never a number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One measured variant of one scenario under one network profile.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Record {
    pub profile: String,
    pub scenario: String,
    pub variant: String,
    pub ok: bool,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The value must be at most the target.
    Le,
    /// The value must be at least the target.
    Ge,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
    /// A variant it needs did not run to the end.
    Failed {
        reason: String,
    },
    /// No target for this profile: the figure is shown for information.
    Info,
}

/// A figure derived from records, with its target when the issue sets one
/// for this profile.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub scenario: String,
    pub profile: String,
    pub name: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub op: Op,
    pub target: Option<f64>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The targets of issues 5, 16 and 20, and the profiles each applies to (none
/// named: every profile the scenario ran in). A NaN target: the figure is
/// shown for information (issue 15's overlaybd comparisons, G1).
struct Spec {
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    op: Op,
    target: f64,
    target_profiles: &'static [&'static str],
    /// Computes the value from the scenario's variants in one profile;
    /// `Err(variant)` names a variant that is missing or failed.
    value: fn(&Variants) -> Result<f64, String>,
}

type Variants<'a> = BTreeMap<&'a str, &'a Record>;

/// Variants run only when asked for (`tarn-base`: another build's
/// binaries): a figure that needs one that did not run is left out, not
/// FAILED.
const ON_REQUEST: &[&str] = &["tarn-base"];

fn metric(v: &Variants, variant: &str, name: &str) -> Result<f64, String> {
    let r = v
        .get(variant)
        .ok_or_else(|| format!("{variant}: not run"))?;
    if !r.ok {
        return Err(format!(
            "{variant}: {}",
            r.reason.as_deref().unwrap_or("failed")
        ));
    }
    r.metrics
        .get(name)
        .copied()
        .ok_or_else(|| format!("{variant}: no {name} measured"))
}

fn ratio(v: &Variants, a: &str, b: &str, name: &str) -> Result<f64, String> {
    let x = metric(v, a, name)?;
    let y = metric(v, b, name)?;
    if y <= 0.0 {
        return Err(format!("{b}: {name} is zero"));
    }
    Ok(x / y)
}

const SPECS: &[Spec] = &[
    Spec {
        scenario: "S1",
        name: "tarn / overlayfs pull+run time",
        unit: "x",
        op: Op::Le,
        target: 0.15,
        target_profiles: &["rtt100"],
        value: |v| ratio(v, "tarn", "overlayfs", "secs"),
    },
    Spec {
        scenario: "S1",
        name: "tarn pull+run time",
        unit: "s",
        op: Op::Le,
        target: 2.5,
        target_profiles: &["rtt100"],
        value: |v| metric(v, "tarn", "secs"),
    },
    Spec {
        scenario: "S1",
        name: "tarn optimized pull+run time",
        unit: "s",
        op: Op::Le,
        target: 1.2,
        target_profiles: &["rtt100"],
        value: |v| metric(v, "tarn-opt", "secs"),
    },
    // Issue 18: `tarn optimize`'s image against ctr-remote's, same run.
    Spec {
        scenario: "S1",
        name: "tarn optimize / ctr-remote optimize pull+run time",
        unit: "x",
        op: Op::Le,
        target: 1.0,
        target_profiles: &["rtt100"],
        value: |v| ratio(v, "tarn-topt", "tarn-opt", "secs"),
    },
    // Issue 18: the plain image with its start profile from the registry,
    // on a fresh node, against the optimized image, same run.
    Spec {
        scenario: "S1",
        name: "tarn start profile / optimized pull+run time",
        unit: "x",
        op: Op::Le,
        target: 1.2,
        target_profiles: &["rtt100"],
        value: |v| ratio(v, "tarn-prof", "tarn-opt", "secs"),
    },
    Spec {
        scenario: "S1",
        name: "tarn / overlayfs registry bytes",
        unit: "x",
        op: Op::Le,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn", "overlayfs", "bytes"),
    },
    // Issue 20: on thin links speculation pays for itself. The baseline
    // fetches nothing ahead of reads (`[fetch] speculate = false`): its
    // registry bytes are what the workload reads (the chunks it touched,
    // plus the layers' indexes every lazy pull fetches).
    Spec {
        scenario: "S1",
        name: "tarn / no-speculation registry bytes",
        unit: "x",
        op: Op::Le,
        target: 1.3,
        target_profiles: &["thin40", "thin100"],
        value: |v| ratio(v, "tarn", "tarn-nospec", "bytes"),
    },
    Spec {
        scenario: "S1",
        name: "tarn / no-speculation pull+run time",
        unit: "x",
        op: Op::Le,
        target: 0.8,
        target_profiles: &["thin40", "thin100"],
        value: |v| ratio(v, "tarn", "tarn-nospec", "secs"),
    },
    // Issue 20: what thin links gained must not cost the 100 Mbit/s
    // profiles. `tarn-base` is another build (`BENCH_BASE_BIN_DIR`), run
    // on request in the same run; "no slower" within the noise of a
    // median of three.
    Spec {
        scenario: "S1",
        name: "tarn / base build pull+run time",
        unit: "x",
        op: Op::Le,
        target: 1.1,
        target_profiles: &["loopback", "rtt50", "rtt100", "rtt200"],
        value: |v| {
            // Asked of the base first: not run, it is left out.
            metric(v, "tarn-base", "secs")?;
            ratio(v, "tarn", "tarn-base", "secs")
        },
    },
    Spec {
        scenario: "S2",
        name: "background fetch / link capacity",
        unit: "x",
        op: Op::Ge,
        target: 0.9,
        target_profiles: &["rtt200"],
        value: |v| {
            let bytes = metric(v, "tarn-background", "bytes")?;
            let rate = metric(v, "tarn-background", "rate_mbit")?;
            let secs = metric(v, "tarn-background", "secs")?;
            Ok(bytes * 8.0 / (rate * 1e6) / secs)
        },
    },
    Spec {
        scenario: "S2",
        name: "background fetch / skopeo copy time",
        unit: "x",
        op: Op::Le,
        target: 1.0,
        target_profiles: &["rtt200"],
        value: |v| ratio(v, "tarn-background", "skopeo", "secs"),
    },
    Spec {
        scenario: "S3",
        name: "tarn 20 pulls / 1 pull time",
        unit: "x",
        op: Op::Le,
        target: 1.3,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-20", "tarn-1", "secs"),
    },
    Spec {
        scenario: "S3",
        name: "tarn 20 pulls / 1 pull registry bytes",
        unit: "x",
        op: Op::Le,
        target: 1.05,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-20", "tarn-1", "bytes"),
    },
    Spec {
        scenario: "S3",
        name: "overlayfs 20 pulls / 1 pull time",
        unit: "x",
        op: Op::Le,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "overlayfs-20", "overlayfs-1", "secs"),
    },
    Spec {
        scenario: "S3",
        name: "overlayfs 20 pulls / 1 pull registry bytes",
        unit: "x",
        op: Op::Le,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "overlayfs-20", "overlayfs-1", "bytes"),
    },
    Spec {
        scenario: "S4",
        name: "cached 1 GiB read, tarn / overlayfs throughput",
        unit: "x",
        op: Op::Ge,
        target: 0.8,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn", "read-overlayfs", "mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "walk+stat of 50k files, tarn / overlayfs rate",
        unit: "x",
        op: Op::Ge,
        target: 0.5,
        target_profiles: &[],
        value: |v| ratio(v, "walk-tarn", "walk-overlayfs", "entries_per_s"),
    },
    // Issue 18: what access recording (a first start recorded for its
    // start profile) costs cached reads, against tarn without it.
    Spec {
        scenario: "S4",
        name: "cached 1 GiB read, recording on / off",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn-rec", "read-tarn", "mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "walk+stat of 50k files, recording on / off",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "walk-tarn-rec", "walk-tarn", "entries_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, caches dropped, recording on / off",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn-rec", "read-tarn", "cold_mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, overlaybd / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn-obd", "read-overlayfs", "mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, obd buffered loop / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn-obd-buffered", "read-overlayfs", "mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, caches dropped, tarn / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn", "read-overlayfs", "cold_mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, caches dropped, overlaybd / ovl",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn-obd", "read-overlayfs", "cold_mb_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, dropped, obd buffered loop / ovl",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| {
            ratio(
                v,
                "read-tarn-obd-buffered",
                "read-overlayfs",
                "cold_mb_per_s",
            )
        },
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, dropped: page cache, tarn / ovl",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn", "read-overlayfs", "cold_page_cache_mb"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, dropped: page cache, overlaybd / ovl",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "read-tarn-obd", "read-overlayfs", "cold_page_cache_mb"),
    },
    Spec {
        scenario: "S4",
        name: "1 GiB read, dropped: page cache, buffered / ovl",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| {
            ratio(
                v,
                "read-tarn-obd-buffered",
                "read-overlayfs",
                "cold_page_cache_mb",
            )
        },
    },
    Spec {
        scenario: "S4",
        name: "walk 50k files, overlaybd / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "walk-tarn-obd", "walk-overlayfs", "entries_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "walk 50k files, obd buffered loop / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| {
            ratio(
                v,
                "walk-tarn-obd-buffered",
                "walk-overlayfs",
                "entries_per_s",
            )
        },
    },
    Spec {
        scenario: "S4",
        name: "walk, caches dropped, tarn / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "walk-tarn", "walk-overlayfs", "cold_entries_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "walk, caches dropped, overlaybd / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "walk-tarn-obd", "walk-overlayfs", "cold_entries_per_s"),
    },
    Spec {
        scenario: "S4",
        name: "walk, dropped, obd buffered loop / overlayfs",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| {
            ratio(
                v,
                "walk-tarn-obd-buffered",
                "walk-overlayfs",
                "cold_entries_per_s",
            )
        },
    },
    Spec {
        scenario: "S6",
        name: "overlaybd / overlayfs pull+run time",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-obd", "overlayfs", "secs"),
    },
    Spec {
        scenario: "S6",
        name: "obd buffered loop / overlayfs pull+run time",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-obd-buffered", "overlayfs", "secs"),
    },
    Spec {
        scenario: "S6",
        name: "eStargz / overlayfs pull+run time",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-esgz", "overlayfs", "secs"),
    },
    Spec {
        scenario: "S6",
        name: "overlaybd / eStargz pull+run time",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-obd", "tarn-esgz", "secs"),
    },
    Spec {
        scenario: "S6",
        name: "overlaybd / overlayfs registry bytes",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-obd", "overlayfs", "bytes"),
    },
    Spec {
        scenario: "S6",
        name: "eStargz / overlayfs registry bytes",
        unit: "x",
        op: Op::Ge,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "tarn-esgz", "overlayfs", "bytes"),
    },
    Spec {
        scenario: "S5",
        name: "daemon RSS per TOC entry",
        unit: "B",
        op: Op::Le,
        target: 300.0,
        target_profiles: &[],
        value: |v| {
            let rss = metric(v, "tarn", "rss_bytes")?;
            let entries = metric(v, "tarn", "toc_entries")?;
            if entries <= 0.0 {
                return Err("tarn: no TOC entries mounted".into());
            }
            Ok(rss / entries)
        },
    },
    Spec {
        scenario: "P7",
        name: "2nd image after the 1st / alone, registry bytes",
        unit: "x",
        op: Op::Le,
        target: 0.3,
        target_profiles: &[],
        value: |v| ratio(v, "b-after-a", "b-alone", "bytes"),
    },
    Spec {
        scenario: "P7",
        name: "cache disk / unique bytes of both images",
        unit: "x",
        op: Op::Le,
        target: 1.05,
        target_profiles: &[],
        value: |v| {
            let disk = metric(v, "b-after-a", "cache_disk_bytes")?;
            let unique = metric(v, "b-after-a", "unique_bytes")?;
            if unique <= 0.0 {
                return Err("b-after-a: no chunk of either image cached".into());
            }
            Ok(disk / unique)
        },
    },
    // Issue 17: N nodes starting one image at once through one far link.
    Spec {
        scenario: "S7",
        name: "peers on: registry bytes / one node's lazy bytes",
        unit: "x",
        op: Op::Le,
        target: 1.2,
        target_profiles: &["rtt100"],
        value: |v| ratio(v, "peers-on", "alone", "bytes"),
    },
    Spec {
        scenario: "S7",
        name: "peers on: slowest node / one node alone",
        unit: "x",
        op: Op::Le,
        target: 1.5,
        target_profiles: &["rtt100"],
        value: |v| ratio(v, "peers-on", "alone", "secs"),
    },
    Spec {
        scenario: "S7",
        name: "peers off: registry bytes / one node's lazy bytes",
        unit: "x",
        op: Op::Le,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "peers-off", "alone", "bytes"),
    },
    Spec {
        scenario: "S7",
        name: "peers off: slowest node / one node alone",
        unit: "x",
        op: Op::Le,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| ratio(v, "peers-off", "alone", "secs"),
    },
    Spec {
        scenario: "G1",
        name: "gap a GET should carry rather than split (KiB)",
        unit: "",
        op: Op::Le,
        target: f64::NAN,
        target_profiles: &[],
        value: |v| Ok(metric(v, "gets", "break_even_bytes")? / 1024.0),
    },
];

/// Every check whose scenario ran in a profile.
pub fn checks(records: &[Record]) -> Vec<Check> {
    let mut groups: BTreeMap<(&str, &str), Variants> = BTreeMap::new();
    for r in records {
        groups
            .entry((r.scenario.as_str(), r.profile.as_str()))
            .or_default()
            .insert(r.variant.as_str(), r);
    }
    let mut out = Vec::new();
    for ((scenario, profile), variants) in &groups {
        for spec in SPECS.iter().filter(|s| s.scenario == *scenario) {
            let applies = !spec.target.is_nan()
                && (spec.target_profiles.is_empty() || spec.target_profiles.contains(profile));
            let (value, verdict) = match (spec.value)(variants) {
                Ok(x) if !applies => (Some(x), Verdict::Info),
                Ok(x) => {
                    let pass = match spec.op {
                        Op::Le => x <= spec.target,
                        Op::Ge => x >= spec.target,
                    };
                    (Some(x), if pass { Verdict::Pass } else { Verdict::Fail })
                }
                Err(reason) if ON_REQUEST.iter().any(|v| reason == format!("{v}: not run")) => {
                    continue;
                }
                Err(reason) => (None, Verdict::Failed { reason }),
            };
            out.push(Check {
                scenario: scenario.to_string(),
                profile: profile.to_string(),
                name: spec.name.to_string(),
                value,
                unit: spec.unit,
                op: spec.op,
                target: applies.then_some(spec.target),
                verdict,
            });
        }
    }
    out
}

fn fmt_metric(name: &str, x: f64) -> String {
    match name {
        _ if name == "bytes" || name.ends_with("_bytes") => format!("{name}={:.1}MB", x / 1e6),
        "secs" => format!("{x:.2}s"),
        _ if x.fract() == 0.0 && x.abs() < 1e15 => format!("{name}={x:.0}"),
        _ => format!("{name}={x:.2}"),
    }
}

/// The table printed at the end of `make bench`.
pub fn render(records: &[Record], checks: &[Check]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nMeasurements");
    let _ = writeln!(s, "{:<9} {:<3} {:<16} RESULT", "PROFILE", "", "VARIANT");
    for r in records {
        let result = if r.ok {
            // secs first, the rest in name order.
            let mut parts: Vec<String> = r
                .metrics
                .get("secs")
                .map(|x| fmt_metric("secs", *x))
                .into_iter()
                .collect();
            parts.extend(
                r.metrics
                    .iter()
                    .filter(|(k, _)| *k != "secs")
                    .map(|(k, x)| fmt_metric(k, *x)),
            );
            parts.join("  ")
        } else {
            format!(
                "FAILED: {}",
                r.reason.as_deref().unwrap_or("no reason given")
            )
        };
        let _ = writeln!(
            s,
            "{:<9} {:<3} {:<16} {}",
            r.profile, r.scenario, r.variant, result
        );
    }
    let _ = writeln!(
        s,
        "\nTargets (issues 5, 16, 17, 18, 20), ratios against baselines measured in this run"
    );
    let _ = writeln!(
        s,
        "{:<3} {:<9} {:<48} {:>10} {:>9}  VERDICT",
        "", "PROFILE", "FIGURE", "VALUE", "TARGET"
    );
    for c in checks {
        let value = c
            .value
            .map_or("-".to_string(), |x| format!("{x:.3}{}", c.unit));
        let target = c.target.map_or("-".to_string(), |t| {
            let op = if c.op == Op::Le { "<=" } else { ">=" };
            format!("{op}{t}{}", c.unit)
        });
        let verdict = match &c.verdict {
            Verdict::Pass => "PASS".to_string(),
            Verdict::Fail => "FAIL".to_string(),
            Verdict::Info => "info".to_string(),
            Verdict::Failed { reason } => format!("FAILED ({reason})"),
        };
        let _ = writeln!(
            s,
            "{:<3} {:<9} {:<48} {:>10} {:>9}  {verdict}",
            c.scenario, c.profile, c.name, value, target
        );
    }
    let count = |f: fn(&Verdict) -> bool| checks.iter().filter(|c| f(&c.verdict)).count();
    let _ = writeln!(
        s,
        "\n{} PASS, {} FAIL, {} FAILED (could not be measured)",
        count(|v| *v == Verdict::Pass),
        count(|v| *v == Verdict::Fail),
        count(|v| matches!(v, Verdict::Failed { .. })),
    );
    s
}

pub fn parse_records(text: &str) -> Result<Vec<Record>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("bad record on line {}", i + 1))
        })
        .collect()
}

/// Every figure with a target passed.
pub fn all_pass(checks: &[Check]) -> bool {
    checks
        .iter()
        .all(|c| c.target.is_none() || c.verdict == Verdict::Pass)
}

/// Reads the records, writes results.json next to nothing else, returns the
/// table and whether every figure with a target passed.
pub fn run(records_path: &Path, out: &Path) -> Result<(String, bool)> {
    let text = std::fs::read_to_string(records_path)
        .with_context(|| format!("cannot read records {}", records_path.display()))?;
    let records = parse_records(&text)?;
    let checks = checks(&records);
    let doc = json!({ "records": records, "checks": checks });
    let body = serde_json::to_string_pretty(&doc).context("cannot encode results")?;
    std::fs::write(out, body + "\n").with_context(|| format!("cannot write {}", out.display()))?;
    Ok((render(&records, &checks), all_pass(&checks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(profile: &str, scenario: &str, variant: &str, metrics: &[(&str, f64)]) -> Record {
        Record {
            profile: profile.into(),
            scenario: scenario.into(),
            variant: variant.into(),
            ok: true,
            reason: None,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn find<'a>(checks: &'a [Check], profile: &str, name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.profile == profile && c.name == name)
            .expect("check present")
    }

    #[test]
    fn s1_targets_apply_at_rtt100_only() {
        let records = vec![
            rec(
                "rtt100",
                "S1",
                "overlayfs",
                &[("secs", 20.0), ("bytes", 151e6)],
            ),
            rec("rtt100", "S1", "tarn", &[("secs", 2.0), ("bytes", 7e6)]),
            rec("loopback", "S1", "overlayfs", &[("secs", 7.0)]),
            rec("loopback", "S1", "tarn", &[("secs", 2.0)]),
        ];
        let c = checks(&records);
        let far = find(&c, "rtt100", "tarn / overlayfs pull+run time");
        assert_eq!(far.verdict, Verdict::Pass);
        assert!((far.value.expect("value") - 0.1).abs() < 1e-9);
        assert_eq!(
            find(&c, "rtt100", "tarn pull+run time").verdict,
            Verdict::Pass
        );
        // 2/7 would fail 0.15 but loopback has no target.
        assert_eq!(
            find(&c, "loopback", "tarn / overlayfs pull+run time").verdict,
            Verdict::Info
        );
        // Bytes ratio is informative everywhere.
        assert_eq!(
            find(&c, "rtt100", "tarn / overlayfs registry bytes").verdict,
            Verdict::Info
        );
    }

    #[test]
    fn a_base_build_is_compared_when_it_ran_and_left_out_when_not() {
        const NAME: &str = "tarn / base build pull+run time";
        let mut records = vec![
            rec("rtt50", "S1", "tarn", &[("secs", 2.4)]),
            rec("rtt50", "S1", "tarn-base", &[("secs", 2.0)]),
            rec("loopback", "S1", "tarn", &[("secs", 1.0)]),
            rec("loopback", "S1", "tarn-base", &[("secs", 1.05)]),
            rec("thin40", "S1", "tarn", &[("secs", 4.0)]),
            rec("thin40", "S1", "tarn-base", &[("secs", 3.0)]),
        ];
        let c = checks(&records);
        assert_eq!(
            find(&c, "rtt50", NAME).verdict,
            Verdict::Fail,
            "1.1x slower"
        );
        assert_eq!(find(&c, "loopback", NAME).verdict, Verdict::Pass);
        assert_eq!(find(&c, "thin40", NAME).verdict, Verdict::Info);
        records.retain(|r| r.variant != "tarn-base");
        let c = checks(&records);
        assert!(c.iter().all(|c| c.name != NAME), "not asked for: not shown");
        // A base run that failed is FAILED, like any variant.
        let mut base = rec("rtt50", "S1", "tarn-base", &[]);
        base.ok = false;
        records.push(base);
        let c = checks(&records);
        assert!(matches!(
            find(&c, "rtt50", NAME).verdict,
            Verdict::Failed { .. }
        ));
    }

    #[test]
    fn a_failed_variant_is_failed_with_its_reason_not_a_number() {
        let mut tarn = rec("rtt100", "S1", "tarn", &[]);
        tarn.ok = false;
        tarn.reason = Some("ctr run exited 1".into());
        let records = vec![rec("rtt100", "S1", "overlayfs", &[("secs", 20.0)]), tarn];
        let c = checks(&records);
        let check = find(&c, "rtt100", "tarn / overlayfs pull+run time");
        assert_eq!(check.value, None);
        assert_eq!(
            check.verdict,
            Verdict::Failed {
                reason: "tarn: ctr run exited 1".into()
            }
        );
        // The optimized variant never ran.
        let opt = find(&c, "rtt100", "tarn optimized pull+run time");
        assert_eq!(
            opt.verdict,
            Verdict::Failed {
                reason: "tarn-opt: not run".into()
            }
        );
        let table = render(&records, &c);
        assert!(table.contains("FAILED: ctr run exited 1"), "{table}");
        assert!(table.contains("0 PASS, 0 FAIL, 8 FAILED"), "{table}");
        assert!(
            !all_pass(&c),
            "a figure that could not be measured did not pass"
        );
    }

    #[test]
    fn ge_targets_and_derived_figures() {
        let records = vec![
            rec(
                "rtt200",
                "S2",
                "tarn-background",
                &[("bytes", 125e6), ("rate_mbit", 100.0), ("secs", 12.5)],
            ),
            rec("rtt200", "S2", "skopeo", &[("secs", 10.0)]),
            rec(
                "local",
                "S5",
                "tarn",
                &[("rss_bytes", 30e6), ("toc_entries", 50_000.0)],
            ),
            rec("local", "S4", "read-tarn", &[("mb_per_s", 900.0)]),
            rec("local", "S4", "read-overlayfs", &[("mb_per_s", 1000.0)]),
        ];
        let c = checks(&records);
        // 125 MB at 100 Mbit/s is 10 s of link time: 10 / 12.5 = 0.8 < 0.9.
        let cap = find(&c, "rtt200", "background fetch / link capacity");
        assert!((cap.value.expect("value") - 0.8).abs() < 1e-9);
        assert_eq!(cap.verdict, Verdict::Fail);
        assert_eq!(
            find(&c, "rtt200", "background fetch / skopeo copy time").verdict,
            Verdict::Fail
        );
        // 30 MB / 50k entries = 600 B > 300 B.
        assert_eq!(
            find(&c, "local", "daemon RSS per TOC entry").verdict,
            Verdict::Fail
        );
        assert_eq!(
            find(
                &c,
                "local",
                "cached 1 GiB read, tarn / overlayfs throughput"
            )
            .verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn strict_needs_every_figure_with_a_target_to_pass() {
        let s3 = |many_secs: f64| {
            checks(&[
                rec(
                    "loopback",
                    "S3",
                    "tarn-1",
                    &[("secs", 1.0), ("bytes", 100.0)],
                ),
                rec(
                    "loopback",
                    "S3",
                    "tarn-20",
                    &[("secs", many_secs), ("bytes", 100.0)],
                ),
            ])
        };
        // The overlayfs figures did not run, but they have no target.
        assert!(all_pass(&s3(1.2)));
        assert!(!all_pass(&s3(2.0)), "20 pulls at 2x one");
    }

    #[test]
    fn s6_sets_overlaybd_against_estargz_and_overlayfs_of_the_same_profile() {
        let records = vec![
            rec(
                "rtt100",
                "S6",
                "overlayfs",
                &[("secs", 20.0), ("bytes", 100e6)],
            ),
            rec(
                "rtt100",
                "S6",
                "tarn-esgz",
                &[("secs", 5.0), ("bytes", 10e6)],
            ),
            rec(
                "rtt100",
                "S6",
                "tarn-obd",
                &[("secs", 4.0), ("bytes", 20e6)],
            ),
            // Another profile's figures do not mix in.
            rec(
                "loopback",
                "S6",
                "tarn-esgz",
                &[("secs", 1.0), ("bytes", 1e6)],
            ),
        ];
        let c = checks(&records);
        let time = find(&c, "rtt100", "overlaybd / eStargz pull+run time");
        assert_eq!((time.value, &time.verdict), (Some(0.8), &Verdict::Info));
        let bytes = find(&c, "rtt100", "overlaybd / overlayfs registry bytes");
        assert_eq!(bytes.value, Some(0.2));
        let missing = find(&c, "loopback", "overlaybd / eStargz pull+run time");
        assert!(
            matches!(&missing.verdict, Verdict::Failed { reason } if reason.contains("tarn-obd: not run")),
            "{missing:?}"
        );
    }

    #[test]
    fn p7_compares_the_second_image_with_itself_alone_and_the_cache_with_its_content() {
        let records = vec![
            rec("loopback", "P7", "b-alone", &[("bytes", 10e6)]),
            rec(
                "loopback",
                "P7",
                "b-after-a",
                &[
                    ("bytes", 2e6),
                    ("cache_disk_bytes", 33e6),
                    ("unique_bytes", 30e6),
                ],
            ),
        ];
        let c = checks(&records);
        let wire = find(
            &c,
            "loopback",
            "2nd image after the 1st / alone, registry bytes",
        );
        assert!((wire.value.expect("value") - 0.2).abs() < 1e-9);
        assert_eq!(wire.verdict, Verdict::Pass);
        // 33 / 30 = 1.1 > 1.05.
        let disk = find(&c, "loopback", "cache disk / unique bytes of both images");
        assert_eq!(disk.verdict, Verdict::Fail);
        let table = render(&records, &c);
        assert!(table.contains("cache_disk_bytes=33.0MB"), "{table}");
    }

    #[test]
    fn records_parse_from_json_lines_and_bad_lines_are_errors() {
        let text = "{\"profile\":\"loopback\",\"scenario\":\"S1\",\"variant\":\"tarn\",\"ok\":false,\"reason\":\"x\"}\n\n";
        let r = parse_records(text).expect("parse");
        assert_eq!(r.len(), 1);
        assert!(r[0].metrics.is_empty());
        assert!(parse_records("{\"profile\":1}\n").is_err());
    }
}
