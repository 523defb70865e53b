//! [`Platform`]: the OS, architecture and variant an image runs on, the
//! node's own, and which entries of an index a node can run, best first.
//!
//! The rules are containerd's (`platforms.Only`), so tarn picks the
//! manifest containerd would: names are normalized (`aarch64` is `arm64`,
//! `arm64/v8` is `arm64`, `amd64/v1` is `amd64`, a bare `arm` is `arm/v7`),
//! and a node runs its own platform first, then what it is compatible with:
//! older amd64 levels, then `386`; an arm64 node `arm/v8` down to `arm/v5`;
//! an `arm/vN` node `arm/vN` down to `arm/v5`.

use std::fmt;

/// An OCI platform. Fields are as in an index, normalized by
/// [`Platform::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// Empty when there is none (or the normalized name has none).
    pub variant: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

impl Platform {
    /// A platform with its names normalized as containerd does.
    pub fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        let os = os.to_ascii_lowercase();
        let arch = architecture.to_ascii_lowercase();
        let variant = variant.to_ascii_lowercase();
        let (architecture, variant) = match arch.as_str() {
            "i386" => ("386", variant),
            "x86_64" | "x86-64" | "amd64" => match variant.as_str() {
                "v1" => ("amd64", String::new()),
                _ => ("amd64", variant),
            },
            "aarch64" | "arm64" => match variant.as_str() {
                "8" | "v8" | "v8.0" => ("arm64", String::new()),
                _ => ("arm64", variant),
            },
            "armhf" => ("arm", "v7".to_string()),
            "armel" => ("arm", "v6".to_string()),
            "arm" => match variant.as_str() {
                "" | "7" => ("arm", "v7".to_string()),
                "5" | "6" | "8" => ("arm", format!("v{variant}")),
                _ => ("arm", variant),
            },
            _ => (arch.as_str(), variant),
        };
        Platform {
            os,
            architecture: architecture.to_string(),
            variant,
        }
    }

    /// The platform this process runs on: Rust's names mapped to OCI's
    /// (`x86_64` -> `amd64`, `aarch64` -> `arm64/v8`, `arm` -> `arm` with the
    /// target's variant), and an amd64 CPU's microarchitecture level.
    pub fn node() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", amd64_level()),
            "x86" => ("386", ""),
            "aarch64" => ("arm64", "v8"),
            "arm" => ("arm", arm_variant()),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", ""),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", ""),
            "mips" if cfg!(target_endian = "little") => ("mipsle", ""),
            "loongarch64" => ("loong64", ""),
            other => (other, ""),
        };
        Platform::new(std::env::consts::OS, arch, variant)
    }

    /// What a node of this platform runs, best first (containerd's
    /// `platforms.Only`).
    pub fn compatible(&self) -> Vec<Platform> {
        let with = |architecture: &str, variant: String| Platform {
            os: self.os.clone(),
            architecture: architecture.to_string(),
            variant,
        };
        let mut out = vec![self.clone()];
        match self.architecture.as_str() {
            "amd64" => {
                if let Some(level) = version(&self.variant, "v") {
                    out.extend((2..level).rev().map(|l| with("amd64", format!("v{l}"))));
                    if level > 1 {
                        out.push(with("amd64", String::new()));
                    }
                }
                out.push(with("386", String::new()));
            }
            "arm64" => {
                // Every arm64 CPU runs 32-bit arm/v8 and below.
                out.extend((5..=8).rev().map(|v| with("arm", format!("v{v}"))));
            }
            "arm" => {
                if let Some(v) = version(&self.variant, "v") {
                    out.extend((5..v).rev().map(|v| with("arm", format!("v{v}"))));
                }
            }
            _ => {}
        }
        out
    }

    /// How well a node of this platform runs `other`: 0 is best, `None`
    /// is not at all.
    pub fn rank(&self, other: &Platform) -> Option<usize> {
        self.compatible().iter().position(|p| p == other)
    }
}

/// `v3` -> 3.
fn version(variant: &str, prefix: &str) -> Option<u32> {
    variant.strip_prefix(prefix)?.parse().ok()
}

