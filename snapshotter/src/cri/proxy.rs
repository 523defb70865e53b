//! CRI's image service (`runtime.v1.ImageService`) as a proxy in front of
//! containerd's: the kubelet's `--image-service-endpoint` points here.
//! Every call is forwarded as the bytes it came with (a raw codec, no
//! decode and re-encode, so fields newer than tarn's copy of the API pass
//! through untouched), with its metadata, and containerd's answer or error
//! is returned as it is. A `PullImage` is also decoded, from a copy, for
//! its image and auth, which are captured before the call goes on: by the
//! time containerd asks tarn to Prepare the image's layers, tarn has the
//! credentials.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tarn_proto::cri::PullImageRequest;
use tokio::net::UnixStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use super::store::CriCredentials;
use crate::errors::chain;

/// The service the kubelet calls; every method of it is forwarded.
pub const SERVICE: &str = "runtime.v1.ImageService";
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
/// The kubelet's own limit on a CRI message (ListImages of a full node).
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// How long the first connection to containerd may take; calls wait for
/// it, so a kubelet that starts before containerd sees UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A gRPC message as bytes, not decoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A channel to containerd's CRI socket, connected on first use (and again
/// after containerd restarts).
pub fn containerd_channel(socket: PathBuf) -> Channel {
    // The URI is required by tonic but unused: every connection is the
    // unix socket.
    Endpoint::from_static("http://[::]:0")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
}

/// The image service proxy: a tower service for tonic's router.
#[derive(Clone)]
pub struct ImageProxy {
    upstream: Channel,
    credentials: Arc<CriCredentials>,
}

impl ImageProxy {
    pub fn new(upstream: Channel, credentials: Arc<CriCredentials>) -> ImageProxy {
        ImageProxy {
            upstream,
            credentials,
        }
    }
}

impl NamedService for ImageProxy {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for ImageProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let forward = Forward {
            path: req.uri().path_and_query().cloned(),
            upstream: self.upstream.clone(),
            credentials: self.credentials.clone(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            // Every method of the image service is unary.
            Ok(grpc.unary(forward, req).await)
        })
    }
}

/// One call on its way to containerd.
struct Forward {
    path: Option<http::uri::PathAndQuery>,
    upstream: Channel,
    credentials: Arc<CriCredentials>,
}

impl UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let path = self.path.take();
        let upstream = self.upstream.clone();
        let credentials = self.credentials.clone();
        Box::pin(async move {
            let path = path.ok_or_else(|| Status::internal("request without a path"))?;
            if path.path() == PULL_IMAGE {
                capture(&credentials, request.get_ref()).await;
            }
            let mut client = tonic::client::Grpc::new(upstream)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            client.ready().await.map_err(|e| {
                Status::unavailable(format!("containerd's CRI socket: {}", chain(&e)))
            })?;
            // The caller's metadata (and deadline) go on with the message;
            // containerd's status, message and details come back as they are.
            let (metadata, extensions, message) = request.into_parts();
            let forwarded = Request::from_parts(metadata, extensions, message);
            client.unary(forwarded, path, RawCodec).await
        })
    }
}

/// Captures a `PullImage`'s credentials. A request tarn cannot read or
/// store is still forwarded: containerd decides whether the pull works;
/// tarn only loses the lazy path for it (its Prepare falls back).
async fn capture(credentials: &CriCredentials, message: &Bytes) {
    let req = match PullImageRequest::decode(message.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cri: cannot decode a PullImage request; forwarding it");
            return;
        }
    };
    let image = req.image.map(|i| i.image).unwrap_or_default();
    let Some(auth) = req.auth else {
        return;
    };
    match credentials.capture(&image, &auth).await {
        Ok(Some(repo)) => {
            tracing::info!(image, repository = %repo, "cri: captured pull credentials")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            image,
            error = %chain(&e),
            "cri: pull credentials not kept; lazy layers of this image may fall back"
        ),
    }
}
