//! Connections to the app: a small LIFO pool of HTTP/1.1 connections, or one shared
//! HTTP/2 (h2c) connection, with the connect timeout and the retry-once rule of DESIGN §4.4.
//!
//! Retry rule: a request is retried only when hyper hands it back unwritten (the pooled
//! connection closed before any byte went out), and then once, on a fresh connection. A
//! request that may have reached the app is never retried here.
//!
//! The pool never hands out a connection idle for longer than `pool_idle_timeout`, which
//! defaults below common app keep-alive timeouts, so the proxy does not write into a
//! connection the app is closing; and a reaper closes such connections once they expire, so
//! the connections (and buffers) a burst opened do not outlive it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::RequestBody;
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::error::{connect_error, BoxError, ProxyError};
use crate::lean::{self, Conn, ExchangeError, LeanBody};
use crate::sock::Sock;

struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Idle HTTP/1.1 connections: those hyper drives, and those of the lean exchange.
#[derive(Default)]
struct Pool {
    hyper: Vec<Idle<http1::SendRequest<RequestBody>>>,
    lean: Vec<Idle<Conn>>,
}

impl Pool {
    fn len(&self) -> usize {
        self.hyper.len() + self.lean.len()
    }
}

/// The app's response body: from hyper's client, or read by the lean exchange.
pub enum AppBody {
    Hyper(Incoming),
    Lean(LeanBody),
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            AppBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            AppBody::Lean(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AppBody::Hyper(body) => body.is_end_stream(),
            AppBody::Lean(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AppBody::Hyper(body) => body.size_hint(),
            AppBody::Lean(body) => body.size_hint(),
        }
    }
}

pub struct Upstream {
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Pool>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// `drainproxy_upstream_connect_resends_total`
    resends: IntCounter,
}

/// An HTTP/1.1 connection lent to one exchange; back to the pool via [`Pooled::release`]
/// once the response body has ended, or closed if dropped earlier.
pub struct Pooled {
    sender: http1::SendRequest<RequestBody>,
    upstream: Arc<Upstream>,
}

