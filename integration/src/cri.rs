//! A small typed client of the Kubernetes CRI (runtime.v1) that containerd's
//! CRI plugin serves on its main socket: what the tests need to pull an image,
//! run a pod sandbox and one container in it, and read the container's output
//! the way the kubelet does (from the log file CRI writes).
//!
//! Pods are host-network (no CNI on the test bed) and have no hostname. Every
//! pod, container and image made through a [`Cri`] is removed again when it
//! is dropped, also when a test fails half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainersRequest, ListImagesRequest, ListPodSandboxRequest, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemoveImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
    VersionResponse,
};
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::wait::wait_until_async;

/// The CRI API version this client speaks.
const API_VERSION: &str = "v1";
/// Kubernetes namespace of the pods the tests make.
const POD_NAMESPACE: &str = "tarn-test";
/// Grace period given to a container on stop before it is killed.
const STOP_TIMEOUT_SECS: i64 = 5;

/// What can go wrong talking to CRI.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to cri at {sock}: {source}")]
    Connect {
        sock: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    // Boxed: a Status is large and would bloat every Result of this module.
    #[error("cri {call} {subject}: {source}")]
    Call {
        call: &'static str,
        subject: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("cri {call} {subject}: the response lacks {field}")]
    Incomplete {
        call: &'static str,
        subject: String,
        field: &'static str,
    },
    #[error("container {id} still {state} after {waited:?}")]
    Timeout {
        id: String,
        state: String,
        waited: Duration,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown pod sandbox {0} (not made by this client)")]
    UnknownPod(String),
}

impl CriError {
    fn call(call: &'static str, subject: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let subject = subject.into();
        move |status| CriError::Call {
            call,
            subject,
            source: Box::new(status),
        }
    }
}

/// A stream of a container's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line a container wrote, joined from CRI's partial records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: Stream,
    pub line: String,
}

/// Parses a CRI container log: `TIMESTAMP STREAM TAG CONTENT` per record,
/// where TAG `P` marks a partial line continued by the next record of the
/// same stream and `F` a full (final) one. Records that do not have this form
/// are skipped: a log being written may end in a torn record.
pub fn parse_log(text: &str) -> Vec<LogLine> {
    let mut lines = Vec::new();
    let mut partial: HashMap<&str, String> = HashMap::new();
    for record in text.lines() {
        let mut fields = record.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag), content) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let stream_kind = match stream {
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            _ => continue,
        };
        let buf = partial.entry(stream).or_default();
        buf.push_str(content.unwrap_or(""));
        // A tag may carry more flags after a colon (`F:x`); the first says
        // whether the line is complete.
        if tag.split(':').next() == Some("F") {
            lines.push(LogLine {
                stream: stream_kind,
                line: std::mem::take(buf),
            });
        }
    }
    lines
}

/// What this client made and has not removed yet, for cleanup.
#[derive(Debug, Default)]
struct Owned {
    /// Containers, oldest first.
    containers: Vec<String>,
    /// Pod sandboxes with the config they were made with (CreateContainer
    /// needs it again).
    pods: Vec<(String, PodSandboxConfig)>,
    /// Image references pulled.
    images: Vec<String>,
}

impl Owned {
    fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.pods.is_empty() && self.images.is_empty()
    }
}

/// A CRI client bound to one containerd socket. Dropping it removes every
/// container, pod and image it made.
pub struct Cri {
    sock: PathBuf,
    channel: Channel,
    /// The image service: containerd's socket, or a proxy in front of it
    /// (the kubelet's `--image-service-endpoint`).
    image_channel: Channel,
    /// Parent of the pods' log directories.
    logs: TempDir,
    // A std mutex: held only for pushes and removals, never across `.await`.
    owned: Mutex<Owned>,
}

fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn channel(sock: &Path) -> Result<Channel, CriError> {
    let path = sock.to_path_buf();
    // The URI is required by tonic but unused: every connection is the
    // unix socket.
    Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|source| CriError::Connect {
            sock: sock.to_path_buf(),
            source,
        })
}

fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// Host network, the pod's own pid and ipc namespaces.
fn host_network() -> Option<NamespaceOption> {
    Some(NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    })
}

impl Cri {
    /// Connects to the CRI service on containerd's socket.
    pub async fn connect(containerd_sock: impl AsRef<Path>) -> Result<Cri, CriError> {
        Cri::connect_with_image_service(containerd_sock.as_ref(), containerd_sock.as_ref()).await
    }

