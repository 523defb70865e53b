//! Serving [`Metrics`] over plain HTTP/1.1 with hyper (already in the tree
//! under tonic): `GET /metrics` and nothing else.

use std::convert::Infallible;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::{CONTENT_TYPE, Metrics};

/// Scrapes served at once; a connection past them is closed at once, so a
/// flood of connections costs no more than this many encodings.
const MAX_CONNECTIONS: usize = 16;

/// Serves `metrics` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    stop: impl std::future::Future<Output = ()>,
) {
    let respond = move |req| answer(req, metrics.clone());
    crate::httpd::serve(listener, "metrics", MAX_CONNECTIONS, respond, stop).await;
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
