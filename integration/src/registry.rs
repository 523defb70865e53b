//! A registry to push test images to: the test bed's registry (a real
//! Debian `docker-registry`, distribution 2.8, started by
//! `scripts/testbed.sh` on a free 127.0.0.1 port, its JSON log in a file),
//! with helpers that push blobs, manifests and images over its API.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tarn_fs::Digest;

use crate::reglog::{Request, read_settled};
use crate::testbed::{Component, Testbed};

/// A layer to push: its blob bytes and its manifest annotations.
pub type TestLayer = (Vec<u8>, Vec<(String, String)>);

/// A running registry, stopped with its test bed on drop.
pub struct TestRegistry {
    bed: Testbed,
    host: String,
    /// Credentials the registry demands (htpasswd), used by the push helpers.
    basic: Option<(String, String)>,
    http: reqwest::Client,
}

impl TestRegistry {
    /// An anonymous registry.
    pub fn start() -> Result<TestRegistry> {
        TestRegistry::launch(None)
    }

    /// The registry of a test bed with more components (containerd, for a
    /// test that pushes hand-made images and pulls them through it).
    pub fn start_in_bed(components: &[Component]) -> Result<TestRegistry> {
        let bed = Testbed::up(components)?;
        let host = bed.registry()?.to_owned();
        Ok(TestRegistry {
            bed,
            host,
            basic: None,
            http: reqwest::Client::new(),
        })
    }

    /// The test bed the registry belongs to.
    pub fn bed(&self) -> &Testbed {
        &self.bed
    }

    /// A registry that demands HTTP basic auth with this user (htpasswd).
    pub fn start_with_basic_auth(user: &str, password: &str) -> Result<TestRegistry> {
        TestRegistry::launch(Some((user.to_string(), password.to_string())))
    }

    fn launch(basic: Option<(String, String)>) -> Result<TestRegistry> {
        let htpasswd = match &basic {
            Some((user, password)) => Some(htpasswd_line(user, password)?),
            None => None,
        };
        let bed = Testbed::up_with(&[Component::Registry], htpasswd.as_deref())?;
        let host = bed.registry()?.to_owned();
        Ok(TestRegistry {
            bed,
            host,
            basic,
            http: reqwest::Client::new(),
        })
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        self.host.clone()
    }

    /// The test bed's directory, a place for the test's own files too.
    pub fn dir(&self) -> &Path {
        self.bed.dir()
    }

    pub fn log_path(&self) -> PathBuf {
        self.bed.dir().join("registry.log")
    }

    /// Every completed request so far, in order.
    pub fn log(&self) -> Result<Vec<Request>> {
        Ok(read_settled(&self.log_path())?)
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

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One htpasswd line, `user:BCRYPT-HASH\n`, for a registry with basic auth.
pub fn htpasswd_line(user: &str, password: &str) -> Result<String> {
    Ok(format!("{user}:{}\n", bcrypt(password)?))
}

/// A bcrypt hash for htpasswd, made by Debian's python3 (libcrypt's `$2b$`,
/// which distribution's Go bcrypt accepts).
pub fn bcrypt(password: &str) -> Result<String> {
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