    /// Connects to the runtime service on containerd's socket and to the
    /// image service on `image_sock`, as a kubelet with
    /// `--image-service-endpoint` does. Cleanup goes to containerd.
    pub async fn connect_with_image_service(
        containerd_sock: &Path,
        image_sock: &Path,
    ) -> Result<Cri, CriError> {
        let sock = containerd_sock.to_path_buf();
        let channel = channel(&sock).await?;
        let image_channel = if image_sock == containerd_sock {
            channel.clone()
        } else {
            self::channel(image_sock).await?
        };
        let logs = tempfile::Builder::new()
            .prefix("tarn-cri-logs-")
            .tempdir()
            .map_err(|source| CriError::Io {
                what: "creating log directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        Ok(Cri {
            sock,
            channel,
            image_channel,
            logs,
            owned: Mutex::new(Owned::default()),
        })
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.image_channel.clone())
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, Owned> {
        // A panic while holding this lock leaves plain lists behind: still
        // usable for cleanup.
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runtime's name and version.
    pub async fn version(&self) -> Result<VersionResponse, CriError> {
        let req = VersionRequest {
            version: API_VERSION.to_owned(),
        };
        Ok(self
            .runtime()
            .version(req)
            .await
            .map_err(CriError::call("version", API_VERSION))?
            .into_inner())
    }

    /// Pulls `image` with the configured snapshotter; returns the image id
    /// (`sha256:...` of its config). The image is removed on drop.
    pub async fn pull_image(&self, image: &str) -> Result<String, CriError> {
        self.pull_image_with_auth(image, None).await
    }

    /// [`Cri::pull_image`] with the credentials a kubelet sends from a pod's
    /// image pull secret.
    pub async fn pull_image_with_auth(
        &self,
        image: &str,
        auth: Option<AuthConfig>,
    ) -> Result<String, CriError> {
        let req = PullImageRequest {
            image: image_spec(image),
            auth,
            ..Default::default()
        };
        let id = self
            .images()
            .pull_image(req)
            .await
            .map_err(CriError::call("pull image", image))?
            .into_inner()
            .image_ref;
        self.owned().images.push(image.to_owned());
        Ok(id)
    }

    /// Removes an image (by reference or id).
    pub async fn remove_image(&self, image: &str) -> Result<(), CriError> {
        remove_image(&mut self.images(), image).await?;
        self.owned().images.retain(|i| i != image);
        Ok(())
    }

    /// Starts a host-network pod sandbox named `name`; returns its id.
    pub async fn run_pod(&self, name: &str) -> Result<String, CriError> {
        let dir = self.logs.path().join(unique());
        tokio::fs::create_dir(&dir)
            .await
            .map_err(|source| CriError::Io {
                what: "creating pod log directory",
                path: dir.clone(),
                source,
            })?;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: unique(),
                namespace: POD_NAMESPACE.to_owned(),
                attempt: 0,
            }),
            // No hostname: a host-network pod may not set one.
            log_directory: dir.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: host_network(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            ..Default::default()
        };
        let id = self
            .runtime()
            .run_pod_sandbox(req)
            .await
            .map_err(CriError::call("run pod sandbox", name))?
            .into_inner()
            .pod_sandbox_id;
        if id.is_empty() {
            return Err(CriError::Incomplete {
                call: "run pod sandbox",
                subject: name.to_owned(),
                field: "pod_sandbox_id",
            });
        }
        self.owned().pods.push((id.clone(), config));
        Ok(id)
    }

    /// Creates (does not start) a container in `pod` running `image` with
    /// `command` (the entrypoint; empty: the image's) and `args`. Its output
    /// goes to a log file read by [`Cri::logs`].
    pub async fn create_container(
        &self,
        pod: &str,
        image: &str,
        command: &[&str],
        args: &[&str],
    ) -> Result<String, CriError> {
        let sandbox = self
            .owned()
            .pods
            .iter()
            .find(|(id, _)| id == pod)
            .map(|(_, config)| config.clone())
            .ok_or_else(|| CriError::UnknownPod(pod.to_owned()))?;
        let name = format!("c-{}", unique());
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: image_spec(image),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: host_network(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config),
            sandbox_config: Some(sandbox),
        };
        let id = self
            .runtime()
            .create_container(req)
            .await
            .map_err(CriError::call(
                "create container",
                format!("{image} in {pod}"),
            ))?
            .into_inner()
            .container_id;
        self.owned().containers.push(id.clone());
        Ok(id)
    }

    pub async fn start(&self, container: &str) -> Result<(), CriError> {
        let req = StartContainerRequest {
            container_id: container.to_owned(),
        };
        self.runtime()
            .start_container(req)
            .await
            .map_err(CriError::call("start container", container))?;
        Ok(())
    }

    pub async fn container_status(&self, container: &str) -> Result<ContainerStatus, CriError> {
        let req = ContainerStatusRequest {
            container_id: container.to_owned(),
            verbose: false,
        };
        self.runtime()
            .container_status(req)
            .await
            .map_err(CriError::call("container status", container))?
            .into_inner()
            .status
            .ok_or_else(|| CriError::Incomplete {
                call: "container status",
                subject: container.to_owned(),
                field: "status",
            })
    }

    /// Waits until `container` has exited; returns its exit code.
    pub async fn wait_exit(&self, container: &str, timeout: Duration) -> Result<i32, CriError> {
        let exited = wait_until_async("the container to exit", timeout, || async {
            match self.container_status(container).await {
                Ok(s) if s.state == ContainerState::ContainerExited as i32 => Some(Ok(s.exit_code)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        })
        .await;
        match exited {
            Ok(code) => code,
            Err(_) => {
                let status = self.container_status(container).await?;
                let state = ContainerState::try_from(status.state)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| status.state.to_string());
                Err(CriError::Timeout {
                    id: container.to_owned(),
                    state,
                    waited: timeout,
                })
            }
        }
    }

    /// Every line `container` has written so far, both streams in order.
    pub async fn logs(&self, container: &str) -> Result<Vec<LogLine>, CriError> {
        // containerd reports the full path: the pod's log directory joined
        // with the container's log path.
        let path = PathBuf::from(self.container_status(container).await?.log_path);
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|source| CriError::Io {
                what: "reading container log",
                path,
                source,
            })?;
        Ok(parse_log(&text))
    }

    /// The container's standard output so far, one `\n` after each line.
    pub async fn stdout(&self, container: &str) -> Result<String, CriError> {
        Ok(self
            .logs(container)
            .await?
            .into_iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.line + "\n")
            .collect())
    }

    pub async fn stop_container(&self, container: &str) -> Result<(), CriError> {
        stop_container(&mut self.runtime(), container).await
    }

    pub async fn remove_container(&self, container: &str) -> Result<(), CriError> {
        remove_container(&mut self.runtime(), container).await?;
        self.owned().containers.retain(|c| c != container);
        Ok(())
    }

    pub async fn stop_pod(&self, pod: &str) -> Result<(), CriError> {
        stop_pod(&mut self.runtime(), pod).await
    }

    /// Removes a pod sandbox and (as CRI does) its containers.
    pub async fn remove_pod(&self, pod: &str) -> Result<(), CriError> {
        remove_pod(&mut self.runtime(), pod).await?;
        self.owned().pods.retain(|(id, _)| id != pod);
        Ok(())
    }

    /// Ids of every pod sandbox the runtime knows, made here or not.
    pub async fn list_pods(&self) -> Result<Vec<String>, CriError> {
        let req = ListPodSandboxRequest { filter: None };
        Ok(self
            .runtime()
            .list_pod_sandbox(req)
            .await
            .map_err(CriError::call("list pod sandboxes", ""))?
            .into_inner()
            .items
            .into_iter()
            .map(|p| p.id)
            .collect())
    }

    /// Ids of every container the runtime knows, made here or not.
    pub async fn list_containers(&self) -> Result<Vec<String>, CriError> {
        let req = ListContainersRequest { filter: None };
        Ok(self
            .runtime()
            .list_containers(req)
            .await
            .map_err(CriError::call("list containers", ""))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect())
    }

    /// Every image CRI knows, as its tags (or its id when untagged).
    pub async fn list_images(&self) -> Result<Vec<String>, CriError> {
        let req = ListImagesRequest { filter: None };
        Ok(self
            .images()
            .list_images(req)
            .await
            .map_err(CriError::call("list images", ""))?
            .into_inner()
            .images
            .into_iter()
            .flat_map(|i| {
                if i.repo_tags.is_empty() {
                    vec![i.id]
                } else {
                    i.repo_tags
                }
            })
            .collect())
    }

    /// Removes everything this client made and has not removed yet: its
    /// containers, pods and images, in that order. Keeps going past
    /// failures and reports the first.
    pub async fn cleanup(&self) -> Result<(), CriError> {
        let owned = std::mem::take(&mut *self.owned());
        clean(&self.channel, owned).await
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        let owned = std::mem::take(&mut *self.owned());
        if owned.is_empty() {
            return;
        }
        // Drop may run inside a (possibly single-threaded) tokio runtime,
        // where nothing can be awaited and our channel's worker task would
        // not make progress: clean up from a thread of its own, with its own
        // runtime and connection.
        let sock = self.sock.clone();
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cri cleanup: building a runtime: {e}"))?;
            rt.block_on(async {
                let channel = channel(&sock).await.map_err(|e| e.to_string())?;
                clean(&channel, owned).await.map_err(|e| e.to_string())
            })
        });
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cri cleanup: {e}"),
            Err(_) => eprintln!("cri cleanup: the cleanup thread panicked"),
        }
    }
}

