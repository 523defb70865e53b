//! What a pull shows while it runs. On a terminal: one live line per layer,
//! redrawn in place. Otherwise (logs, CI, tests): one plain line per change
//! of a layer's state, never per byte.

use std::io::{IsTerminal, Write};

/// Where one layer stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerState {
    Waiting,
    /// Already unpacked in the snapshotter: nothing to do.
    Present,
    /// tarn serves the layer lazily: mounted, nothing downloaded.
    Lazy,
    Downloading {
        done: u64,
        total: u64,
    },
    Applying,
    /// Downloaded and unpacked.
    Unpacked {
        bytes: u64,
    },
}

impl LayerState {
    fn text(&self) -> String {
        match self {
            LayerState::Waiting => "waiting".into(),
            LayerState::Present => "already present".into(),
            LayerState::Lazy => "lazy (mounted)".into(),
            LayerState::Downloading { done, total } => {
                let pct = if *total == 0 { 100 } else { done * 100 / total };
                format!("downloading {} / {} ({pct}%)", human(*done), human(*total))
            }
            LayerState::Applying => "unpacking".into(),
            LayerState::Unpacked { bytes: 0 } => "unpacked (blob was already in containerd)".into(),
            LayerState::Unpacked { bytes } => format!("downloaded {} and unpacked", human(*bytes)),
        }
    }

    /// Byte updates are drawn on a terminal only; plain output shows the
    /// start of a download and its end.
    fn same_phase(&self, other: &LayerState) -> bool {
        matches!(
            (self, other),
            (
                LayerState::Downloading { .. },
                LayerState::Downloading { .. }
            )
        )
    }
}

pub struct Progress {
    tty: bool,
    names: Vec<String>,
    states: Vec<LayerState>,
    drawn: bool,
}

impl Progress {
    /// `names` are the layers' short digests, in order.
    pub fn new(names: Vec<String>) -> Progress {
        let states = vec![LayerState::Waiting; names.len()];
        Progress {
            tty: std::io::stdout().is_terminal(),
            names,
            states,
            drawn: false,
        }
    }

    pub fn set(&mut self, i: usize, state: LayerState) {
        let Some(old) = self.states.get(i) else {
            return;
        };
        if *old == state {
            return;
        }
        let quiet = old.same_phase(&state);
        self.states[i] = state;
        if self.tty {
            self.redraw();
        } else if !quiet {
            let text = match &self.states[i] {
                // A plain log gets the size once instead of a 0% line.
                LayerState::Downloading { total, .. } => format!("downloading {}", human(*total)),
                s => s.text(),
            };
            println!(
                "layer {}/{} {}: {text}",
                i + 1,
                self.names.len(),
                self.names[i]
            );
        }
    }

    fn redraw(&mut self) {
        let mut out = std::io::stdout().lock();
        let mut buf = String::new();
        if self.drawn {
            // Back to the first layer line, then overwrite every line.
            buf.push_str(&format!("\x1b[{}A", self.names.len()));
        }
        for (i, (n, s)) in self.names.iter().zip(&self.states).enumerate() {
            buf.push_str(&format!(
                "\r\x1b[2Klayer {}/{} {n}: {}\n",
                i + 1,
                self.names.len(),
                s.text()
            ));
        }
        // A failed write to our own stdout is not worth failing the pull.
        let _ = out.write_all(buf.as_bytes());
        let _ = out.flush();
        self.drawn = true;
    }
}

/// Bytes with a binary unit, one decimal.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_a_user_expects() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(LayerState::Lazy.text(), "lazy (mounted)");
        let d = LayerState::Downloading {
            done: 512 * 1024,
            total: 1024 * 1024,
        };
        assert_eq!(d.text(), "downloading 512.0 KiB / 1.0 MiB (50%)");
        assert!(d.same_phase(&LayerState::Downloading { done: 0, total: 1 }));
        assert!(!d.same_phase(&LayerState::Applying));
    }
}
