//! Response bodies and in-flight accounting.
//!
//! A request is in flight from its head arriving until its response body has been fully
//! handed to the connection (DESIGN §4.3). [`RequestGuard`] is that span: it is created when
//! the head arrives and dropped when the body ends, fails, or the client goes away; for an
//! upgraded connection it moves into the tunnel and drops when the tunnel closes.
//! [`ResponseBody`] streams the app's body frame by frame (trailers included), never
//! buffering, and hands the upstream connection back to the pool only after its last frame.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::activity::Activity;
use crate::error::BoxError;
use crate::lifecycle::Phase;
use crate::metrics::Metrics;
use crate::upstream::{AppBody, Pooled};

/// Per client connection: what the idle timeout and the drain's idle close need to know.
pub struct ConnState {
    epoch: Instant,
    active: AtomicU32,
    /// Requests begun on this connection so far.
    served: AtomicU32,
    /// Milliseconds from `epoch` to when the last request on this connection ended.
    last_done_ms: AtomicU64,
    /// The last request's body has not been seen to its end (the connection may be
    /// mid-message, so it must not be parked).
    body_open: AtomicBool,
    /// The connection is being parked: ending it must not shut the socket down.
    parking: AtomicBool,
    /// The connection was upgraded (a tunnel): a shutdown must reach the socket.
    upgraded: AtomicBool,
    /// Bytes arrived between two messages: a request head is on its way (cleared when its
    /// request starts). `server.rs` bounds how long it may take.
    head_pending: AtomicBool,
}

impl ConnState {
    pub fn new() -> Self {
        ConnState {
            epoch: Instant::now(),
            active: AtomicU32::new(0),
            served: AtomicU32::new(0),
            last_done_ms: AtomicU64::new(0),
            body_open: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            head_pending: AtomicBool::new(false),
        }
    }
    /// Requests begun on this connection so far.
    pub fn served(&self) -> u32 {
        self.served.load(Relaxed)
    }
    /// Between two messages: nothing in flight, and the last request was read to its end.
    pub fn at_message_boundary(&self) -> bool {
        self.active.load(Relaxed) == 0 && !self.body_open.load(Relaxed)
    }
    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Relaxed);
    }
    pub fn is_parking(&self) -> bool {
        self.parking.load(Relaxed)
    }
    /// Called for each read that returned bytes.
    pub fn bytes_read(&self) {
        if self.at_message_boundary() && !self.head_pending.load(Relaxed) {
            self.head_pending.store(true, Relaxed);
        }
    }
    /// Part of a request head has arrived and its request has not started yet.
    pub fn head_pending(&self) -> bool {
        self.head_pending.load(Relaxed)
    }
    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Relaxed);
    }
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Relaxed)
    }
    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }
    /// An idle keep-alive: it has served a request since `served_before` and has none in
    /// flight. A connection that has served nothing since is not idle: its request is on its
    /// way (`server.rs` only builds an HTTP connection once bytes have arrived).
    pub fn is_idle_keep_alive(&self, served_before: u32) -> bool {
        self.active.load(Relaxed) == 0 && self.served.load(Relaxed) > served_before
    }
    /// When this connection last went idle (its start if it never served a request).
    pub fn idle_since(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last_done_ms.load(Relaxed))
    }
}

impl Default for ConnState {
    fn default() -> Self {
        Self::new()
    }
}

/// What the access log prints for one request, kept only when the access log is on.
pub struct AccessInfo {
    pub method: http::Method,
    pub path: String,
    pub peer: std::net::SocketAddr,
}

/// Shared handles the guard reports to; one per proxy, cloned per request as an `Arc`.
pub struct Accounting {
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
}

pub struct RequestGuard {
    acct: Arc<Accounting>,
    conn: Arc<ConnState>,
    start: Instant,
    phase: Phase,
    status: u16,
    access: Option<Box<AccessInfo>>,
}

