use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn repo(registry: &str) -> Repository {
    Repository {
        registry: registry.into(),
        name: "app".into(),
    }
}

fn user(k: &DockerFile, registry: &str) -> Option<String> {
    k.credentials(&repo(registry)).map(|c| c.username)
}

#[test]
fn the_file_is_read_again_when_it_changes_and_a_bad_version_keeps_the_last_good() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let k = DockerFile::open(path.clone()).unwrap();
    // No file yet: anonymous, and a file written later is seen.
    assert_eq!(user(&k, "reg.lan"), None);
    std::fs::write(
        &path,
        r#"{"auths":{"reg.lan":{"username":"u1","password":"p"}}}"#,
    )
    .unwrap();
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("u1"));
    // Replaced atomically (a new inode), as `docker login` does.
    let tmp = dir.path().join("config.json.tmp");
    std::fs::write(
        &tmp,
        r#"{"auths":{"reg.lan":{"username":"u2","password":"p"}}}"#,
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("u2"));
    // Rewritten in place with a different size.
    std::fs::write(
        &path,
        r#"{"auths":{"reg.lan":{"username":"user3","password":"p"}}}"#,
    )
    .unwrap();
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("user3"));
    std::fs::write(&path, "{ half a file").unwrap();
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("user3"));
    std::fs::remove_file(&path).unwrap();
    assert_eq!(user(&k, "reg.lan"), None);
}

#[test]
fn a_bad_file_at_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, "{").unwrap();
    let err = DockerFile::open(path).err().unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn helper_answers_are_kept_until_refused_or_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let count = dir.path().join("count");
    // Answers a new username each run, so a cached answer is visible.
    let script = bin.join("docker-credential-counting");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat >/dev/null\necho x >> {c}\nn=$(wc -l < {c})\necho \"{{\\\"Username\\\":\\\"u$n\\\",\\\"Secret\\\":\\\"s\\\"}}\"\n",
            c = count.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"credHelpers":{"reg.lan":"counting"}}"#).unwrap();
    let k = DockerFile::open(path.clone())
        .unwrap()
        .with_search_path(&bin);
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("u1"));
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("u1"));
    k.refused(&repo("reg.lan"));
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("u2"));
    std::fs::write(
        &path,
        r#"{"credHelpers":{"reg.lan":"counting"}, "auths":{}}"#,
    )
    .unwrap();
    assert_eq!(user(&k, "reg.lan").as_deref(), Some("u3"));
}
