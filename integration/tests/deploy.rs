//! The deployment files under `deploy/` parse, and every path in them is the
//! daemon's default, so a node set up from them and a daemon started without
//! flags agree on where the socket, the root and the config are.

use std::path::{Path, PathBuf};

// The daemon's own defaults (DESIGN.md §5).
use tarn_snapshotter::config::{Config, DEFAULT_ADDRESS, DEFAULT_CONFIG, DEFAULT_ROOT};

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn parent(path: &str) -> String {
    PathBuf::from(path)
        .parent()
        .expect("default paths are absolute files")
        .display()
        .to_string()
}

/// The flags every deployment passes, in the daemon's own syntax.
fn default_args() -> Vec<&'static str> {
    vec![
        "--root",
        DEFAULT_ROOT,
        "--address",
        DEFAULT_ADDRESS,
        "--config",
        DEFAULT_CONFIG,
    ]
}

#[test]
fn systemd_unit_starts_the_daemon_with_its_defaults_before_containerd() {
    let unit = deploy_file("tarn-snapshotter.service");
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let exec = value("ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    let words: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/tarn-snapshotter");
    assert_eq!(words[1..], default_args()[..]);
    assert!(
        value("Before")
            .iter()
            .any(|v| v.split_whitespace().any(|u| u == "containerd.service"))
    );
    assert_eq!(value("Restart"), ["always"]);
    // The holder (issue 14) must survive a stop or restart of the daemon.
    assert_eq!(value("KillMode"), ["process"]);
    assert_eq!(value("WantedBy"), ["multi-user.target"]);
}

#[test]
fn containerd_snippet_registers_tarn_and_stargz_at_the_default_socket() {
    let config: toml::Table = deploy_file("containerd-config.toml")
        .parse()
        .expect("containerd-config.toml is TOML");
    for name in ["tarn", "stargz"] {
        let plugin = &config["proxy_plugins"][name];
        assert_eq!(plugin["type"].as_str(), Some("snapshot"), "{name}");
        assert_eq!(plugin["address"].as_str(), Some(DEFAULT_ADDRESS), "{name}");
    }
    let cri = &config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["snapshotter"].as_str(), Some("tarn"));
    assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
    assert_eq!(config["version"].as_integer(), Some(2));
}

