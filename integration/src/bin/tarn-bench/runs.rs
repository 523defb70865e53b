//! From what `scripts/bench.sh` collected to the records the report reads.
//!
//! The script only runs things and writes down raw facts, one note per run
//! (`tarn-bench note`): when a run started and ended (Unix seconds), the
//! registry log's size before and after it (marks), and what a measuring
//! subcommand printed. Everything computed from them is computed here: a
//! run's seconds and registry traffic, the median of repeated runs with the
//! fastest and slowest, and a group's failure.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tarn_integration::reglog::{self, Traffic};

use crate::report::Record;

/// Named numbers, printed and parsed as `NAME=VALUE` words: what a
/// measuring subcommand prints and a note records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Facts(pub BTreeMap<String, f64>);

impl Facts {
    pub fn new<const N: usize>(facts: [(&str, f64); N]) -> Facts {
        Facts(facts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    pub fn push(&mut self, name: &str, value: f64) {
        self.0.insert(name.to_owned(), value);
    }
}

impl fmt::Display for Facts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&words.join(" "))
    }
}

/// One `NAME=VALUE` word.
pub fn parse_fact(word: &str) -> Result<(String, f64)> {
    let (name, value) = word
        .split_once('=')
        .with_context(|| format!("{word:?} is not NAME=VALUE"))?;
    let value = f64::from_str(value).with_context(|| format!("{word:?}: not a number"))?;
    if name.is_empty() {
        bail!("{word:?} has no name");
    }
    Ok((name.to_owned(), value))
}

/// One run as the script noted it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Note {
    pub profile: String,
    pub scenario: String,
    pub variant: String,
    /// One of several repetitions: the record is their median.
    #[serde(default)]
    pub rep: bool,
    pub ok: bool,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub facts: Facts,
}

/// Appends `note` to the notes file at `path` (JSON lines).
pub fn append(path: &Path, note: &Note) -> Result<()> {
    let mut line = serde_json::to_string(note).context("cannot encode the note")?;
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .with_context(|| format!("cannot append to {}", path.display()))
}

pub fn parse_notes(text: &str) -> Result<Vec<Note>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("bad note on line {}", i + 1))
        })
        .collect()
}

