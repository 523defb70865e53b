use super::*;

fn parse(text: &str) -> Result<HostsFile, HostsError> {
    HostsFile::parse(
        text,
        Path::new("/etc/containerd/certs.d/docker.io/hosts.toml"),
    )
}

#[test]
fn containers_example_parses_in_the_order_written() {
    let f = parse(
        r#"
server = "https://registry-1.docker.io"

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]
[host."http://127.0.0.2:5000"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"
  skip_verify = true
  [host."http://127.0.0.2:5000".header]
    x-custom = ["a", "b"]
[host."https://b-mirror.example.com/us"]
  capabilities = ["resolve"]
[host."https://non-compliant.example.com/v2/upstream"]
  override_path = true
  client = [["/c.cert", "/c.key"], ["c.pem", ""]]
"#,
    )
    .unwrap();
    let roots: Vec<_> = f.hosts.iter().map(|h| h.root.as_str()).collect();
    assert_eq!(
        roots,
        [
            "https://public-mirror.example.com/v2",
            "http://127.0.0.2:5000/v2",
            "https://b-mirror.example.com/us/v2",
            "https://non-compliant.example.com/v2/upstream",
        ]
    );
    let m = &f.hosts[1];
    assert_eq!(m.authority(), "127.0.0.2:5000");
    assert!(m.capabilities.pull && m.capabilities.resolve && !m.capabilities.push);
    assert!(m.skip_verify && m.own_tls());
    assert_eq!(
        m.ca,
        [PathBuf::from(
            "/etc/containerd/certs.d/docker.io/docker-mirror.crt"
        )]
    );
    assert_eq!(
        m.headers,
        [
            ("x-custom".into(), "a".into()),
            ("x-custom".into(), "b".into())
        ]
    );
    let n = &f.hosts[3];
    assert!(
        n.capabilities.pull && n.capabilities.resolve,
        "default capabilities"
    );
    assert_eq!(
        n.client,
        [
            (PathBuf::from("/c.cert"), Some(PathBuf::from("/c.key"))),
            (
                PathBuf::from("/etc/containerd/certs.d/docker.io/c.pem"),
                None
            ),
        ]
    );
    let server = f.server.as_ref().unwrap();
    assert_eq!(server.root.as_str(), "https://registry-1.docker.io/v2");
    assert!(server.capabilities.push);
    // Pull goes to the mirrors with `pull`, in order, then the server.
    let pull: Vec<_> = f.pull_hosts().map(|h| h.authority()).collect();
    assert_eq!(
        pull,
        [
            "public-mirror.example.com",
            "127.0.0.2:5000",
            "non-compliant.example.com",
            "registry-1.docker.io"
        ]
    );
}

#[test]
fn a_file_with_no_server_or_hosts_is_empty() {
    let f = parse("").unwrap();
    assert!(f.server.is_none() && f.hosts.is_empty());
    let f = parse("server = \"127.0.0.1:5000\"\n").unwrap();
    assert_eq!(f.server.unwrap().root.as_str(), "https://127.0.0.1:5000/v2");
}

#[test]
fn broken_files_are_one_line_errors_naming_the_file() {
    let many: String = (0..=MAX_HOSTS)
        .map(|i| format!("[host.\"http://m{i}\"]\n"))
        .collect();
    for text in [
        "server = [",
        "server = \"ftp://x\"",
        "[host.\"http://m\"]\ncapabilities = [\"fly\"]",
        "[host.\"http://m?q=1\"]",
        "[host.\"http://m\".header]\n\"bad name\" = \"v\"",
        "[host.\"http://m\".header]\nx = \"a\\nb\"",
        "[host.\"http://m\"]\nclient = [[\"a\", \"b\", \"c\"]]",
        many.as_str(),
    ] {
        let e = parse(text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("docker.io/hosts.toml"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    let big = "#".repeat(usize::try_from(MAX_FILE_BYTES).unwrap() + 1);
    assert!(matches!(parse(&big), Err(HostsError::TooLarge { .. })));
}

#[test]
fn the_namespace_file_is_found_before_the_default_one() {
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str| {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::fs::write(
            dir.path().join(name).join("hosts.toml"),
            "server = \"http://example.com\"\n",
        )
        .unwrap();
    };
    assert!(HostsFile::load(dir.path(), "reg:5000").unwrap().is_none());
    put("_default");
    let found = |ns: &str| {
        HostsFile::load(dir.path(), ns)
            .unwrap()
            .unwrap()
            .path
            .strip_prefix(dir.path())
            .unwrap()
            .to_path_buf()
    };
    assert_eq!(found("reg:5000"), Path::new("_default/hosts.toml"));
    put("reg:5000");
    assert_eq!(found("reg:5000"), Path::new("reg:5000/hosts.toml"));
    put("reg_5000_");
    assert_eq!(found("reg:5000"), Path::new("reg_5000_/hosts.toml"));
    assert_eq!(found("../etc"), Path::new("_default/hosts.toml"));
}
