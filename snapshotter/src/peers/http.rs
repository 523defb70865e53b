//! The block server: `GET /v1/blocks/<digest>/<index>?repo=..&size=..`
//! over plain HTTP/1.1 (`crate::httpd`: a bound on connections, a header
//! timeout). The protocol is documented in
//! `tarn_fs::peer`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode};
use tarn_fs::peer::{BlockRequest, Peers};
use tokio::net::TcpListener;

/// Connections served at once: a node's peers each keep a few (a read's
/// blocks are asked at once); one past them is closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Serves `peers`' block store on `listener` until `stop` resolves.
/// Without a store (`Peers::serve_locally` not called) every request gets
/// 503.
pub async fn serve(
    listener: TcpListener,
    peers: Peers,
    stop: impl std::future::Future<Output = ()>,
) {
    let respond = move |req| answer(req, peers.clone());
    crate::httpd::serve(listener, "peers", MAX_CONNECTIONS, respond, stop).await;
}

async fn answer(req: Request<Incoming>, peers: Peers) -> Result<Response<Body>, Infallible> {
    let plain = |status: StatusCode, text: &str| {
        let mut r = Response::new(Body(Some(Bytes::from(format!("{text}\n")))));
        *r.status_mut() = status;
        r
    };
    // The token first: a caller without it learns nothing, not even
    // whether its request was well formed.
    let auth = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    if !peers.authorized(auth) {
        return Ok(plain(
            StatusCode::UNAUTHORIZED,
            "the cluster token is required",
        ));
    }
    if req.method() != Method::GET {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET only"));
    }
    let block = match BlockRequest::parse(req.uri().path(), req.uri().query()) {
        Ok(b) => b,
        Err(e) => return Ok(plain(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    let Some(store) = peers.local() else {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "no block store"));
    };
    let (digest, index) = (block.digest, block.index);
    match store.block(block).await {
        Ok(bytes) => {
            peers.served(bytes.len());
            Ok(Response::new(Body(Some(bytes))))
        }
        Err(e) => {
            tracing::info!(blob = %digest, index, error = %e, "peers: block not served");
            let status = if e.is_transient() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_GATEWAY
            };
            Ok(plain(status, &e.to_string()))
        }
    }
}

/// A body of one piece of bytes, known length.
pub struct Body(Option<Bytes>);

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::future::BoxFuture;
    use tarn_fs::Digest;
    use tarn_fs::Intent;
    use tarn_fs::peer::{OwnBlocks, PeerBlob, PeerSettings};
    use tarn_fs::registry::{BlobSource, RegistryError, Repository};

    use super::*;

    /// A store of one blob that counts what it was asked.
    struct Store {
        data: Vec<u8>,
        asked: Mutex<u32>,
    }

    impl OwnBlocks for Store {
        fn block(&self, req: BlockRequest) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
            Box::pin(async move {
                *self.asked.lock().unwrap() += 1;
                let r = req.range();
                Ok(Bytes::copy_from_slice(
                    &self.data[usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()],
                ))
            })
        }
    }

    /// One request on its own connection: the status and the body.
    async fn raw_get(addr: &str, target: &str, token: Option<&str>) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        let head = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        let status = text.split(' ').nth(1).unwrap().parse().unwrap();
        let at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (status, answer[at..].to_vec())
    }

    fn peers(token: &str, members: Vec<String>, own: Option<String>) -> Peers {
        Peers::new(PeerSettings {
            own,
            members,
            token: token.into(),
            first_byte: Duration::from_secs(2),
            total: Duration::from_secs(10),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_block_is_served_to_the_token_only() {
        // Three blocks, the last shorter.
        let block = usize::try_from(tarn_fs::peer::BLOCK).unwrap();
        let len = 3 * block - 1000;
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = peers("right", vec![], Some(addr.clone()));
        let store = Arc::new(Store {
            data: data.clone(),
            asked: Mutex::new(0),
        });
        server.serve_locally(store.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, server.clone(), async {
            let _ = stop_rx.await;
        }));
        let repo = Repository {
            registry: "127.0.0.1:5000".into(),
            name: "app".into(),
        };
        let blob = |p: &Peers| {
            PeerBlob::new(
                p.clone(),
                repo.clone(),
                Digest::of(&data),
                data.len() as u64,
            )
        };

        let client = peers("right", vec![addr.clone()], None);
        let got = blob(&client)
            .read_range(
                (block - 1000) as u64..(2 * block + 100) as u64,
                Intent::OnDemand,
            )
            .await
            .unwrap();
        assert_eq!(&got[..], &data[block - 1000..2 * block + 100]);
        // The parts of blocks 0, 1 and 2 the range covers, and no more.
        let asked = (block + 1100) as u64;
        assert_eq!(server.stats().served_bytes, asked);
        assert_eq!(client.stats().received_bytes, asked);

        let wrong = peers("wrong", vec![addr.clone()], None);
        let e = blob(&wrong)
            .read_range(0..10, Intent::OnDemand)
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
        assert_eq!(*store.asked.lock().unwrap(), 3, "nothing fetched for it");

        // Plain requests: no token, a malformed one.
        let d = Digest::of(&data);
        let target = format!("/v1/blocks/{d}/0?repo=127.0.0.1:5000/app&size={len}");
        let (status, body) = raw_get(&addr, &target, None).await;
        assert_eq!(status, 401);
        assert!(body.len() < 100, "no block bytes");
        let target = format!("/v1/blocks/{d}/9?repo=127.0.0.1:5000/app&size={len}");
        let (status, _) = raw_get(&addr, &target, Some("right")).await;
        assert_eq!(status, 400);
        assert_eq!(server.stats().served_bytes, asked);
        let _ = stop_tx.send(());
        task.await.unwrap();
    }
}