impl RequestGuard {
    pub fn start(acct: Arc<Accounting>, conn: Arc<ConnState>, phase: Phase, start: Instant) -> Self {
        acct.activity.request_started(start);
        conn.active.fetch_add(1, Relaxed);
        conn.served.fetch_add(1, Relaxed);
        conn.head_pending.store(false, Relaxed);
        RequestGuard { acct, conn, start, phase, status: 0, access: None }
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub fn set_access(&mut self, info: AccessInfo) {
        self.access = Some(Box::new(info));
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        // Status 0: the client went away before any response was produced.
        let status = if self.status == 0 { 499 } else { self.status };
        self.acct.metrics.request_done(status, self.phase, elapsed.as_secs_f64());
        let ms = u64::try_from(now.saturating_duration_since(self.conn.epoch).as_millis()).unwrap_or(u64::MAX);
        self.conn.last_done_ms.store(ms, Relaxed);
        self.conn.active.fetch_sub(1, Relaxed);
        self.acct.activity.request_finished();
        if let Some(a) = &self.access {
            tracing::info!(
                target: "drainproxy::access",
                method = %a.method,
                path = %a.path,
                status,
                peer = %a.peer,
                duration_us = elapsed.as_micros() as u64,
                phase = self.phase.as_str(),
                "request"
            );
        }
    }
}

/// The request body on its way to the app. On HTTP/1.1 it tells its connection when it has
/// been read to its end: only then is the connection between two messages; dropped before
/// that (the app answered and closed, or failed), the rest is read out and discarded behind
/// the answer, bounded by [`HOLD_END_MAX`], so that a client still uploading can finish and
/// read it instead of being reset. On HTTP/2 a body still streaming is shared with the
/// response, which ends only after it (see [`SharedBody`]).
pub struct RequestBody {
    inner: Inner,
    conn: Option<Arc<ConnState>>,
}

enum Inner {
    Owned(Incoming),
    Shared(Arc<SharedBody>),
    /// Handed over to be read out (only while being dropped).
    Taken,
}

/// An HTTP/2 request body that was still streaming when its request was forwarded.
///
/// The app may answer in full before it has read the whole body (an upload it refuses, or does
/// not need) and go on reading it, as nginx does. The body is still forwarded to its end. A 2xx
/// response to the client ends (`END_STREAM`) only once the body has: a client still uploading
/// then learns that its exchange is over from a frame that arrives after its last one. curl
/// 7.88 needs that frame, and waited for the connection's idle timeout without it. Any other
/// response ends at once and the body is read out behind it (see [`ResponseBody::upstream`]).
///
/// When the forwarding stops before the body's end (the app answered and closed its connection
/// without reading it all), the rest of the body is read and discarded instead: the client's
/// stream then ends cleanly after its upload, where dropping it would reset the stream and
/// make the client (curl 7.88: error 92) throw away the answer it has. Every wait is bounded
/// by [`HOLD_END_MAX`].
pub struct SharedBody(Mutex<Slot>);

/// How long a complete response waits for its request body to be forwarded to its end.
pub const HOLD_END_MAX: std::time::Duration = std::time::Duration::from_secs(5);

struct Slot {
    state: Forwarding,
    /// The response waiting for the body to end.
    response: Option<Waker>,
}

enum Forwarding {
    Open(Incoming),
    /// Dropped by the forwarding before its end: what is left is read and discarded.
    Abandoned(Incoming),
    /// Read to its end, or failed.
    Done,
}

/// Frames of an abandoned body discarded in one poll before yielding to other tasks.
const DISCARD_BUDGET: usize = 32;

impl SharedBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the body ended and wakes the response waiting for it.
    fn done(slot: &mut Slot) {
        slot.state = Forwarding::Done;
        SharedBody::wake_response(slot);
    }

    fn wake_response(slot: &mut Slot) {
        if let Some(w) = slot.response.take() {
            w.wake();
        }
    }