/// containerd 1.6 itself reads the version 2 snippet as meant: its
/// `config dump` (the merged, parsed config) keeps CRI's settings.
#[test]
fn containerd_1_6_reads_the_version_2_snippet() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerd-config.toml");
    let out = std::process::Command::new("containerd")
        .arg("--config")
        .arg(&path)
        .args(["config", "dump"])
        .output()
        .expect("run containerd config dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dumped: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("config dump is TOML");
    assert_eq!(
        dumped["proxy_plugins"]["tarn"]["address"].as_str(),
        Some(DEFAULT_ADDRESS)
    );
    let cri = &dumped["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["snapshotter"].as_str(), Some("tarn"));
    assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
}

/// The containerd 2.x snippet (config version 3), with containerd's key
/// names: proxy plugins export the remote-snapshot annotations for the
/// transfer service, CRI's image settings sit in `io.containerd.cri.v1.images`
/// (where 2.x reads them; a version 2 CRI table is migrated without them),
/// and the transfer service unpacks with tarn for a platform while keeping
/// its default overlayfs entry.
#[test]
fn containerd_2_snippet_configures_cri_and_the_transfer_service() {
    let config: toml::Table = deploy_file("containerd2-config.toml")
        .parse()
        .expect("containerd2-config.toml is TOML");
    assert_eq!(config["version"].as_integer(), Some(3));
    for name in ["tarn", "stargz"] {
        let plugin = &config["proxy_plugins"][name];
        assert_eq!(plugin["type"].as_str(), Some("snapshot"), "{name}");
        assert_eq!(plugin["address"].as_str(), Some(DEFAULT_ADDRESS), "{name}");
        assert_eq!(
            plugin["exports"]["enable_remote_snapshot_annotations"].as_str(),
            Some("true"),
            "{name}: a string, as containerd's exports are map[string]string"
        );
        assert!(
            plugin.get("capabilities").is_none(),
            "{name}: rebase is left to the operator (README)"
        );
    }
    let plugins = config["plugins"].as_table().expect("plugins");
    assert!(
        !plugins.contains_key("io.containerd.grpc.v1.cri"),
        "2.x reads CRI's image settings from io.containerd.cri.v1.images"
    );
    let images = &plugins["io.containerd.cri.v1.images"];
    assert_eq!(images["snapshotter"].as_str(), Some("tarn"));
    assert_eq!(
        images["disable_snapshot_annotations"].as_bool(),
        Some(false)
    );

    let unpack = plugins["io.containerd.transfer.v1.local"]["unpack_config"]
        .as_array()
        .expect("unpack_config is an array of tables");
    let pairs: Vec<(&str, &str)> = unpack
        .iter()
        .map(|u| {
            (
                u["platform"].as_str().expect("platform"),
                u["snapshotter"].as_str().expect("snapshotter"),
            )
        })
        .collect();
    assert!(pairs.contains(&("linux/amd64", "tarn")), "{pairs:?}");
    assert!(pairs.contains(&("linux/amd64", "overlayfs")), "{pairs:?}");
}

#[test]
fn example_config_is_what_the_daemon_reads_by_default() {
    // Root and address are flags, not keys; the example states every key's
    // default, so loading it must give exactly the daemon's defaults.
    let config: Config = toml::from_str(&deploy_file("config.toml")).expect("config.toml loads");
    assert_eq!(config, Config::default());
}

#[test]
fn daemonset_runs_the_daemon_with_its_defaults_and_shares_its_paths_with_the_host() {
    let docs = yaml::parse_documents(&deploy_file("kubernetes/daemonset.yaml"));
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d.get("kind").and_then(yaml::Yaml::as_str) == Some(k))
            .unwrap_or_else(|| panic!("no {k} in daemonset.yaml"))
    };

    // The ConfigMap holds a config the daemon accepts (unknown keys are
    // refused, so this catches drift from the daemon's schema).
    let config_map = kind("ConfigMap");
    let config_text = config_map
        .at(&["data", "config.toml"])
        .and_then(yaml::Yaml::as_str)
        .expect("ConfigMap data config.toml");
    toml::from_str::<Config>(config_text).expect("ConfigMap config.toml loads in the daemon");
    let config_map_name = config_map
        .at(&["metadata", "name"])
        .and_then(yaml::Yaml::as_str)
        .expect("ConfigMap name");

    let ds = kind("DaemonSet");
    let pod = ds.at(&["spec", "template", "spec"]).expect("pod spec");
    let containers = pod
        .get("containers")
        .and_then(yaml::Yaml::as_list)
        .expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let strings = |y: Option<&yaml::Yaml>| -> Vec<String> {
        y.and_then(yaml::Yaml::as_list)
            .unwrap_or(&[])
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        strings(c.get("command")),
        ["/usr/local/bin/tarn-snapshotter"]
    );
    assert_eq!(strings(c.get("args")), default_args());
    assert_eq!(
        c.at(&["securityContext", "privileged"])
            .and_then(yaml::Yaml::as_str),
        Some("true")
    );

    // Volume name -> (host path or config map) and container mount path.
    let volumes = pod
        .get("volumes")
        .and_then(yaml::Yaml::as_list)
        .expect("volumes");
    let mounts = c
        .get("volumeMounts")
        .and_then(yaml::Yaml::as_list)
        .expect("volumeMounts");
    let mount_of = |host_path: &str| {
        let volume = volumes
            .iter()
            .find(|v| v.at(&["hostPath", "path"]).and_then(yaml::Yaml::as_str) == Some(host_path))
            .unwrap_or_else(|| panic!("no hostPath volume {host_path}"));
        let name = volume
            .get("name")
            .and_then(yaml::Yaml::as_str)
            .expect("volume name");
        mounts
            .iter()
            .find(|m| m.get("name").and_then(yaml::Yaml::as_str) == Some(name))
            .unwrap_or_else(|| panic!("volume {name} not mounted"))
    };
    let field = |m: &yaml::Yaml, k: &str| m.get(k).and_then(yaml::Yaml::as_str).map(str::to_owned);

    // Root and socket directory: same path inside as on the host, and the
    // mounts tarn makes there reach the host (containerd) and back.
    for host_path in [DEFAULT_ROOT.to_owned(), parent(DEFAULT_ADDRESS)] {
        let m = mount_of(&host_path);
        assert_eq!(field(m, "mountPath").as_deref(), Some(host_path.as_str()));
        assert_eq!(
            field(m, "mountPropagation").as_deref(),
            Some("Bidirectional"),
            "{host_path}"
        );
    }
    assert_eq!(
        field(mount_of("/dev/fuse"), "mountPath").as_deref(),
        Some("/dev/fuse")
    );

    // The config map is mounted where the daemon reads its config.
    let config_volume = volumes
        .iter()
        .find(|v| {
            v.at(&["configMap", "name"]).and_then(yaml::Yaml::as_str) == Some(config_map_name)
        })
        .expect("a volume of the ConfigMap");
    let config_volume_name = config_volume.get("name").and_then(yaml::Yaml::as_str);
    let config_mount = mounts
        .iter()
        .find(|m| m.get("name").and_then(yaml::Yaml::as_str) == config_volume_name)
        .expect("ConfigMap volume mounted");
    assert_eq!(
        field(config_mount, "mountPath"),
        Some(parent(DEFAULT_CONFIG))
    );
}