impl Pooled {
    pub fn release(self) {
        self.upstream.checkin(self.sender);
    }
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, addr: SocketAddr, resends: IntCounter) -> Self {
        Upstream {
            addr,
            protocol: cfg.protocol,
            connect_timeout: cfg.connect_timeout.0,
            request_timeout: cfg.request_timeout.map(|d| d.0),
            idle_timeout: cfg.pool_idle_timeout.0,
            max_idle: cfg.pool_max_idle,
            idle: Mutex::new(Pool::default()),
            h2: tokio::sync::Mutex::new(None),
            resends,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// Sends `req` to the app. For HTTP/1.1 through hyper the returned [`Pooled`] must travel
    /// with the response body.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<(Response<AppBody>, Option<Pooled>), ProxyError> {
        match self.protocol {
            UpstreamProtocol::Http1 if req.body().is_end_stream() => {
                self.send_head(&lean::encode_head(&req), req.method(), Instant::now()).await
            }
            UpstreamProtocol::Http1 => {
                // Boxed: requests with a body are the rarer kind, and hyper's future is large.
                Box::pin(self.send_h1(req)).await.map(|(r, p)| (r.map(AppBody::Hyper), p))
            }
            // Boxed: the HTTP/1.1 path is the common one and need not carry this one's size.
            UpstreamProtocol::H2c => Box::pin(self.send_h2(req)).await.map(|r| (r.map(AppBody::Hyper), None)),
        }
    }

    /// `head`, a request head without a body for `method`, in a lean exchange (see `lean`)
    /// started at `now` on a pooled connection or a new one (see [`Self::exchange_lean`]), and
    /// its answer as a response for hyper's server.
    pub async fn send_head(
        self: &Arc<Self>,
        head: &[u8],
        method: &Method,
        now: Instant,
    ) -> Result<(Response<AppBody>, Option<Pooled>), ProxyError> {
        let (conn, (res, bytes)) = self.exchange_lean(head, now, true, &mut |p| Ok(lean::Head::parts(p))).await?;
        let head = lean::Head::new(res, bytes);
        let (res, framing, keep_alive) = head.into_response(method).map_err(|e| ProxyError::Upstream(e.into()))?;
        Ok((res.map(|()| AppBody::Lean(LeanBody::new(conn, framing, keep_alive, self.clone()))), None))
    }

    /// Sends `head`, a request head without a body, in a lean exchange, and returns the
    /// connection with what `take` made of the response's head, and with `keep` the head's
    /// bytes (see [`Conn::exchange`]).
    /// Retried once on a new connection only when not a byte of it was written. `now`: the
    /// request's start, which the pool's idle check takes as the time (one clock read less per
    /// request).
    pub async fn exchange_lean<T>(
        &self,
        head: &[u8],
        now: Instant,
        keep: bool,
        take: &mut impl FnMut(lean::ParsedHead<'_>) -> std::io::Result<T>,
    ) -> Result<(Conn, (T, Bytes)), ProxyError> {
        let mut retried = false;
        loop {
            let pooled = if retried { None } else { self.checkout_lean(now) };
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(c) => c,
                // Boxed: connecting is rare next to reusing, and its future is large.
                None => Conn::new(Box::pin(self.connect()).await?),
            };
            match with_timeout(self.request_timeout, conn.exchange(head, keep, take)).await? {
                Ok(answer) => return Ok((conn, answer)),
                Err(ExchangeError::NotWritten(e)) if reused => {
                    debug!(error = %e, "pooled connection failed before the request was written; retrying on a fresh one");
                    retried = true;
                }
                Err(ExchangeError::NotWritten(e)) => return Err(ProxyError::NotSent(e.into())),
                Err(ExchangeError::Failed(e)) => return Err(ProxyError::Upstream(e.into())),
            }
        }
    }

    /// Sends an upgrade request (WebSocket) on a connection of its own, never pooled.
    pub async fn send_upgrade(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.connect_h1().await?;
        let res = with_timeout(self.request_timeout, sender.try_send_request(req)).await?;
        res.map_err(|mut e| match e.take_message() {
            Some(_) => ProxyError::NotSent(e.into_error().into()),
            None => ProxyError::Upstream(e.into_error().into()),
        })
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Pooled>), ProxyError> {
        let mut retried = false;
        loop {
            let pooled = if retried { None } else { self.checkout() };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(s) => s,
                // Boxed: connecting is rare next to reusing, and its future is large.
                None => Box::pin(self.connect_h1()).await?,
            };
            match with_timeout(self.request_timeout, sender.try_send_request(req)).await? {
                Ok(res) => return Ok((res, Some(Pooled { sender, upstream: self.clone() }))),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => {
                        debug!(error = %e.error(), "pooled connection closed before the request was written; retrying on a fresh one");
                        retried = true;
                        req = back;
                    }
                    Some(_) => return Err(ProxyError::NotSent(e.into_error().into())),
                    None => return Err(ProxyError::Upstream(e.into_error().into())),
                },
            }
        }
    }

    async fn send_h2(&self, mut req: Request<RequestBody>) -> Result<Response<Incoming>, ProxyError> {
        let mut fresh = false;
        loop {
            let mut sender = self.h2_sender(fresh).await?;
            match with_timeout(self.request_timeout, sender.try_send_request(req)).await? {
                Ok(res) => return Ok(res),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => {
                        debug!(error = %e.error(), "h2 connection to the app closed before the request was sent; retrying on a fresh one");
                        fresh = true;
                        req = back;
                    }
                    Some(_) => return Err(ProxyError::NotSent(e.into_error().into())),
                    None => return Err(ProxyError::Upstream(e.into_error().into())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, ProxyError> {
        let stream = connect_resending(self.addr, self.connect_timeout, &self.resends).await?;
        // Small requests must not wait for Nagle's algorithm on loopback.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<RequestBody>, ProxyError> {
        let stream = self.connect().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(Sock::new(stream)))
            .await
            .map_err(|e| ProxyError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                debug!(%error, "app connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn h2_sender(&self, fresh: bool) -> Result<http2::SendRequest<RequestBody>, ProxyError> {
        let mut slot = self.h2.lock().await;
        if let Some(s) = slot.as_ref() {
            if !fresh && !s.is_closed() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        let stream = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(Sock::new(stream)))
            .await
            .map_err(|e| ProxyError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%error, "h2 app connection ended with an error");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// The most recently used ready connection, dropping closed and expired ones.
    fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut i = idle.hyper.len();
        while i > 0 {
            i -= 1;
            let c = &idle.hyper[i];
            if c.conn.is_closed() || now.saturating_duration_since(c.since) >= self.idle_timeout {
                idle.hyper.swap_remove(i);
                continue;
            }
            if c.conn.is_ready() {
                return Some(idle.hyper.swap_remove(i).conn);
            }
        }
        None
    }

    /// The most recently used fit lean connection, dropping unfit and ones expired at `now`.
    fn checkout_lean(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut c) = idle.lean.pop() {
            if now.saturating_duration_since(c.since) < self.idle_timeout && c.conn.is_fit() {
                return Some(c.conn);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.hyper.push(Idle { conn: sender, since: Instant::now() });
        }
    }

    /// A lean connection whose response has ended, back to the pool.
    pub fn checkin_lean(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.lean.push(Idle { conn, since: Instant::now() });
        }
    }

    /// Closes pooled connections idle for longer than `pool_idle_timeout`, checking every half
    /// of it, until the upstream is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let expired = {
                    let mut idle = me.idle.lock().unwrap_or_else(|p| p.into_inner());
                    let now = Instant::now();
                    let before = idle.len();
                    let fresh = |since: Instant| now.saturating_duration_since(since) < me.idle_timeout;
                    // Dropping a sender closes its connection (its task ends and frees it).
                    idle.hyper.retain(|c| !c.conn.is_closed() && fresh(c.since));
                    idle.lean.retain(|c| fresh(c.since));
                    before - idle.len()
                };
                if expired > 0 {
                    debug!(expired, "closed idle app connections past upstream.pool_idle_timeout");
                }
            }
        })
    }

    /// Idle pooled connections (for tests and `/status`).
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }
}