    /// Ready once the body has ended; else registers `cx` to be woken then. An abandoned body
    /// is read on, its frames discarded.
    fn poll_done(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.lock();
        match &mut slot.state {
            Forwarding::Done => Poll::Ready(()),
            Forwarding::Open(_) => {
                if !slot.response.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.response = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Forwarding::Abandoned(body) => {
                for _ in 0..DISCARD_BUDGET {
                    match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(_))) if !body.is_end_stream() => {}
                        Poll::Ready(_) => {
                            slot.state = Forwarding::Done;
                            return Poll::Ready(());
                        }
                    }
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_done(&self) -> bool {
        matches!(self.lock().state, Forwarding::Done)
    }

    /// Keeps a body the client is still sending open after its response has ended without
    /// waiting for it: forwarded while the app reads it, else read and discarded, until it
    /// ends or for at most [`HOLD_END_MAX`]. Dropping it would reset the client's stream, and
    /// h2 discards a reset stream's frames not yet written, the response's own among them.
    fn read_out_in_background(self: Arc<Self>) {
        if self.is_done() {
            return;
        }
        spawn_read_out(async move { std::future::poll_fn(|cx| self.poll_done(cx)).await });
    }
}

impl RequestBody {
    /// `conn`: the HTTP/1.1 connection to tell (none for HTTP/2, whose streams are separate).
    pub fn new(inner: Incoming, conn: Option<&Arc<ConnState>>) -> Self {
        let open = !inner.is_end_stream();
        match conn {
            Some(c) if open => {
                c.body_open.store(true, Relaxed);
                RequestBody { inner: Inner::Owned(inner), conn: Some(c.clone()) }
            }
            None if open => {
                let slot = Slot { state: Forwarding::Open(inner), response: None };
                RequestBody { inner: Inner::Shared(Arc::new(SharedBody(Mutex::new(slot)))), conn: None }
            }
            _ => RequestBody { inner: Inner::Owned(inner), conn: None },
        }
    }

    /// The shared state of an HTTP/2 body still streaming, for the response to wait on.
    pub fn shared(&self) -> Option<Arc<SharedBody>> {
        match &self.inner {
            Inner::Shared(shared) => Some(shared.clone()),
            Inner::Owned(_) | Inner::Taken => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let shared = match &mut this.inner {
            Inner::Owned(inner) => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                let end = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                    _ => false,
                };
                if end {
                    if let Some(c) = this.conn.take() {
                        c.body_open.store(false, Relaxed);
                    }
                }
                return polled;
            }
            Inner::Shared(shared) => shared,
            Inner::Taken => return Poll::Ready(None),
        };
        let mut slot = shared.lock();
        let Forwarding::Open(body) = &mut slot.state else { return Poll::Ready(None) };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(_))) if !body.is_end_stream() => {}
            Poll::Ready(_) => SharedBody::done(&mut slot),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Owned(inner) => inner.is_end_stream(),
            Inner::Shared(shared) => match &shared.lock().state {
                Forwarding::Open(body) => body.is_end_stream(),
                Forwarding::Abandoned(_) | Forwarding::Done => true,
            },
            Inner::Taken => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Owned(inner) => inner.size_hint(),
            Inner::Shared(shared) => match &shared.lock().state {
                Forwarding::Open(body) => body.size_hint(),
                Forwarding::Abandoned(_) | Forwarding::Done => SizeHint::with_exact(0),
            },
            Inner::Taken => SizeHint::with_exact(0),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Dropped before its end (the app's connection closed, the request failed): the rest
        // is read out. On HTTP/2 by the response, if there is one, before it ends.
        match &self.inner {
            Inner::Shared(shared) => {
                let mut slot = shared.lock();
                if let Forwarding::Open(body) = std::mem::replace(&mut slot.state, Forwarding::Done) {
                    slot.state = Forwarding::Abandoned(body);
                    SharedBody::wake_response(&mut slot);
                }
            }
            // `conn` is still set: the body has not been read to its end.
            Inner::Owned(_) if self.conn.is_some() => {
                if let (Inner::Owned(body), Some(conn)) =
                    (std::mem::replace(&mut self.inner, Inner::Taken), self.conn.take())
                {
                    read_out_http1(body, conn);
                }
            }
            Inner::Owned(_) | Inner::Taken => {}
        }
    }
}

/// Reads an HTTP/1.1 request body the forwarding dropped to its end, discarding it, for at
/// most [`HOLD_END_MAX`]; then the connection is between two messages again.
fn read_out_http1(mut body: Incoming, conn: Arc<ConnState>) {
    spawn_read_out(async move {
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if frame.is_err() {
                return;
            }
        }
        conn.body_open.store(false, Relaxed);
    });
}

