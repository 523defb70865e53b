use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::*;

#[test]
fn docker_config_auth_forms_and_keys() {
    let json = br#"{
        "auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
            "127.0.0.1:5000": {"username": "u2", "password": "p2"},
            "http://reg.lan/v2/": {"auth": "YTpi"},
            "empty.io": {}
        },
        "credsStore": "desktop-not-installed"
    }"#;
    // The store names a helper that is not there: `auths` still count.
    let empty = tempfile::tempdir().unwrap();
    let c = DockerConfig::parse(json)
        .unwrap()
        .with_search_path(empty.path());
    let hub = c.credentials_for("docker.io").unwrap();
    assert_eq!(
        (hub.username.as_str(), hub.password.as_str()),
        ("user", "pa:ss")
    );
    assert_eq!(c.credentials_for("127.0.0.1:5000").unwrap().password, "p2");
    assert_eq!(c.credentials_for("reg.lan").unwrap().username, "a");
    assert!(c.credentials_for("empty.io").is_none());
    assert!(c.credentials_for("127.0.0.1:5001").is_none());
    assert!(!format!("{hub:?}").contains("pa:ss"));

    let err = DockerConfig::parse(br#"{"auths":{"x":{"auth":"!!"}}}"#).unwrap_err();
    assert!(err.contains("auths.x.auth"), "{err}");
    assert!(DockerConfig::parse(b"not json").is_err());
}

#[test]
fn missing_config_file_means_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let c = DockerConfig::load(&dir.path().join("nope.json")).unwrap();
    assert!(c.credentials_for("docker.io").is_none());
    std::fs::write(dir.path().join("bad.json"), "{").unwrap();
    let err = DockerConfig::load(&dir.path().join("bad.json")).unwrap_err();
    assert!(err.to_string().contains("bad.json"), "{err}");
}

/// Writes an executable `docker-credential-NAME` shell script into `dir`.
fn helper(dir: &Path, name: &str, body: &str) {
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credential_helpers_per_registry_then_the_store_then_auths() {
    let bin = tempfile::tempdir().unwrap();
    // Answers as docker-credential-helpers do: the server URL on stdin
    // (no newline), JSON on stdout, "not found" with a failing status.
    helper(
        bin.path(),
        "store",
        r#"server=$(cat)
[ "$1" = get ] || exit 2
case "$server" in
  https://index.docker.io/v1/) echo '{"ServerURL":"https://index.docker.io/v1/","Username":"<token>","Secret":"refresh"}' ;;
  reg.lan) echo '{"ServerURL":"reg.lan","Username":"u","Secret":"s"}' ;;
  bad.lan) echo 'not json' ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac"#,
    );
    helper(
        bin.path(),
        "ecr",
        r#"server=$(cat)
echo "{\"ServerURL\":\"$server\",\"Username\":\"AWS\",\"Secret\":\"for-$server\"}""#,
    );
    let json = br#"{
        "auths": {"fallback.lan": {"username": "fu", "password": "fp"}},
        "credHelpers": {"1.dkr.ecr.aws": "ecr", "https://gone.lan/v1/": "nowhere"},
        "credsStore": "store"
    }"#;
    let c = DockerConfig::parse(json)
        .unwrap()
        .with_search_path(bin.path());
    assert!(c.uses_helper("any.lan"));

    let hub = c.credentials_for("docker.io").unwrap();
    assert_eq!(hub.identity_token(), Some("refresh"));
    let reg = c.credentials_for("reg.lan").unwrap();
    assert_eq!((reg.username.as_str(), reg.password.as_str()), ("u", "s"));
    assert_eq!(reg.identity_token(), None);
    let ecr = c.credentials_for("1.dkr.ecr.aws").unwrap();
    assert_eq!(ecr.password, "for-1.dkr.ecr.aws");
    // The store knows nothing of it: the auths entry is used.
    assert_eq!(c.credentials_for("fallback.lan").unwrap().username, "fu");
    // Not found, a missing helper, garbage: anonymous, not an error.
    assert_eq!(c.credentials_for("public.lan"), None);
    assert_eq!(c.credentials_for("gone.lan"), None);
    assert_eq!(c.credentials_for("bad.lan"), None);
    assert!(matches!(
        c.run_helper("nowhere", "gone.lan"),
        Err(HelperError::Missing(_))
    ));
    assert!(matches!(
        c.run_helper("store", "public.lan"),
        Err(HelperError::Failed { message, .. }) if message.contains("not found")
    ));
}

#[test]
fn identity_tokens_from_the_config_file() {
    let c = DockerConfig::parse(br#"{"auths":{"reg.lan":{"identitytoken":"rt"}}}"#).unwrap();
    assert!(!c.uses_helper("reg.lan"));
    assert_eq!(
        c.credentials_for("reg.lan").unwrap().identity_token(),
        Some("rt")
    );
}
