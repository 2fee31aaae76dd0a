//! Response bodies and in-flight accounting.
//!
//! A request is in flight from its head arriving until its response body has been fully
//! handed to the connection (DESIGN §4.3). [`RequestGuard`] is that span: it is created when
//! the head arrives and dropped when the body ends, fails, or the client goes away; for an
//! upgraded connection it moves into the tunnel and drops when the tunnel closes.
//! [`ResponseBody`] streams the app's body frame by frame (trailers included), never
//! buffering, and hands the upstream connection back to the pool only after its last frame.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::activity::Activity;
use crate::lifecycle::Phase;
use crate::metrics::Metrics;
use crate::upstream::Pooled;

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
/// been read to its end: only then is the connection between two messages.
pub struct RequestBody {
    inner: Incoming,
    conn: Option<Arc<ConnState>>,
}

impl RequestBody {
    /// `conn`: the HTTP/1.1 connection to tell (none for HTTP/2, whose streams are separate).
    pub fn new(inner: Incoming, conn: Option<&Arc<ConnState>>) -> Self {
        let open = !inner.is_end_stream();
        let conn = conn.filter(|_| open).cloned();
        if let Some(c) = &conn {
            c.body_open.store(true, Relaxed);
        }
        RequestBody { inner, conn }
    }

    fn ended(&mut self) {
        if let Some(c) = self.conn.take() {
            c.body_open.store(false, Relaxed);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Kind {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

pub struct ResponseBody {
    kind: Kind,
    guard: Option<RequestGuard>,
    pooled: Option<Pooled>,
}

impl ResponseBody {
    pub fn full(data: Bytes) -> Self {
        let data = if data.is_empty() { None } else { Some(data) };
        ResponseBody { kind: Kind::Full(data), guard: None, pooled: None }
    }

    pub fn empty() -> Self {
        ResponseBody { kind: Kind::Full(None), guard: None, pooled: None }
    }

    pub fn upstream(body: Incoming, pooled: Option<Pooled>) -> Self {
        ResponseBody { kind: Kind::Upstream(body), guard: None, pooled }
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
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                // The app's connection failed mid-body: it must not go back to the pool.
                this.pooled = None;
                this.guard = None;
            }
            Poll::Ready(Some(Ok(_))) if this.is_end_stream() => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
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
    }
}
