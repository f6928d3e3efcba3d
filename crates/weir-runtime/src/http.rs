//! HTTP pieces shared by every service that speaks HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::logs::LogLimiter;

/// A client error with the JSON body every Weir API uses: `{"error": "...", "field": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics_router() -> Router {
    let handle = crate::telemetry::prometheus();
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.render(),
                )
            }
        }),
    )
}

/// What one HTTP listener tolerates from its peers, so that slow or idle clients cannot
/// hold its connections (and the process's file descriptors) forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// From the first byte of a request to the end of its headers.
    pub header_timeout: Duration,
    /// A connection with no request under way (fresh, or between keep-alive requests) is
    /// closed after this long without the first byte of a new one.
    pub idle_timeout: Duration,
    /// From the end of the headers to the end of the body, as a whole: a body trickled a
    /// byte at a time cannot stretch it. Also how long a response may wait for a peer that
    /// stopped reading.
    pub body_timeout: Duration,
    /// Connections open at once; one more is accepted and closed at once.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// Connections the kernel holds for a listener before it accepts them.
const BACKLOG: u32 = 1024;

/// Binds a listener for [`serve`]. tokio's own `bind` asks for a backlog of 128, which a
/// burst of connections overflows: the kernel then drops handshakes, and clients wait
/// seconds for a retransmit even though the server has free slots.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Registers the listener metrics at zero, so dashboards and alerts see them before the
/// first event.
fn register_metrics() {
    metrics::describe_gauge!(
        "weir_http_connections_open",
        "HTTP connections open now, over every listener of this process."
    );
    metrics::describe_counter!(
        "weir_http_connections_refused_total",
        "HTTP connections closed at once because the connection cap was reached."
    );
    metrics::describe_counter!(
        "weir_http_timeouts_total",
        "HTTP connections closed by a timeout, by phase (header, idle, body, write)."
    );
    metrics::gauge!("weir_http_connections_open").set(0.0);
    metrics::counter!("weir_http_connections_refused_total").absolute(0);
    for phase in ["header", "idle", "body", "write"] {
        metrics::counter!("weir_http_timeouts_total", "phase" => phase).absolute(0);
    }
}

static ACCEPT_ERRORS: LogLimiter = LogLimiter::per_second();

