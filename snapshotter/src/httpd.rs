//! The loop of the daemon's small plain-HTTP/1.1 endpoints (metrics,
//! peers) with hyper: connections past a bound are closed at once, and a
//! client that sends no complete request head within [`HEADER_TIMEOUT`] is
//! dropped, so a flood of connections or a slow client costs a bounded
//! amount.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// A client that sends no complete request head in this long is dropped.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `answer` on `listener` until `stop` resolves, at most
/// `max_connections` connections at once; `what` names the endpoint in
/// logs.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    what: &'static str,
    max_connections: usize,
    answer: F,
    stop: impl Future<Output = ()>,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, a connection reset before accept:
                    // the next one may do; do not spin on it.
                    tracing::debug!(what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(what, %peer, "too many connections; closed");
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(answer);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(what, %peer, error = %e, "connection ended");
            }
        });
    }
}