/// The target's arm architecture version (32-bit arm only).
fn arm_variant() -> &'static str {
    if cfg!(target_feature = "v7") {
        "v7"
    } else if cfg!(target_feature = "v6") {
        "v6"
    } else {
        "v5"
    }
}

/// The x86-64 microarchitecture level of this CPU (`v1` to `v4`), as
/// containerd detects it, so an image built for a level the CPU has is
/// chosen as containerd would.
#[cfg(target_arch = "x86_64")]
fn amd64_level() -> &'static str {
    use std::arch::is_x86_feature_detected as has;
    let v2 = has!("cmpxchg16b")
        && has!("popcnt")
        && has!("sse3")
        && has!("ssse3")
        && has!("sse4.1")
        && has!("sse4.2");
    let v3 = v2
        && has!("avx")
        && has!("avx2")
        && has!("bmi1")
        && has!("bmi2")
        && has!("f16c")
        && has!("fma")
        && has!("lzcnt");
    let v4 = v3
        && has!("avx512f")
        && has!("avx512bw")
        && has!("avx512cd")
        && has!("avx512dq")
        && has!("avx512vl");
    match (v2, v3, v4) {
        (_, _, true) => "v4",
        (_, true, _) => "v3",
        (true, _, _) => "v2",
        _ => "v1",
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn amd64_level() -> &'static str {
    ""
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(os: &str, arch: &str, variant: &str) -> Platform {
        Platform::new(os, arch, variant)
    }

    #[test]
    fn names_are_normalized_as_containerd_does() {
        assert_eq!(p("Linux", "aarch64", "v8"), p("linux", "arm64", ""));
        assert_eq!(p("linux", "arm64", "8"), p("linux", "arm64", ""));
        assert_eq!(p("linux", "x86_64", "v1"), p("linux", "amd64", ""));
        assert_eq!(p("linux", "arm", ""), p("linux", "arm", "v7"));
        assert_eq!(p("linux", "armel", ""), p("linux", "arm", "v6"));
        assert_eq!(p("linux", "arm64", "v8").to_string(), "linux/arm64");
        assert_eq!(p("linux", "arm", "6").to_string(), "linux/arm/v6");
    }

    #[test]
    fn the_node_platform_is_in_oci_names() {
        let node = Platform::node();
        assert_eq!(node.os, std::env::consts::OS);
        let want = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        assert_eq!(node.architecture, want);
        assert_eq!(node.rank(&node), Some(0));
    }

    #[test]
    fn an_arm64_node_runs_arm64_any_v8_spelling_then_32_bit_arm() {
        let node = p("linux", "arm64", "v8");
        assert_eq!(node.rank(&p("linux", "arm64", "")), Some(0));
        assert_eq!(node.rank(&p("linux", "arm64", "v8")), Some(0));
        assert_eq!(node.rank(&p("linux", "arm", "v7")), Some(2));
        assert_eq!(node.rank(&p("linux", "amd64", "")), None);
        assert_eq!(node.rank(&p("windows", "arm64", "")), None);
        assert_eq!(node.rank(&p("linux", "arm64", "v9")), None);
    }

    #[test]
    fn amd64_levels_run_older_levels_then_386() {
        let v3 = p("linux", "amd64", "v3");
        let order: Vec<String> = v3.compatible().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            order,
            [
                "linux/amd64/v3",
                "linux/amd64/v2",
                "linux/amd64",
                "linux/386"
            ]
        );
        let v1 = p("linux", "amd64", "v1");
        assert_eq!(v1.rank(&p("linux", "amd64", "")), Some(0));
        assert_eq!(v1.rank(&p("linux", "386", "")), Some(1));
        assert_eq!(v1.rank(&p("linux", "amd64", "v2")), None);
        let arm6 = p("linux", "arm", "v6");
        assert_eq!(arm6.rank(&p("linux", "arm", "v5")), Some(1));
        assert_eq!(arm6.rank(&p("linux", "arm", "v7")), None);
    }
}
