//! The store's persistence, bounds and expiry; the proxy end to end between
//! a CRI client (the kubelet's side) and a fake containerd image service,
//! both from the k8s-cri crate's generated API.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use tarn_fs::registry::Repository;
use tarn_proto::cri::AuthConfig;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::proxy::{ImageProxy, containerd_channel};
use super::store::{self, CriCredentials, Secret};

const DAY: Duration = Duration::from_secs(86_400);

fn repo(registry: &str, name: &str) -> Repository {
    Repository {
        registry: registry.into(),
        name: name.into(),
    }
}

fn basic(user: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn secrets_are_read_as_containerd_reads_an_auth_config() {
    assert_eq!(Secret::of(&AuthConfig::default()), Ok(None), "anonymous");
    assert_eq!(
        Secret::of(&basic("u", "p")),
        Ok(Some(Secret::Basic {
            username: "u".into(),
            password: "p".into()
        }))
    );
    let auth = AuthConfig {
        auth: STANDARD.encode("user:pa:ss"),
        ..Default::default()
    };
    assert_eq!(
        Secret::of(&auth),
        Ok(Some(Secret::Basic {
            username: "user".into(),
            password: "pa:ss".into()
        })),
        "auth is base64 of user:password, split at the first colon"
    );
    let identity = AuthConfig {
        identity_token: "refresh".into(),
        ..Default::default()
    };
    assert_eq!(
        Secret::of(&identity),
        Ok(Some(Secret::IdentityToken {
            token: "refresh".into()
        }))
    );
    let bad = AuthConfig {
        auth: "!!".into(),
        ..Default::default()
    };
    assert!(Secret::of(&bad).is_err());
    let shown = format!("{:?}", Secret::of(&basic("u", "hunter2")).unwrap());
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn captured_credentials_survive_a_reopen_in_a_root_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let s = CriCredentials::open(dir.path(), DAY).unwrap();
    assert!(s.is_empty());
    let got = rt
        .block_on(s.capture("127.0.0.1:5000/team/app:v1", &basic("u", "p")))
        .unwrap();
    assert_eq!(got, Some(repo("127.0.0.1:5000", "team/app")));
    // Docker Hub's short names are normalised as the resolver normalises
    // the image ref label.
    rt.block_on(s.capture("busybox", &basic("hub", "x")))
        .unwrap();
    // An anonymous pull keeps what an earlier pull sent.
    assert_eq!(
        rt.block_on(s.capture("127.0.0.1:5000/team/app:v2", &AuthConfig::default()))
            .unwrap(),
        None
    );
    let file = dir.path().join(store::FILE_NAME);
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    assert!(
        !dir.path().join("cri-credentials.json.tmp").exists(),
        "no temp file left"
    );

    let again = CriCredentials::open(dir.path(), DAY).unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(
        again.lookup(&repo("127.0.0.1:5000", "team/app")),
        Some(Secret::Basic {
            username: "u".into(),
            password: "p".into()
        }),
        "any tag of the repository"
    );
    assert!(
        again
            .lookup(&repo("docker.io", "library/busybox"))
            .is_some()
    );
    assert_eq!(
        again.lookup(&repo("127.0.0.1:5000", "team/other")),
        None,
        "credentials are per repository"
    );
}

#[test]
fn expired_entries_are_neither_used_nor_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let s = CriCredentials::open(dir.path(), Duration::ZERO).unwrap();
    rt.block_on(s.capture("reg.lan/app", &basic("u", "p")))
        .unwrap();
    assert_eq!(s.lookup(&repo("reg.lan", "app")), None);
    let again = CriCredentials::open(dir.path(), DAY).unwrap();
    assert!(again.is_empty(), "an expired entry is not read back");
}

#[test]
fn the_store_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let s = CriCredentials::open(dir.path(), DAY).unwrap();
    let huge = "x".repeat(store::MAX_ENTRY_BYTES + 1);
    assert!(
        rt.block_on(s.capture("reg.lan/app", &basic("u", &huge)))
            .is_err(),
        "an oversized secret is refused"
    );
    for i in 0..store::MAX_ENTRIES + 5 {
        rt.block_on(s.capture(&format!("reg.lan/app{i}"), &basic("u", "p")))
            .unwrap();
    }
    assert_eq!(s.len(), store::MAX_ENTRIES);
    let again = CriCredentials::open(dir.path(), DAY).unwrap();
    assert_eq!(again.len(), store::MAX_ENTRIES);
    assert!(
        again
            .lookup(&repo("reg.lan", &format!("app{}", store::MAX_ENTRIES + 4)))
            .is_some(),
        "the newest is kept"
    );

    // A file that is not ours to read is an error, not a guess.
    let file = dir.path().join(store::FILE_NAME);
    std::fs::write(&file, "{\"version\": 9, \"entries\": []}").unwrap();
    assert!(CriCredentials::open(dir.path(), DAY).is_err());
    std::fs::write(&file, "not json").unwrap();
    assert!(CriCredentials::open(dir.path(), DAY).is_err());
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(store::MAX_FILE_BYTES + 1).unwrap();
    assert!(matches!(
        CriCredentials::open(dir.path(), DAY),
        Err(store::StoreError::TooLarge { .. })
    ));
}