/// A missing object is already gone: not an error for cleanup.
fn ignore_not_found(r: Result<(), CriError>) -> Result<(), CriError> {
    match r {
        Err(CriError::Call { source, .. }) if source.code() == tonic::Code::NotFound => Ok(()),
        other => other,
    }
}

async fn clean(channel: &Channel, owned: Owned) -> Result<(), CriError> {
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel.clone());
    let mut results = Vec::new();
    for c in owned.containers.iter().rev() {
        results.push(ignore_not_found(stop_container(&mut rt, c).await));
        results.push(ignore_not_found(remove_container(&mut rt, c).await));
    }
    for (p, _) in owned.pods.iter().rev() {
        results.push(ignore_not_found(stop_pod(&mut rt, p).await));
        results.push(ignore_not_found(remove_pod(&mut rt, p).await));
    }
    for i in owned.images.iter().rev() {
        results.push(ignore_not_found(remove_image(&mut img, i).await));
    }
    results.into_iter().collect()
}

async fn stop_container(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
) -> Result<(), CriError> {
    let req = StopContainerRequest {
        container_id: container.to_owned(),
        timeout: STOP_TIMEOUT_SECS,
    };
    rt.stop_container(req)
        .await
        .map_err(CriError::call("stop container", container))?;
    Ok(())
}