#[test]
fn yaml_subset_parser_reads_maps_lists_and_block_scalars() {
    let docs = yaml::parse_documents(
        "# comment\na:\n  b: \"x\"\n  list:\n    - one\n    - k: v\n      k2: v2\n  text: |\n    line 1\n      indented # not a comment\n\n    line 3\nc: d\n---\ne: f\n",
    );
    assert_eq!(docs.len(), 2);
    let d = &docs[0];
    assert_eq!(d.at(&["a", "b"]).and_then(yaml::Yaml::as_str), Some("x"));
    let list = d
        .at(&["a", "list"])
        .and_then(yaml::Yaml::as_list)
        .expect("list");
    assert_eq!(list[0].as_str(), Some("one"));
    assert_eq!(list[1].get("k2").and_then(yaml::Yaml::as_str), Some("v2"));
    assert_eq!(
        d.at(&["a", "text"]).and_then(yaml::Yaml::as_str),
        Some("line 1\n  indented # not a comment\n\nline 3\n")
    );
    assert_eq!(d.get("c").and_then(yaml::Yaml::as_str), Some("d"));
    assert_eq!(docs[1].get("e").and_then(yaml::Yaml::as_str), Some("f"));
}

/// The YAML the deploy manifests use, and no more: block maps and lists,
/// plain or quoted scalars, `|` block scalars, comments, `---`. Enough to
/// check our own files without a YAML dependency; anything else panics.
mod yaml {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Yaml {
        Scalar(String),
        Map(Vec<(String, Yaml)>),
        List(Vec<Yaml>),
    }

