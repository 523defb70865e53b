//! A real Debian `docker-registry` (distribution 2.8) for tests: started on a
//! free 127.0.0.1 port with filesystem storage in a temp dir, its JSON log in
//! a file, killed by PID on drop.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tarn_fs::Digest;

/// One request as the registry logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// The request URI: path and query.
    pub path: String,
    pub status: u16,
    /// Body bytes the registry wrote (`http.response.written`).
    pub written: u64,
}

/// A running registry. Distribution 2.8 does not log request headers, so a
/// ranged GET shows only as status 206 with the bytes it wrote.
/// A layer to push: its blob bytes and its manifest annotations.
pub type TestLayer = (Vec<u8>, Vec<(String, String)>);

pub struct TestRegistry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    /// Credentials the registry demands (htpasswd), used by the push helpers.
    basic: Option<(String, String)>,
    http: reqwest::Client,
}

impl TestRegistry {
    /// An anonymous registry.
    pub fn start() -> Result<TestRegistry> {
        TestRegistry::launch(None)
    }

    /// A registry that demands HTTP basic auth with this user (htpasswd).
    pub fn start_with_basic_auth(user: &str, password: &str) -> Result<TestRegistry> {
        TestRegistry::launch(Some((user.to_string(), password.to_string())))
    }

    fn launch(basic: Option<(String, String)>) -> Result<TestRegistry> {
        let dir = tempfile::Builder::new()
            .prefix("tarn-registry-")
            .tempdir()?;
        let port = free_port()?;
        let mut auth = String::new();
        if let Some((user, password)) = &basic {
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{user}:{}\n", bcrypt(password)?))?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: tarn-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config)?;
        let log = fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let reg = TestRegistry {
            child,
            dir,
            port,
            basic,
            http: reqwest::Client::new(),
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "docker-registry did not listen on {} within 10 s; log:\n{}",
            self.port,
            fs::read_to_string(self.log_path()).unwrap_or_default()
        )
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Every completed request so far, in order.
    pub fn log(&self) -> Result<Vec<LoggedRequest>> {
        let text = crate::settle::read_settled(&self.log_path())?;
        Ok(parse_log(&text))
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, url);
        match &self.basic {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    /// Uploads a blob (monolithic: POST, then PUT `?digest=`); returns its
    /// digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Result<Digest> {
        let digest = Digest::of(data);
        let start = format!("http://{}/v2/{repo}/blobs/uploads/", self.host());
        let resp = self.request(reqwest::Method::POST, &start).send().await?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            bail!("upload start for {repo}: {}", resp.status());
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .context("upload start without Location")?
            .to_str()?;
        let mut url = reqwest::Url::parse(&start)?.join(location)?;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let resp = self
            .request(reqwest::Method::PUT, url.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!("blob upload {digest} to {repo}: {}", resp.status());
        }
        Ok(digest)
    }

    /// Stores a manifest or index under `reference` (a tag or a digest);
    /// returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest> {
        let url = format!("http://{}/v2/{repo}/manifests/{reference}", self.host());
        let resp = self
            .request(reqwest::Method::PUT, &url)
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            let status = resp.status();
            bail!(
                "manifest {repo}:{reference}: {status}: {}",
                resp.text().await?
            );
        }
        Ok(Digest::of(bytes))
    }

    /// Pushes an OCI image: a small linux/amd64 config and the given layers
    /// (arbitrary bytes; the registry does not look inside), each with its
    /// annotations. Tags it with `tag` if given. Returns the manifest's
    /// digest and bytes.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: Option<&str>,
        arch: &str,
        layers: &[TestLayer],
    ) -> Result<(Digest, Vec<u8>)> {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }))?;
        let config_digest = self.push_blob(repo, &config).await?;
        let mut descs = Vec::new();
        for (data, annotations) in layers {
            let d = self.push_blob(repo, data).await?;
            let ann: serde_json::Map<String, serde_json::Value> = annotations
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d.to_string(),
                "size": data.len(),
                "annotations": ann,
            }));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config.len(),
            },
            "layers": descs,
        }))?;
        let digest = Digest::of(&manifest);
        let reference = tag.map_or_else(|| digest.to_string(), str::to_string);
        self.push_manifest(repo, &reference, OCI_MANIFEST, &manifest)
            .await?;
        Ok((digest, manifest))
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry's log as requests. Distribution 2.8 logs a served request
/// as "response completed" (or "... with error" for 4xx/5xx), and a request
/// refused by auth only as "error authorizing context: ..." without a
/// status: that one is a 401.
pub fn parse_log(text: &str) -> Vec<LoggedRequest> {
    let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let msg = v["msg"].as_str().unwrap_or_default();
            let status = if msg.starts_with("response completed") {
                v["http.response.status"]
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(0)
            } else if msg.starts_with("error authorizing context") {
                401
            } else {
                return None;
            };
            Some(LoggedRequest {
                method: field(&v, "http.request.method"),
                path: field(&v, "http.request.uri"),
                status,
                written: v["http.response.written"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A bcrypt hash for htpasswd, made by Debian's python3 (libcrypt's `$2b$`,
/// which distribution's Go bcrypt accepts).
fn bcrypt(password: &str) -> Result<String> {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
            password,
        ])
        .output()
        .context("running /usr/bin/python3 for a bcrypt hash")?;
    let hash = String::from_utf8(out.stdout)?.trim().to_string();
    if !out.status.success() || !hash.starts_with("$2") {
        bail!(
            "python3 crypt gave no bcrypt hash: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distribution_json_log_lines() {
        let text = r#"{"level":"info","msg":"listening on 127.0.0.1:1"}
{"http.request.method":"GET","http.request.uri":"/v2/a/blobs/sha256:00","http.response.status":206,"http.response.written":100,"level":"info","msg":"response completed"}
not json
{"http.request.method":"HEAD","http.request.uri":"/v2/","http.response.status":200,"level":"info","msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/x/manifests/a","http.response.status":404,"http.response.written":96,"msg":"response completed with error"}
{"http.request.method":"GET","http.request.uri":"/v2/x/manifests/b","level":"warning","msg":"error authorizing context: basic authentication challenge"}"#;
        let log = parse_log(text);
        assert_eq!(log.len(), 4);
        assert_eq!(
            log[0],
            LoggedRequest {
                method: "GET".into(),
                path: "/v2/a/blobs/sha256:00".into(),
                status: 206,
                written: 100,
            }
        );
        assert_eq!(log[1].written, 0);
        assert_eq!((log[2].status, log[2].written), (404, 96));
        assert_eq!(
            (log[3].status, log[3].path.as_str()),
            (401, "/v2/x/manifests/b")
        );
    }
}