/// What the fake containerd saw.
#[derive(Default)]
struct Seen {
    pulls: Vec<cri::PullImageRequest>,
    metadata: Vec<Option<String>>,
}

/// containerd's image service, as far as these tests need it.
#[derive(Clone, Default)]
struct FakeContainerd {
    seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl ImageService for FakeContainerd {
    async fn list_images(
        &self,
        _r: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        Ok(Response::new(cri::ListImagesResponse {
            images: vec![cri::Image {
                id: "sha256:1".into(),
                repo_tags: vec!["reg.lan/app:v1".into()],
                ..Default::default()
            }],
        }))
    }

    async fn image_status(
        &self,
        _r: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        Err(Status::not_found("no such image"))
    }

    async fn pull_image(
        &self,
        r: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let mut seen = self.seen.lock().unwrap();
        seen.metadata.push(
            r.metadata()
                .get("x-test")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        );
        seen.pulls.push(r.into_inner());
        Ok(Response::new(cri::PullImageResponse {
            image_ref: "sha256:abc".into(),
        }))
    }

    async fn remove_image(
        &self,
        _r: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _r: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        Ok(Response::new(cri::ImageFsInfoResponse::default()))
    }
}

fn serve_on(path: &Path, router: tonic::transport::server::Router) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(router.serve_with_incoming(UnixListenerStream::new(listener)));
}

async fn client(path: PathBuf) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(containerd_channel(path))
}

#[test]
fn the_proxy_forwards_every_call_and_captures_pull_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = dir.path().join("containerd.sock");
    let proxy_sock = dir.path().join("tarn-cri.sock");
    let fake = FakeContainerd::default();
    let store = Arc::new(CriCredentials::open(dir.path(), DAY).unwrap());
    let rt = runtime();
    rt.block_on(async {
        serve_on(
            &upstream,
            tonic::transport::Server::builder().add_service(ImageServiceServer::new(fake.clone())),
        );
        serve_on(
            &proxy_sock,
            tonic::transport::Server::builder().add_service(ImageProxy::new(
                containerd_channel(upstream.clone()),
                store.clone(),
            )),
        );
        let mut kubelet = client(proxy_sock.clone()).await;

        let pull = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: "reg.lan/team/app:v1".into(),
                annotations: [("k".to_string(), "v".to_string())].into(),
                ..Default::default()
            }),
            auth: Some(cri::AuthConfig {
                username: "alice".into(),
                password: "s3cret".into(),
                server_address: "reg.lan".into(),
                ..Default::default()
            }),
            sandbox_config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "pod".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let mut req = Request::new(pull.clone());
        req.metadata_mut().insert("x-test", "kept".parse().unwrap());
        let answer = kubelet.pull_image(req).await.unwrap().into_inner();
        assert_eq!(answer.image_ref, "sha256:abc", "containerd's answer");
        {
            let seen = fake.seen.lock().unwrap();
            assert_eq!(
                seen.pulls,
                vec![pull],
                "containerd gets the request unchanged, fields tarn does not read included"
            );
            assert_eq!(seen.metadata, vec![Some("kept".to_string())]);
        }
        assert_eq!(
            store.lookup(&repo("reg.lan", "team/app")),
            Some(Secret::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            })
        );

        let images = kubelet
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(images.images[0].repo_tags, vec!["reg.lan/app:v1"]);
        let status = kubelet
            .image_status(cri::ImageStatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "containerd's error");
        assert_eq!(status.message(), "no such image");
        kubelet
            .remove_image(cri::RemoveImageRequest::default())
            .await
            .unwrap();
        kubelet
            .image_fs_info(cri::ImageFsInfoRequest::default())
            .await
            .unwrap();
    });
    // Persisted: a restarted daemon has them.
    let again = CriCredentials::open(dir.path(), DAY).unwrap();
    assert!(again.lookup(&repo("reg.lan", "team/app")).is_some());
}

#[test]
fn without_containerd_the_proxy_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_sock = dir.path().join("tarn-cri.sock");
    let store = Arc::new(CriCredentials::in_memory_at(dir.path(), DAY));
    let rt = runtime();
    rt.block_on(async {
        serve_on(
            &proxy_sock,
            tonic::transport::Server::builder().add_service(ImageProxy::new(
                containerd_channel(dir.path().join("nobody.sock")),
                store,
            )),
        );
        let mut kubelet = client(proxy_sock).await;
        let e = kubelet
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    });
}