/// How long a connect attempt goes unanswered before a fresh one joins it; doubles after each.
const RESEND_FIRST: Duration = Duration::from_millis(100);

/// Connects to `addr` within `timeout`, resending the SYN faster than the kernel does.
///
/// An app whose accept queue is full (a burst of new connections, a small `listen` backlog)
/// drops the SYN, and the kernel sends it again only after 1 s, then 3 s and 7 s: past the
/// connect timeout, so the request would get a 503 although the app frees its queue within
/// milliseconds. So while no attempt has completed, a fresh attempt (a new socket, a new SYN)
/// joins the ones in flight after [`RESEND_FIRST`], then after twice that, and so on, each
/// interval jittered by ±50% so a burst does not resend in lockstep. The first attempt to
/// complete wins and the others are closed unused. Older attempts stay in flight, so a slow
/// but answering network loses nothing. A refusal or other error ends the connect at once.
pub async fn connect_resending(
    addr: SocketAddr,
    timeout: Duration,
    resends: &IntCounter,
) -> Result<TcpStream, ProxyError> {
    type Attempt = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempts: Vec<Attempt> = vec![Box::pin(TcpStream::connect(addr))];
    let mut interval = RESEND_FIRST;
    let mut timer = Box::pin(tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + jittered(interval))));
    std::future::poll_fn(|cx| loop {
        for attempt in &mut attempts {
            if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(connect_error));
            }
        }
        ready!(timer.as_mut().poll(cx));
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Poll::Ready(Err(ProxyError::ConnectTimeout));
        }
        debug!(%addr, attempts = attempts.len() + 1, "connect to the app unanswered; sending a fresh SYN");
        resends.inc();
        interval *= 2;
        timer.as_mut().reset(deadline.min(now + jittered(interval)));
        attempts.push(Box::pin(TcpStream::connect(addr)));
    })
    .await
}

/// `d` scaled by a random factor in [0.5, 1.5).
fn jittered(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` is freshly keyed, so hashing nothing yields a random number.
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    d.mul_f64(0.5 + (r % 1024) as f64 / 1024.0)
}

/// `fut` bounded by `upstream.request_timeout` when one is set.
async fn with_timeout<F: std::future::Future>(timeout: Option<Duration>, fut: F) -> Result<F::Output, ProxyError> {
    match timeout {
        Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| ProxyError::Timeout),
        None => Ok(fut.await),
    }
}