/// Seconds as the report keeps them: to the millisecond.
fn round_ms(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// A run's metrics from its facts: `start`/`end` become `secs`; the marks
/// `reg_from`/`reg_to` become the registry's `bytes` and `requests` in
/// between (`registry_bytes` when the run names its own `bytes`, as S2 does
/// with the image's size); every other fact is kept as it is.
fn metrics(
    facts: &Facts,
    traffic: &mut impl FnMut(u64, u64) -> Result<Traffic>,
) -> Result<BTreeMap<String, f64>> {
    let mut m = facts.0.clone();
    if let (Some(start), Some(end)) = (m.remove("start"), m.remove("end")) {
        m.insert("secs".into(), round_ms(end - start));
    }
    if let (Some(from), Some(to)) = (m.remove("reg_from"), m.remove("reg_to")) {
        // Marks are file sizes the script read with stat: whole numbers.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let t = traffic(from as u64, to as u64)?;
        let key = if m.contains_key("bytes") {
            "registry_bytes"
        } else {
            "bytes"
        };
        #[allow(clippy::cast_precision_loss)]
        {
            m.insert(key.into(), t.bytes as f64);
            m.insert("requests".into(), t.requests as f64);
        }
    }
    Ok(m)
}

/// A note's facts as the script's log shows them: its seconds instead of
/// its start and end, without the registry marks (the records count those).
pub fn shown(facts: &Facts) -> String {
    let mut m = facts.0.clone();
    if let (Some(start), Some(end)) = (m.remove("start"), m.remove("end")) {
        m.insert("secs".into(), round_ms(end - start));
    }
    m.remove("reg_from");
    m.remove("reg_to");
    Facts(m).to_string()
}

/// The run of median time (the lower middle of an even count) with the
/// number of runs and the fastest and slowest times.
pub fn median(mut runs: Vec<BTreeMap<String, f64>>) -> Option<BTreeMap<String, f64>> {
    let secs = |m: &BTreeMap<String, f64>| m.get("secs").copied().unwrap_or(f64::NAN);
    runs.sort_by(|a, b| secs(a).total_cmp(&secs(b)));
    let fastest = secs(runs.first()?);
    let slowest = secs(runs.last()?);
    #[allow(clippy::cast_precision_loss)]
    let count = runs.len() as f64;
    let mut m = runs.swap_remove((runs.len() - 1) / 2);
    m.insert("runs".into(), count);
    m.insert("secs_min".into(), fastest);
    m.insert("secs_max".into(), slowest);
    Some(m)
}

/// A failed run's reason, with what it took and fetched when it noted that
/// (a pull that was not lazy): measured numbers, in words, never a figure.
fn failed_reason(
    note: &Note,
    traffic: &mut impl FnMut(u64, u64) -> Result<Traffic>,
) -> Result<Option<String>> {
    let m = metrics(&note.facts, traffic)?;
    let (Some(secs), Some(bytes)) = (m.get("secs"), m.get("bytes")) else {
        return Ok(note.reason.clone());
    };
    let reason = note.reason.as_deref().unwrap_or("failed");
    Ok(Some(format!("{reason} ({secs:.3} s, {bytes} bytes)")))
}

/// The records of `notes`, one per profile, scenario and variant, in the
/// order each first appears. A group with a failed run failed, with that
/// run's reason; a group of repetitions is recorded as their median.
/// `traffic(from, to)` reads the registry log between two marks.
pub fn records(
    notes: &[Note],
    mut traffic: impl FnMut(u64, u64) -> Result<Traffic>,
) -> Result<Vec<Record>> {
    let mut order: Vec<(&str, &str, &str)> = Vec::new();
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&Note>> = BTreeMap::new();
    for n in notes {
        let key = (n.profile.as_str(), n.scenario.as_str(), n.variant.as_str());
        let group = groups.entry(key).or_default();
        if group.is_empty() {
            order.push(key);
        }
        group.push(n);
    }
    let mut out = Vec::new();
    for key in order {
        let group = &groups[&key];
        let record = |ok, reason, metrics| Record {
            profile: key.0.to_owned(),
            scenario: key.1.to_owned(),
            variant: key.2.to_owned(),
            ok,
            reason,
            metrics,
        };
        if let Some(failed) = group.iter().find(|n| !n.ok) {
            let reason = failed_reason(failed, &mut traffic)?;
            out.push(record(false, reason, BTreeMap::new()));
            continue;
        }
        let runs = group
            .iter()
            .map(|n| metrics(&n.facts, &mut traffic))
            .collect::<Result<Vec<_>>>()?;
        let m = if group.iter().any(|n| n.rep) {
            median(runs)
        } else {
            // A single run; noted twice, the last one counts.
            runs.into_iter().last()
        };
        out.push(record(true, None, m.unwrap_or_default()));
    }
    Ok(out)
}

/// Reads the notes, turns them into records with the registry log's
/// traffic, and writes the records as JSON lines to `out`.
pub fn run(notes_path: &Path, registry_log: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(notes_path)
        .with_context(|| format!("cannot read notes {}", notes_path.display()))?;
    let notes = parse_notes(&text)?;
    let records = records(&notes, |from, to| {
        let requests = reglog::read_between(registry_log, from, to)
            .with_context(|| format!("cannot read registry log {}", registry_log.display()))?;
        Ok(Traffic::of(&requests))
    })?;
    let mut body = String::new();
    for r in &records {
        body.push_str(&serde_json::to_string(r).context("cannot encode a record")?);
        body.push('\n');
    }
    std::fs::write(out, body).with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(variant: &str, rep: bool, facts: &[(&str, f64)]) -> Note {
        Note {
            profile: "loopback".into(),
            scenario: "S1".into(),
            variant: variant.into(),
            rep,
            ok: true,
            reason: None,
            facts: Facts(facts.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
        }
    }

    /// A registry that served `to - from` bytes in one request per 10.
    fn fake_traffic(from: u64, to: u64) -> Result<Traffic> {
        Ok(Traffic {
            bytes: to - from,
            requests: (to - from) / 10,
        })
    }

    #[test]
    fn facts_are_words_both_ways() {
        let f = Facts::new([("secs", 1.5), ("bytes", 3e6)]);
        assert_eq!(f.to_string(), "bytes=3000000 secs=1.5");
        let back: Facts = Facts(
            f.to_string()
                .split(' ')
                .map(parse_fact)
                .collect::<Result<_>>()
                .expect("parse"),
        );
        assert_eq!(back, f);
        assert!(parse_fact("secs").is_err());
        assert!(parse_fact("secs=fast").is_err());
        assert!(parse_fact("=1").is_err());
    }

    fn n_facts() -> Facts {
        Facts::new([
            ("start", 100.25),
            ("end", 107.5004),
            ("reg_from", 1.0),
            ("reg_to", 2.0),
            ("layers", 5.0),
        ])
    }

    #[test]
    fn a_run_gets_its_seconds_and_registry_traffic() {
        let n = note(
            "overlayfs",
            false,
            &[
                ("start", 100.25),
                ("end", 107.5004),
                ("reg_from", 1000.0),
                ("reg_to", 1500.0),
            ],
        );
        let r = records(&[n], fake_traffic).expect("records");
        assert_eq!(r.len(), 1);
        assert!(r[0].ok);
        let m = &r[0].metrics;
        assert_eq!(m["secs"], 7.25);
        assert_eq!(m["bytes"], 500.0);
        assert_eq!(m["requests"], 50.0);
        assert!(!m.contains_key("start") && !m.contains_key("reg_from"));
        assert_eq!(shown(&n_facts()), "layers=5 secs=7.25");
    }

    #[test]
    fn a_run_with_its_own_bytes_keeps_them_and_names_the_traffic_registry_bytes() {
        let n = note(
            "tarn-background",
            false,
            &[("bytes", 9e6), ("reg_from", 0.0), ("reg_to", 100.0)],
        );
        let m = &records(&[n], fake_traffic).expect("records")[0].metrics;
        assert_eq!(m["bytes"], 9e6);
        assert_eq!(m["registry_bytes"], 100.0);
    }

    #[test]
    fn repetitions_are_recorded_as_their_median_with_the_spread() {
        let reps: Vec<Note> = [3.0, 1.0, 2.0, 9.0, 4.0]
            .iter()
            .map(|&secs| {
                note(
                    "tarn",
                    true,
                    &[("start", 0.0), ("end", secs), ("layers", secs * 10.0)],
                )
            })
            .collect();
        let r = records(&reps, fake_traffic).expect("records");
        let m = &r[0].metrics;
        assert_eq!(m["secs"], 3.0);
        assert_eq!(m["layers"], 30.0, "the median run's own facts");
        assert_eq!((m["runs"], m["secs_min"], m["secs_max"]), (5.0, 1.0, 9.0));
        // An even count takes the lower middle, as `sort -n | sed -n` did.
        let even: Vec<BTreeMap<String, f64>> = [4.0, 1.0, 3.0, 2.0]
            .iter()
            .map(|&s| BTreeMap::from([("secs".to_string(), s)]))
            .collect();
        assert_eq!(median(even).expect("median")["secs"], 2.0);
        assert_eq!(median(Vec::new()), None);
        // One repetition is still a median: of one.
        let one = records(&reps[..1], fake_traffic).expect("records");
        assert_eq!(one[0].metrics["runs"], 1.0);
    }

    #[test]
    fn a_failed_run_fails_its_group_with_its_reason_in_first_seen_order() {
        let mut bad = note("tarn-20", true, &[]);
        bad.ok = false;
        bad.reason = Some("3 of 20 pulls failed".into());
        let notes = vec![
            note("tarn-1", true, &[("start", 0.0), ("end", 1.0)]),
            note("tarn-20", true, &[("start", 0.0), ("end", 1.2)]),
            note("tarn-1", true, &[("start", 0.0), ("end", 1.1)]),
            bad,
        ];
        let r = records(&notes, fake_traffic).expect("records");
        let names: Vec<&str> = r.iter().map(|r| r.variant.as_str()).collect();
        assert_eq!(names, ["tarn-1", "tarn-20"]);
        assert!(r[0].ok);
        assert!(!r[1].ok);
        assert_eq!(r[1].reason.as_deref(), Some("3 of 20 pulls failed"));
        assert!(r[1].metrics.is_empty(), "a failure has no numbers");
        // A run that failed after measuring says what it measured.
        let mut not_lazy = note(
            "tarn",
            true,
            &[
                ("start", 1.0),
                ("end", 3.5),
                ("reg_from", 0.0),
                ("reg_to", 70.0),
            ],
        );
        not_lazy.ok = false;
        not_lazy.reason = Some("not lazy".into());
        let r = records(&[not_lazy], fake_traffic).expect("records");
        assert_eq!(r[0].reason.as_deref(), Some("not lazy (2.500 s, 70 bytes)"));
    }

    #[test]
    fn notes_round_trip_through_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notes.jsonl");
        let n = note("tarn", true, &[("start", 1.0)]);
        append(&path, &n).expect("append");
        append(&path, &n).expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(parse_notes(&text).expect("parse"), vec![n.clone(), n]);
        assert!(parse_notes("{\"profile\":1}\n").is_err());
    }
}
