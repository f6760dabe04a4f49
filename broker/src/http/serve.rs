//! Serving the HTTP listeners (management API, HTTPS, Prometheus) with hyper directly, so
//! that their connections are bounded: a cap on concurrent connections per listener (past it,
//! new connections wait in the kernel's backlog and hold no descriptor of ours), a timeout for
//! the next request's headers (which also ends idle keep-alive connections) and for a request
//! body that stops arriving, a timeout for a response the client stops reading (which ends
//! the connection, so a long listing's place is given back), and request bodies that a handler left unread are drained, so the
//! connection stays usable.

use super::auth::PeerAddr;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower_service::Service;

/// The bounds of one HTTP listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a connection may take to send its next request's headers, idle time
    /// between keep-alive requests included.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// The most bytes of an unread request body drained after its response; a larger one closes
/// the connection instead (as hyper does on its own).
const DRAIN_LIMIT: usize = 1024 * 1024;
/// How long draining an unread body may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stop` turns true, then lets the open connections
/// finish their requests and close.
pub async fn serve<L>(listener: L, router: Router, limits: Limits, stop: watch::Receiver<bool>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    serve_with(
        listener,
        |io, _| async move { Some(io) },
        router,
        limits,
        stop,
    )
    .await;
}

/// Serves `router` over HTTPS: each connection's TLS handshake is made on its own task once
/// it has a place under the cap (so handshakes count against it, and finished ones never
/// wait holding a descriptor), and within the idle timeout, as a request's headers are.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let timeout = limits.idle_timeout;
    let handshake = move |io: tokio::net::TcpStream, peer: SocketAddr| {
        let acceptor = acceptor.clone();
        async move {
            let _ = io.set_nodelay(true);
            match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    None
                }
            }
        }
    };
    serve_with(listener, handshake, router, limits, stop).await;
}

async fn serve_with<L, H, F, I>(
    mut listener: L,
    handshake: H,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
    H: Fn(L::Io, SocketAddr) -> F,
    F: Future<Output = Option<I>> + Send + 'static,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        // Past the cap nothing is accepted: new connections wait in the backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stop) => break,
        };
        let ready = handshake(io, peer);
        let router = router.clone();
        let closing = closing_rx.clone();
        connections.spawn(async move {
            if let Some(io) = ready.await {
                serve_connection(io, peer, router, limits.idle_timeout, closing, permit).await;
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    idle_timeout: Duration,
    mut closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        req.extensions_mut().insert(BodyIdleTimeout(idle_timeout));
        let mut router = router.clone();
        async move { router.call(req.map(Body::new)).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    let io = WriteTimeout {
        inner: io,
        timeout: idle_timeout,
        timer: None,
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closed => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// A connection whose writes fail once the client has taken nothing for the timeout: hyper
/// only times out reading headers, and a response (a long listing holding one of the few
/// listing places) sent to a client that stopped reading would otherwise wait for ever.
struct WriteTimeout<I> {
    inner: I,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteTimeout<I> {
    /// Turns a write still pending after the timeout into an error.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.timer = None;
            return poll;
        }
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.timer = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            )));
        }
        Poll::Pending
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.deadline(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.deadline(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.deadline(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.deadline(cx, poll)
    }
}

/// How long a request body may go without sending a byte, as the connection's idle timeout.
#[derive(Debug, Clone, Copy)]
struct BodyIdleTimeout(Duration);

/// Middleware: a request body the handler did not read (a `DELETE` with a JSON body, a
/// request refused before its body was looked at) is read to its end after the response is
/// made, so the connection can carry the next request, as RabbitMQ's does. A body that stops
/// arriving for the connection's idle timeout fails the request with 408 and closes the
/// connection, so a slow client cannot hold it open.
///
/// A body that announces more than the drain limit, or waits for `100 Continue` before it is
/// sent, is not drained: the response goes out at once with `Connection: close` (draining
/// would hold it back, and reading the body would ask the client to send it all).
pub async fn drain_unread_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let too_long = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > DRAIN_LIMIT as u64);
    let expects_continue = parts
        .headers
        .get(axum::http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let idle = parts.extensions.get::<BodyIdleTimeout>().map(|t| t.0);
    let shared = Arc::new(Mutex::new(Some(IdleBody {
        inner: body,
        idle,
        timer: None,
        timed_out: false,
    })));
    let req = Request::from_parts(parts, Body::new(SharedBody(shared.clone())));
    let response = next.run(req).await;
    let rest = shared.lock().take();
    let Some(mut rest) = rest else {
        return response;
    };
    if !rest.timed_out && !http_body::Body::is_end_stream(&rest) && (too_long || expects_continue) {
        let mut response = response;
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return response;
    }
    if !rest.timed_out && !http_body::Body::is_end_stream(&rest) {
        let mut drained = 0usize;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while drained <= DRAIN_LIMIT {
                match std::future::poll_fn(|cx| {
                    http_body::Body::poll_frame(Pin::new(&mut rest), cx)
                })
                .await
                {
                    Some(Ok(frame)) => {
                        drained += frame.data_ref().map_or(0, |d| d.len());
                    }
                    Some(Err(_)) | None => break,
                }
            }
        })
        .await;
    }
    if rest.timed_out {
        let mut response = super::error::json_response(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            &serde_json::json!({
                "error": "timeout",
                "reason": "the request body stopped arriving",
            }),
        );
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return response;
    }
    response
}

/// A request body that fails once no data has come for its idle timeout.
struct IdleBody {
    inner: Body,
    idle: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: bool,
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let Some(idle) = this.idle else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_ready() {
                    this.timer = None;
                    this.timed_out = true;
                    return Poll::Ready(Some(Err(axum::Error::new(
                        "the request body stopped arriving",
                    ))));
                }
                Poll::Pending
            }
            ready => {
                this.timer = None;
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body, read through a handle the middleware keeps.
struct SharedBody(Arc<Mutex<Option<IdleBody>>>);

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.0.lock().as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .lock()
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}
