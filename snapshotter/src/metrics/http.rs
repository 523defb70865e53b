//! Serving [`Metrics`] over plain HTTP/1.1 with hyper (already in the tree
//! under tonic): `GET /metrics` and nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{CONTENT_TYPE, Metrics};

/// Scrapes served at once; a connection past them is closed at once, so a
/// flood of connections costs no more than this many encodings.
const MAX_CONNECTIONS: usize = 16;
/// A client that sends no complete request head in this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `metrics` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    stop: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, a connection reset before accept:
                    // the next one may do; do not spin on it.
                    tracing::debug!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many connections; closed");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| answer(req, metrics.clone()));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "metrics: connection ended");
            }
        });
    }
}

async fn answer(req: Request<Incoming>, metrics: Metrics) -> Result<Response<String>, Infallible> {
    let plain = |status: StatusCode, body: &str| {
        let mut r = Response::new(body.to_owned());
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "only /metrics here\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    // Collectors read the metadata store: off the async workers.
    let encoded = tokio::task::spawn_blocking(move || metrics.encode()).await;
    Ok(match encoded {
        Ok(Ok(text)) => {
            let mut r = Response::new(text);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: encoding failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: encoding task failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
        }
    })
}