async fn remove_container(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
) -> Result<(), CriError> {
    let req = RemoveContainerRequest {
        container_id: container.to_owned(),
    };
    rt.remove_container(req)
        .await
        .map_err(CriError::call("remove container", container))?;
    Ok(())
}

async fn stop_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<(), CriError> {
    let req = StopPodSandboxRequest {
        pod_sandbox_id: pod.to_owned(),
    };
    rt.stop_pod_sandbox(req)
        .await
        .map_err(CriError::call("stop pod sandbox", pod))?;
    Ok(())
}

async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<(), CriError> {
    let req = RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_owned(),
    };
    rt.remove_pod_sandbox(req)
        .await
        .map_err(CriError::call("remove pod sandbox", pod))?;
    Ok(())
}

async fn remove_image(img: &mut ImageServiceClient<Channel>, image: &str) -> Result<(), CriError> {
    let req = RemoveImageRequest {
        image: image_spec(image),
    };
    img.remove_image(req)
        .await
        .map_err(CriError::call("remove image", image))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_become_lines() {
        let log = "\
2026-11-22T06:00:00.000000001Z stdout F hello world
2026-11-22T06:00:00.000000002Z stderr P par
2026-11-22T06:00:00.000000003Z stdout F 
2026-11-22T06:00:00.000000004Z stderr F tial
2026-11-22T06:00:00.000000005Z stdout P no end yet
2026-11-22T06:00:00.0000";
        let lines = parse_log(log);
        assert_eq!(
            lines,
            vec![
                LogLine {
                    stream: Stream::Stdout,
                    line: "hello world".into()
                },
                LogLine {
                    stream: Stream::Stdout,
                    line: String::new()
                },
                LogLine {
                    stream: Stream::Stderr,
                    line: "partial".into()
                },
            ]
        );
    }

    #[test]
    fn content_keeps_its_spaces() {
        let lines = parse_log("t stdout F  two  spaces \n");
        assert_eq!(lines[0].line, " two  spaces ");
    }
}