    impl Yaml {
        pub fn get(&self, key: &str) -> Option<&Yaml> {
            match self {
                Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        pub fn at(&self, keys: &[&str]) -> Option<&Yaml> {
            keys.iter().try_fold(self, |y, k| y.get(k))
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Yaml::Scalar(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_list(&self) -> Option<&[Yaml]> {
            match self {
                Yaml::List(items) => Some(items),
                _ => None,
            }
        }
    }

    pub fn parse_documents(text: &str) -> Vec<Yaml> {
        text.split("\n---\n")
            .map(|doc| {
                let mut p = Parser {
                    lines: doc.lines().map(str::to_owned).collect(),
                    i: 0,
                };
                p.skip_insignificant();
                match p.peek_indent() {
                    Some(indent) => p.block(indent),
                    None => Yaml::Map(Vec::new()),
                }
            })
            .collect()
    }

    struct Parser {
        lines: Vec<String>,
        i: usize,
    }

    fn indent_of(line: &str) -> usize {
        line.len() - line.trim_start_matches(' ').len()
    }

    fn scalar(text: &str) -> Yaml {
        let t = text.trim();
        let unquoted = t
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| t.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(t);
        assert!(
            !unquoted.starts_with(['[', '{', '&', '*', '!']),
            "yaml subset: unsupported value {t:?}"
        );
        Yaml::Scalar(unquoted.to_owned())
    }

    impl Parser {
        fn skip_insignificant(&mut self) {
            while self.i < self.lines.len() {
                let t = self.lines[self.i].trim();
                if t.is_empty() || t.starts_with('#') {
                    self.i += 1;
                } else {
                    break;
                }
            }
        }

        fn peek_indent(&self) -> Option<usize> {
            self.lines.get(self.i).map(|l| indent_of(l))
        }

        fn at_item(&self) -> bool {
            let t = self.lines[self.i].trim_start();
            t == "-" || t.starts_with("- ")
        }

        fn block(&mut self, indent: usize) -> Yaml {
            if self.at_item() {
                self.list(indent)
            } else {
                self.map(indent)
            }
        }

        fn list(&mut self, indent: usize) -> Yaml {
            let mut items = Vec::new();
            while self.peek_indent() == Some(indent) && self.at_item() {
                let content = self.lines[self.i].trim_start()[1..].trim_start().to_owned();
                if content.is_empty() {
                    self.i += 1;
                    self.skip_insignificant();
                    let inner = self.peek_indent().expect("yaml subset: empty list item");
                    items.push(self.block(inner));
                } else if content.contains(": ") || content.ends_with(':') {
                    // `- key: value` opens a map indented past the dash.
                    let inner = indent + 2;
                    self.lines[self.i] = format!("{}{content}", " ".repeat(inner));
                    items.push(self.map(inner));
                } else {
                    items.push(scalar(&content));
                    self.i += 1;
                }
                self.skip_insignificant();
            }
            Yaml::List(items)
        }

        fn map(&mut self, indent: usize) -> Yaml {
            let mut entries = Vec::new();
            while self.peek_indent() == Some(indent) && !self.at_item() {
                let line = self.lines[self.i].trim().to_owned();
                let (key, rest) = match line.split_once(": ") {
                    Some((k, r)) => (k, r.trim()),
                    None => (
                        line.strip_suffix(':')
                            .unwrap_or_else(|| panic!("yaml subset: not a key: {line:?}")),
                        "",
                    ),
                };
                self.i += 1;
                let value = if rest == "|" {
                    self.block_scalar(indent)
                } else if !rest.is_empty() {
                    scalar(rest)
                } else {
                    self.skip_insignificant();
                    match self.peek_indent() {
                        Some(next) if next > indent => self.block(next),
                        // A list may sit at its key's indentation.
                        Some(next) if next == indent && self.at_item() => self.list(next),
                        _ => Yaml::Scalar(String::new()),
                    }
                };
                entries.push((key.to_owned(), value));
                self.skip_insignificant();
            }
            Yaml::Map(entries)
        }

        /// Lines indented past the key, verbatim less the first line's indent.
        fn block_scalar(&mut self, key_indent: usize) -> Yaml {
            let mut body: Vec<&str> = Vec::new();
            let mut strip = None;
            while let Some(line) = self.lines.get(self.i) {
                if !line.trim().is_empty() && indent_of(line) <= key_indent {
                    break;
                }
                body.push(line);
                self.i += 1;
            }
            while body.last().is_some_and(|l| l.trim().is_empty()) {
                body.pop();
            }
            let mut out = String::new();
            for line in body {
                if line.trim().is_empty() {
                    out.push('\n');
                    continue;
                }
                let n = *strip.get_or_insert(indent_of(line));
                out.push_str(&line[n.min(indent_of(line))..]);
                out.push('\n');
            }
            Yaml::Scalar(out)
        }
    }
}