/// Serves `router` on `listener` within `limits` until `token` is cancelled, then stops
/// accepting, closes idle connections and lets in-flight requests finish.
///
/// HTTP/1.1 only. Handlers can read the peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ListenerLimits,
    token: CancellationToken,
) -> std::io::Result<()> {
    register_metrics();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors (or a peer that reset before accept): the socket
                // stays in the backlog, so pause instead of spinning on the same error.
                crate::warn_limited!(ACCEPT_ERRORS, %err, "cannot accept a connection");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closing at once (rather than leaving it in the backlog) tells the client to
            // go elsewhere instead of waiting for a slot that may be held by an attacker.
            metrics::counter!("weir_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            limits,
            token.clone(),
            slot,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ListenerLimits,
    token: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let open = metrics::gauge!("weir_http_connections_open");
    open.increment(1.0);
    let under_way = Arc::new(RequestUnderWay::default());
    let io = TokioIo::new(TimedIo::new(stream, under_way.clone(), limits));
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        under_way.start();
        let under_way = under_way.clone();
        request.extensions_mut().insert(ConnectInfo(peer));
        let deadline = tokio::time::Instant::now() + limits.body_timeout;
        let request = request.map(|body| Body::new(DeadlineBody::new(body, deadline)));
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            under_way.finish();
            response
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // The idle and header deadlines live in TimedIo; hyper's own header timer would
        // also run between keep-alive requests and so cut the idle allowance short.
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let finished = tokio::select! {
        finished = connection.as_mut() => finished,
        _ = token.cancelled() => {
            // Idle connections close now; one with a request under way answers it first.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = finished {
        tracing::debug!(%err, %peer, "connection ended with an error");
    }
    open.decrement(1.0);
}

/// Where a connection is, as far as reading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadPhase {
    /// No byte of the next request yet.
    Idle,
    /// Some bytes of a request, not yet all its headers.
    Header,
    /// Headers read and handed to the router; the body has its own deadline.
    Request,
}

/// Whether the router holds a request of this connection. While it does, a read that
/// hyper leaves pending waits on the socket only; the router's answer must wake it so the
/// idle deadline starts even if the peer sends nothing more.
#[derive(Default)]
struct RequestUnderWay {
    active: AtomicBool,
    reader: Mutex<Option<Waker>>,
    /// Requests handed to the router on this connection.
    routed: AtomicU64,
}

impl RequestUnderWay {
    fn is_under_way(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn start(&self) {
        self.routed.fetch_add(1, Ordering::AcqRel);
        self.active.store(true, Ordering::Release);
    }

    fn routed(&self) -> u64 {
        self.routed.load(Ordering::Acquire)
    }

    fn wake_reader_when_done(&self, waker: &Waker) {
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        match reader.as_ref() {
            Some(held) if held.will_wake(waker) => {}
            _ => *reader = Some(waker.clone()),
        }
    }

    fn finish(&self) {
        self.active.store(false, Ordering::Release);
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// A socket whose reads fail with `TimedOut` once the idle or the header deadline passes,
/// which makes hyper drop the connection.
struct TimedIo {
    stream: TcpStream,
    request: Arc<RequestUnderWay>,
    limits: ListenerLimits,
    phase: ReadPhase,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Set while a write waits for the peer to read: a client that stops reading would
    /// otherwise hold the connection forever. Made only when a write first has to wait.
    write_stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Requests routed when the last write went out: a write made while no request was
    /// routed since can only be hyper answering a request it could not parse.
    routed_at_last_write: u64,
    /// hyper's own error answer, rewritten with a JSON body, and how much of it is out.
    rewrite: Option<Rewrite>,
}

struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    /// What hyper handed over, reported as written once all of `bytes` is.
    replaces: usize,
}

/// hyper answers a request it cannot parse (a control character in a header, obsolete
/// line folding, an oversized head) by itself, before any router sees it, with an empty
/// body. Every 4xx here has a JSON body naming what was wrong, so such a head is given one.
/// `None` for anything else.
fn json_error_response(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let status: u16 = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    if !(400..500).contains(&status) || !text.ends_with("\r\n\r\n") {
        return None;
    }
    let empty = "\r\ncontent-length: 0\r\n";
    let at = text.find(empty)?;
    let error = match status {
        431 => "the request's headers are too large",
        414 => "the request's URI is too long",
        _ => {
            "the request is not valid HTTP/1.1: its request line or a header is malformed \
              (for example a control character in a header, or a folded header line)"
        }
    };
    let body = serde_json::json!({ "error": error }).to_string();
    let mut out = String::with_capacity(text.len() + body.len() + 64);
    out.push_str(&text[..at]);
    out.push_str(&format!(
        "\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    ));
    out.push_str(&text[at + empty.len()..]);
    out.push_str(&body);
    Some(out.into_bytes())
}

impl TimedIo {
    fn new(stream: TcpStream, request: Arc<RequestUnderWay>, limits: ListenerLimits) -> Self {
        TimedIo {
            stream,
            request,
            limits,
            phase: ReadPhase::Idle,
            deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            write_stall: None,
            routed_at_last_write: 0,
            rewrite: None,
        }
    }

    /// Starts rewriting `head` if it is hyper's own error answer (see
    /// [`json_error_response`]); otherwise notes that a write went out.
    fn inspect_write(&mut self, head: &[u8]) {
        let routed = self.request.routed();
        if routed == self.routed_at_last_write && !self.request.is_under_way() {
            if let Some(bytes) = json_error_response(head) {
                self.rewrite = Some(Rewrite {
                    bytes,
                    written: 0,
                    replaces: head.len(),
                });
                return;
            }
        }
        self.routed_at_last_write = routed;
    }

    fn write_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        loop {
            let Some(rewrite) = self.rewrite.as_mut() else {
                return Poll::Ready(Ok(0));
            };
            if rewrite.written == rewrite.bytes.len() {
                let replaces = rewrite.replaces;
                self.rewrite = None;
                return Poll::Ready(Ok(replaces));
            }
            let written =
                Pin::new(&mut self.stream).poll_write(cx, &rewrite.bytes[rewrite.written..]);
            match self.bound_write(cx, written) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => {
                    if let Some(rewrite) = self.rewrite.as_mut() {
                        rewrite.written += n;
                    }
                }
                other => return other,
            }
        }
    }

    fn enter(&mut self, phase: ReadPhase, allowance: Duration) {
        self.phase = phase;
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + allowance);
    }

    /// Passes a write's result through, failing it once writes have waited on the peer
    /// for longer than the body timeout.
    fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.write_stall = None;
            return written;
        }
        let allowance = self.limits.body_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(allowance)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("weir_http_timeouts_total", "phase" => "write").increment(1);
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the peer stopped reading its response",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn timed_out(&self) -> std::io::Error {
        let phase = match self.phase {
            ReadPhase::Idle => "idle",
            ReadPhase::Header => "header",
            ReadPhase::Request => "body",
        };
        metrics::counter!("weir_http_timeouts_total", "phase" => phase).increment(1);
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{phase} timeout on an HTTP connection"),
        )
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.request.is_under_way() {
            this.phase = ReadPhase::Request;
            this.request.wake_reader_when_done(cx.waker());
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        if this.phase == ReadPhase::Request {
            this.enter(ReadPhase::Idle, this.limits.idle_timeout);
        }
        if this.deadline.is_elapsed() {
            return Poll::Ready(Err(this.timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == ReadPhase::Idle && buf.filled().len() > before {
                    this.enter(ReadPhase::Header, this.limits.header_timeout);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.rewrite.is_none() {
            self.inspect_write(buf);
        }
        if self.rewrite.is_some() {
            return self.write_rewrite(cx);
        }
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.bound_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.rewrite.is_none() {
            // hyper's error answer is a lone head; only a write that small is looked at.
            let total: usize = bufs.iter().map(|buf| buf.len()).sum();
            if total <= 1024 {
                let joined: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
                self.inspect_write(&joined);
            } else {
                self.routed_at_last_write = self.request.routed();
            }
        }
        if self.rewrite.is_some() {
            return self.write_rewrite(cx);
        }
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.bound_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The error a request body yields once its deadline has passed. Handlers can spot it with
/// [`is_body_timeout`] and answer 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within its deadline")]
pub struct BodyTimedOut;

/// Why a request body could not be read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Declared or found larger than the limit (413).
    TooLarge(usize),
    /// Not complete within the listener's body timeout (408, and the connection closes).
    TimedOut,
    /// The connection failed mid-body (400).
    Unreadable(String),
}

impl BodyError {
    /// Every value [`BodyError::reason`] gives, for registering a `reason` label at zero.
    pub const REASONS: [&'static str; 3] = ["too_large", "timeout", "unreadable"];

    /// Why, as a metric label value: `too_large`, `timeout` or `unreadable`.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "too_large",
            BodyError::TimedOut => "timeout",
            BodyError::Unreadable(_) => "unreadable",
        }
    }

    /// The answer every API gives: 413, 408 with `Connection: close`, or 400.
    pub fn into_api_error(self) -> Response {
        match self {
            BodyError::TooLarge(limit) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body must be at most {limit} bytes"),
            )
            .into_response(),
            BodyError::TimedOut => {
                let mut response = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "the body did not arrive in time",
                )
                .into_response();
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                response
            }
            BodyError::Unreadable(err) => {
                ApiError::bad_request(format!("cannot read the body: {err}")).into_response()
            }
        }
    }
}

/// Reads a request body of at most `limit` bytes. A `Content-Length` above the limit is
/// refused before a byte is read, so a client cannot make the server buffer what it will
/// refuse anyway.
pub async fn read_body(
    headers: &axum::http::HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(err) if is_body_timeout(err.as_ref()) => Err(BodyError::TimedOut),
        Err(err) => Err(BodyError::Unreadable(err.to_string())),
    }
}

/// Whether `err`, or any error it wraps, is [`BodyTimedOut`].
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// A request body that must be complete by one deadline (per-frame timeouts would let a
/// body trickled a byte at a time live forever). The timer is only set up once the body
/// makes a reader wait: most bodies arrive with their headers and never need one.
struct DeadlineBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: tokio::time::Instant) -> Self {
        DeadlineBody {
            inner,
            deadline,
            timer: None,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("weir_http_timeouts_total", "phase" => "body").increment(1);
                Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves only `/metrics` (for services whose own protocol is not HTTP), with the default
/// [`ListenerLimits`].
pub async fn serve_metrics(listener: TcpListener, token: CancellationToken) -> std::io::Result<()> {
    serve(listener, metrics_router(), ListenerLimits::default(), token).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Duration = Duration::from_millis(300);

    struct TestServer {
        addr: SocketAddr,
        token: CancellationToken,
        served: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(limits: ListenerLimits) -> TestServer {
        let router = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow"
                }),
            )
            .route(
                "/echo",
                post(|body: Body| async move {
                    match body.collect().await {
                        Ok(bytes) => (StatusCode::OK, bytes.to_bytes()).into_response(),
                        Err(err) if is_body_timeout(&err) => {
                            StatusCode::REQUEST_TIMEOUT.into_response()
                        }
                        Err(_) => StatusCode::BAD_REQUEST.into_response(),
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let served = tokio::spawn(serve(listener, router, limits, token.clone()));
        TestServer {
            addr,
            token,
            served,
        }
    }

    fn short_limits() -> ListenerLimits {
        ListenerLimits {
            header_timeout: SHORT,
            idle_timeout: SHORT,
            body_timeout: SHORT,
            max_connections: 100,
        }
    }

    /// Reads until the server closes the connection (or resets it); returns what was read
    /// and how long that took. Fails the test if the server keeps it open for 5 s.
    async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
        let started = Instant::now();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server kept the connection open");
        (
            String::from_utf8_lossy(&raw).into_owned(),
            started.elapsed(),
        )
    }

    async fn get_ok(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        read_until_closed(&mut stream).await.0
    }

    #[tokio::test]
    async fn requests_hyper_cannot_parse_get_a_json_body() {
        let server = start(ListenerLimits {
            idle_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(30),
            ..short_limits()
        })
        .await;
        let malformed: [&[u8]; 3] = [
            b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Bad: a\x7fb\r\n\r\n",
            b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Bad: a\x00b\r\n\r\n",
            b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n",
        ];
        for request in malformed {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            let (answer, _) = read_until_closed(&mut stream).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
            assert!(
                answer.contains("content-type: application/json"),
                "{answer:?}"
            );
            let (_, body) = answer.split_once("\r\n\r\n").unwrap();
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(
                json["error"].as_str().unwrap().contains("malformed"),
                "{body}"
            );
        }
        // A keep-alive connection: a good request, then one hyper refuses.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 1024];
        let n = stream.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        stream
            .write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Bad: \x7f\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        assert!(answer.ends_with('}'), "{answer:?}");
        // Answers of the router are left as they are.
        assert!(get_ok(server.addr).await.ends_with("\r\n\r\nok"));
        server.token.cancel();
        server.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn headers_sent_too_slowly_close_the_connection_and_others_are_served() {
        let server = start(ListenerLimits {
            idle_timeout: Duration::from_secs(30),
            ..short_limits()
        })
        .await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /ok HTTP/1.1\r\nHo").await.unwrap();
        assert!(get_ok(server.addr).await.starts_with("HTTP/1.1 200"));
        let (answer, took) = read_until_closed(&mut slow).await;
        assert!(!answer.contains("200"), "{answer}");
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
        server.token.cancel();
        server.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout_not_the_header_one() {
        let server = start(ListenerLimits {
            header_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(600),
            ..short_limits()
        })
        .await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        let (_, took) = read_until_closed(&mut idle).await;
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(2),
            "closed after {took:?}"
        );
        // After one answered request, the wait for the next one is idle time too.
        let mut kept = TcpStream::connect(server.addr).await.unwrap();
        kept.write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let (answer, took) = read_until_closed(&mut kept).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(2),
            "closed after {took:?}"
        );
        server.token.cancel();
        server.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_trickled_body_times_out_as_a_whole() {
        let server = start(short_limits()).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let (mut reader, mut writer) = stream.into_split();
        // One byte every 50 ms: each frame is quick, the body as a whole is not.
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                if writer.write_all(b"1\r\nx\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = Instant::now();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut raw)).await;
        let answer = String::from_utf8_lossy(&raw);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
        trickle.abort();
        server.token.cancel();
        server.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        const BIG: usize = 64 << 20;
        let router = Router::new().route("/big", get(|| async { Bytes::from(vec![b'x'; BIG]) }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let limits = ListenerLimits {
            idle_timeout: Duration::from_secs(30),
            ..short_limits()
        };
        let served = tokio::spawn(serve(listener, router, limits, token.clone()));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        // Not reading: the socket buffers fill long before 64 MiB and the server waits.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut received = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let read_all = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                received += n;
            }
        })
        .await;
        assert!(read_all.is_ok(), "the connection stayed open");
        assert!(received < BIG, "the whole response was sent: {received}");
        token.cancel();
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_holds_a_burst_of_connections_until_they_are_accepted() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..400 {
            // Over a full backlog the handshake is dropped and connect waits for a retry.
            let connect = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr));
            clients.push(connect.await.expect("the backlog is full").unwrap());
        }
        let mut accepted = 0;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        {
            accepted += 1;
        }
        assert_eq!(accepted, clients.len());
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        let server = start(ListenerLimits {
            idle_timeout: Duration::from_secs(30),
            max_connections: 2,
            ..short_limits()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            // A request answered proves the server has taken this connection's slot.
            stream
                .write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(stream);
        }
        let mut extra = TcpStream::connect(server.addr).await.unwrap();
        let (answer, took) = read_until_closed(&mut extra).await;
        assert_eq!(answer, "");
        assert!(took < Duration::from_secs(1), "closed after {took:?}");
        drop(held);
        server.token.cancel();
        server.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_an_in_flight_request_finish() {
        let server = start(ListenerLimits {
            idle_timeout: Duration::from_secs(30),
            ..short_limits()
        })
        .await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        let mut busy = TcpStream::connect(server.addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.token.cancel();
        let (answer, _) = read_until_closed(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("slow"), "{answer}");
        let (idle_answer, took) = read_until_closed(&mut idle).await;
        assert_eq!(idle_answer, "");
        assert!(took < Duration::from_secs(2));
        tokio::time::timeout(Duration::from_secs(5), server.served)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[test]
    fn api_error_body_names_the_field() {
        let err = ApiError::bad_request("must be a UUID").with_field("key");
        let body = serde_json::to_value(&err).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "must be a UUID", "field": "key"})
        );
    }

    #[test]
    fn every_body_error_has_one_of_the_listed_reasons() {
        let errors = [
            BodyError::TooLarge(1),
            BodyError::TimedOut,
            BodyError::Unreadable("reset".into()),
        ];
        assert_eq!(errors.map(|err| err.reason()), BodyError::REASONS);
    }

    #[test]
    fn api_error_without_field_omits_it() {
        let body = serde_json::to_value(ApiError::bad_request("bad")).unwrap();
        assert_eq!(body, serde_json::json!({"error": "bad"}));
    }
}