/// Runs `read_out` (a request body read to its end) in a task of its own, for at most
/// [`HOLD_END_MAX`]; outside a runtime (a drop at shutdown) the body is simply dropped.
fn spawn_read_out(read_out: impl Future<Output = ()> + Send + 'static) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        if tokio::time::timeout(HOLD_END_MAX, read_out).await.is_err() {
            tracing::debug!("a request body was still arriving {HOLD_END_MAX:?} after it was given up; dropping it");
        }
    });
}

enum Kind {
    Upstream(AppBody),
    Full(Option<Bytes>),
}

pub struct ResponseBody {
    kind: Kind,
    guard: Option<RequestGuard>,
    pooled: Option<Pooled>,
    /// An HTTP/2 request body still being forwarded.
    request: Option<Arc<SharedBody>>,
    /// The response ends only after `request` (a 2xx); else `request` is read out after it.
    hold_end: bool,
    /// The app's body has ended; the end is held until `request` is done (bounded).
    held: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ResponseBody {
    pub fn full(data: Bytes) -> Self {
        let data = if data.is_empty() { None } else { Some(data) };
        ResponseBody { kind: Kind::Full(data), guard: None, pooled: None, request: None, hold_end: false, held: None }
    }

    pub fn empty() -> Self {
        ResponseBody { kind: Kind::Full(None), guard: None, pooled: None, request: None, hold_end: false, held: None }
    }

    /// `request`: the request's body if it is an HTTP/2 one still being forwarded. A 2xx
    /// response ends only after it; any other goes out whole at once, and the body is read out
    /// behind it. A client that gets a 3xx or an error while still uploading stops there (curl
    /// ends its stream early), so holding that response's end would only let the client's
    /// early end (a malformed stream, reset by h2) overtake it.
    pub fn upstream(
        body: AppBody,
        pooled: Option<Pooled>,
        request: Option<Arc<SharedBody>>,
        status: StatusCode,
    ) -> Self {
        let hold_end = status.is_success();
        ResponseBody { kind: Kind::Upstream(body), guard: None, pooled, request, hold_end, held: None }
    }

    /// Attaches the in-flight guard; if the body is already complete (empty), the guard is
    /// released when hyper drops the body after writing the head.
    pub fn with_guard(mut self, guard: RequestGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    fn finish(&mut self) {
        if let Some(p) = self.pooled.take() {
            p.release();
        }
        self.guard = None;
        if let Some(request) = self.request.take() {
            request.read_out_in_background();
        }
    }

    /// The request body is still being forwarded, so the response must not end yet.
    fn request_open(&self) -> bool {
        self.hold_end && self.request.as_ref().is_some_and(|r| !r.is_done())
    }

    /// Holds the end of a complete response until the request body is done, or for at most
    /// [`HOLD_END_MAX`].
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let done = self.request.as_ref().is_none_or(|r| r.poll_done(cx).is_ready());
        if !done {
            let held = self.held.get_or_insert_with(|| Box::pin(tokio::time::sleep(HOLD_END_MAX)));
            if held.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            tracing::debug!(
                "the request body was still arriving {HOLD_END_MAX:?} after a complete response; ending it"
            );
        }
        self.request = None;
        self.finish();
        Poll::Ready(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.held.is_some() {
            return this.poll_end(cx);
        }
        let polled = match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) if this.request_open() => return this.poll_end(cx),
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                // The app's connection failed mid-body: it must not go back to the pool.
                this.pooled = None;
                this.guard = None;
            }
            // The last data frame goes out without END_STREAM; the next poll holds the end.
            Poll::Ready(Some(Ok(f))) if f.is_data() && this.request_open() => {}
            Poll::Ready(Some(Ok(_))) if this.is_end_stream() => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let app_done = match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        };
        app_done && !self.request_open()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper never polls a body that is empty from the start (204, `Content-Length: 0`):
        // the connection is still reusable then. A body dropped part-way is not.
        if self.pooled.is_some() && self.is_end_stream() {
            self.finish();
        }
        // Never polled (a non-2xx answer without a body) or dropped by a client that left:
        // a request body still arriving is read out rather than reset.
        if let Some(request) = self.request.take() {
            request.read_out_in_background();
        }
    }
}
