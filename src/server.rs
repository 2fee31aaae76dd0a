//! Listeners and client connections: the one accept loop (shared with the admin port),
//! HTTP/1.1-or-HTTP/2 detection per connection, the client-side limits, and the reaction of
//! each connection to the published drain state.
//!
//! How a connection is told to leave (DESIGN §4.2):
//! - HTTP/2: a graceful two-phase GOAWAY from t=0 (hyper/h2 send GOAWAY with the maximum
//!   stream id, then the real last id once the client acknowledges a PING, which `goaway.rs`
//!   delays by `GOAWAY_GRACE`, so no stream the client opened meanwhile is refused).
//! - HTTP/1.1: every response from t=0 carries `Connection: close` (`proxy.rs`); connections
//!   that stay idle are closed only at `min_delay`. Closing them earlier would race a caller
//!   that has not yet seen the endpoint removal and just picked that connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::accepted::{Accepted, Listener};
use crate::body::ConnState;
use crate::config::LimitsConfig;
use crate::cork::{Corked, Releases};
use crate::fast;
use crate::goaway::{Grace, GraceRead};
use crate::metrics::CloseHow;
use crate::proxy::{Proxy, ProxyService};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Explicit listen backlog: the kernel default (often 128 or 4096) should not decide how a
/// burst of connects is absorbed.
pub const BACKLOG: u32 = 1024;

/// Binds a listening socket with `SO_REUSEADDR` (so the port can be reopened on resume) and
/// `TCP_NODELAY`, which accepted sockets inherit: small responses must not wait for Nagle's
/// algorithm, and setting it on the listener spares a syscall per connection.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts until `stop` resolves, handing each connection to `on_conn` with a permit of
/// `limit` (the `max_connections` budget; at the limit, connects wait in the backlog).
/// On stop, connections already completed by the kernel are still taken and served, so that
/// closing the socket resets nobody who was already connected.
/// Connections come as [`Accepted`] sockets, outside the runtime's epoll set until they must
/// wait.
pub async fn accept_loop<S, F>(listener: Listener, limit: Arc<Semaphore>, stop: S, mut on_conn: F)
where
    S: Future,
    F: FnMut(Accepted, SocketAddr, Option<OwnedSemaphorePermit>),
{
    tokio::pin!(stop);
    let mut warned_full = false;
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !warned_full {
                    warn!("limits.max_connections reached: new connections wait in the backlog");
                    warned_full = true;
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                }
            }
        };
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    warned_full = false;
                    on_conn(stream, canonical(peer), Some(permit));
                }
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    let mut taken = 0;
    while let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        taken += 1;
        on_conn(stream, canonical(peer), limit.clone().try_acquire_owned().ok());
    }
    if taken > 0 {
        debug!(taken, "served connections that were waiting in the backlog at close");
    }
    drop(listener);
}

/// An IPv4 client of a dual-stack (`[::]`) listener as the IPv4 address it is, not as
/// `::ffff:a.b.c.d`: the app reads it in `X-Forwarded-For`, and logs show it.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Everything a proxy connection needs, built once.
pub struct ConnCtx {
    pub proxy: Arc<Proxy>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// `limits.max_header_bytes`.
    pub(crate) max_head: usize,
    /// HTTP/1.1 requests without a body take `fast.rs` (`runtime.http1_fast_path`, and an
    /// HTTP/1.1 app: the path speaks the lean exchange).
    fast: bool,
    limit: Arc<Semaphore>,
    releases: Arc<Releases>,
    /// Set when the listener terminates TLS (`tls.rs`).
    tls: Option<TlsAcceptor>,
}

impl ConnCtx {
    pub fn new(proxy: Arc<Proxy>, limits: &LimitsConfig, releases: Arc<Releases>) -> Self {
        let mut h1 = http1::Builder::new();
        // half_close: a client that shuts its write side after its request still gets the
        // response, and a request the app is working on stays in flight until the app answers
        // even if its client leaves. (It also spares hyper a read, and a fresh read buffer,
        // per request while the response is awaited.)
        // No hyper timer: hyper's header read timeout arms a timer for every request; `drive`
        // bounds a request head's arrival with the connection's own timer instead.
        h1.half_close(true).header_read_timeout(None).max_buf_size(limits.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        ConnCtx {
            proxy,
            h1,
            h2,
            header_read_timeout: limits.header_read_timeout.0,
            idle_timeout: limits.idle_timeout.0,
            max_head: limits.max_header_bytes,
            fast: false,
            limit: Arc::new(Semaphore::new(limits.max_connections)),
            releases,
            tls: None,
        }
    }

    /// Serves HTTP/1.1 requests without a body on `fast.rs` (only for an HTTP/1.1 app).
    pub fn with_fast_path(mut self, on: bool) -> Self {
        self.fast = on && self.proxy.upstream.protocol() == crate::config::UpstreamProtocol::Http1;
        self
    }

    /// Terminates TLS on every connection with this acceptor.
    pub fn with_tls(mut self, tls: Option<TlsAcceptor>) -> Self {
        self.tls = tls;
        self
    }
}

/// The proxy's listening socket, which the lifecycle closes at release and reopens on
/// resume. Connections already accepted live on independently.
pub struct ProxyListener {
    addr: SocketAddr,
    ctx: Arc<ConnCtx>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl ProxyListener {
    /// Starts accepting on an already bound listener.
    pub fn start(listener: TcpListener, ctx: Arc<ConnCtx>) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let mut me = ProxyListener { addr, ctx, running: None };
        me.spawn(Listener::new(listener)?);
        Ok(me)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&mut self, listener: Listener) {
        let (tx, rx) = oneshot::channel::<()>();
        let ctx = self.ctx.clone();
        let limit = ctx.limit.clone();
        let handle = tokio::spawn(accept_loop(listener, limit, rx, move |stream, peer, permit| {
            let ctx = ctx.clone();
            let span = tracing::debug_span!("conn", %peer);
            tokio::spawn(serve_proxy_conn(ctx, stream, peer, permit).instrument(span));
        }));
        self.running = Some((tx, handle));
        info!(addr = %self.addr, "proxy listener open");
    }

    /// Stops accepting and closes the socket; returns once it is closed.
    pub async fn close(&mut self) {
        if let Some((tx, handle)) = self.running.take() {
            let _ = tx.send(());
            let _ = handle.await;
            info!(addr = %self.addr, "proxy listener closed: new connections are refused");
        }
    }

    /// Binds the same address again (after a resume).
    pub fn reopen(&mut self) -> io::Result<()> {
        if self.running.is_none() {
            let listener = bind(self.addr)?;
            self.spawn(Listener::new(listener)?);
        }
        Ok(())
    }
}

async fn serve_proxy_conn(
    ctx: Arc<ConnCtx>,
    stream: Accepted,
    peer: SocketAddr,
    _permit: Option<OwnedSemaphorePermit>,
) {
    // One bound for the TLS handshake and the first bytes of a request.
    let deadline = tokio::time::Instant::now() + ctx.header_read_timeout;
    let stream = match &ctx.tls {
        None => ClientStream::Plain(stream),
        // Boxed: the handshake's state would otherwise size every connection's task.
        Some(tls) => match Box::pin(handshake(tls, stream, deadline, &ctx.proxy.acct.metrics)).await {
            Some(s) => s,
            None => return,
        },
    };
    let sniffed = match stream.alpn_h2() {
        // Negotiated by ALPN: hyper reads and checks the preface itself.
        true => Ok(Ok((Prefixed { prefix: Bytes::new(), inner: stream, conn: None }, true))),
        false => tokio::time::timeout_at(deadline, sniff(stream)).await,
    };
    let (mut io, h2) = match sniffed {
        Ok(Ok(v)) => v,
        Ok(Err(error)) => {
            debug!(%error, "connection closed before a request");
            return;
        }
        Err(_) => {
            debug!("no request within limits.header_read_timeout: closing");
            return;
        }
    };
    let acct = &ctx.proxy.acct;
    let _open = acct.activity.connection_opened(h2);
    let conn_state = Arc::new(ConnState::new());
    let tls = ctx.tls.is_some();
    let mut svc = ProxyService::new(ctx.proxy.clone(), conn_state.clone(), peer, h2, tls);
    if h2 {
        // Boxed: an HTTP/2 connection's state is twice an HTTP/1.1 one's, and every task is
        // as large as its largest branch (idle HTTP/1.1 connections are the many).
        Box::pin(async {
            let grace = Arc::new(Grace::default());
            let io = Corked::new(GraceRead::new(io, grace.clone()), ctx.releases.clone());
            let conn = ctx.h2.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            drive(conn, Some(&grace), 0, &conn_state, &ctx).await
        })
        .await;
        return;
    }
    io.conn = Some(conn_state.clone());
    // The sniffed bytes are the start of the first request head.
    conn_state.bytes_read();
    loop {
        if ctx.fast {
            // Boxed, and so built per connection rather than sizing every connection's task
            // (idle connections are the many; a parked one holds neither).
            match Box::pin(fast::serve(&mut io, &svc, &conn_state, &ctx)).await {
                fast::End::Close => {
                    // TLS: close_notify. Plain: nothing; the socket closes as it drops.
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
                    return;
                }
                fast::End::Park => {
                    let _parked = acct.activity.connection_parked();
                    if !Box::pin(parked(&mut io, &conn_state, &ctx)).await {
                        return;
                    }
                    continue;
                }
                fast::End::Handoff => {}
            }
        }
        let served_before = conn_state.served();
        let mut conn = ctx.h1.serve_connection(TokioIo::new(io), svc).with_upgrades();
        if drive(Pin::new(&mut conn), None, served_before, &conn_state, &ctx).await == Ended::Done {
            return;
        }
        // Parked: hyper is done with the connection, which stays open without its buffers.
        let Some(parts) = conn.into_parts() else { return };
        conn_state.set_parking(false);
        io = parts.io.into_inner();
        io.unread(parts.read_buf);
        svc = parts.service;
        let _parked = acct.activity.connection_parked();
        if !Box::pin(parked(&mut io, &conn_state, &ctx)).await {
            return;
        }
    }
}

/// How long an HTTP/1.1 keep-alive connection stays idle before it is parked: hyper's
/// per-connection state and buffers (about 16 KiB) are dropped, and built again when the
/// next request arrives. Busy connections never wait this long between requests.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Waits, holding only the socket, until a parked connection has bytes to read (true) or
/// must close: idle timeout, drain's idle close, process end (false).
async fn parked(io: &mut Prefixed, conn_state: &ConnState, ctx: &ConnCtx) -> bool {
    if io.has_unread() {
        return true;
    }
    let mut state = ctx.proxy.state.clone();
    let idle_until = conn_state.idle_since() + ctx.idle_timeout;
    tokio::select! {
        ready = io.inner.readable() => ready,
        closed = state.wait_for(|s| s.close_idle) => {
            if closed.is_ok() {
                ctx.proxy.acct.metrics.connection_closed(CloseHow::IdleClose);
                debug!("drain: idle keep-alive closed at min_delay");
            }
            false
        }
        _ = tokio::time::sleep_until(idle_until.into()) => {
            debug!(idle_timeout_ms = ctx.idle_timeout.as_millis() as u64, "closing idle client connection");
            false
        }
    }
}

/// A served connection that can be asked to finish gracefully.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful(self: Pin<&mut Self>);
}

impl Graceful for http1::UpgradeableConnection<TokioIo<Prefixed>, ProxyService> {
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl Graceful for http2::Connection<TokioIo<Corked<GraceRead<Prefixed>>>, ProxyService, TokioExecutor> {
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Done,
    /// An idle HTTP/1.1 connection finished without closing its socket, to be parked.
    Parked,
}

/// Polls a connection to completion while applying the idle timeout, the header read timeout
/// and the drain, and parks idle HTTP/1.1 connections. `served_before`: requests this
/// connection served before this HTTP connection was built (it is idle only once it has
/// served one more).
///
/// The header read timeout (HTTP/1.1) runs on this connection's timer, not one per request:
/// once bytes of a request head have arrived (`ConnState::head_pending`), the head must be
/// complete within `header_read_timeout`, counted from when this connection was built if they
/// were already there, else from the first check that sees them; checks come at least every
/// `min(header_read_timeout, PARK_AFTER)` while a head is awaited, so a slow head is cut at
/// most one of those late.
async fn drive<C: Graceful>(
    mut conn: Pin<&mut C>,
    // HTTP/2 only: the grace its GOAWAY leaves clients (`goaway.rs`).
    grace: Option<&Grace>,
    served_before: u32,
    conn_state: &ConnState,
    ctx: &ConnCtx,
) -> Ended {
    let h2 = grace.is_some();
    let idle_timeout = ctx.idle_timeout;
    let head_timeout = ctx.header_read_timeout;
    let recheck = if h2 { idle_timeout.min(PARK_AFTER) } else { idle_timeout.min(PARK_AFTER).min(head_timeout) };
    let mut state = ctx.proxy.state.clone();
    // Evaluate the current state at once: a connection opened during a drain is told to
    // leave like the others.
    state.mark_changed();
    let mut told = false;
    // (requests served, when the pending head was first seen) for the head being awaited;
    // bytes already here (sniffed, or what woke a parked connection) arrived just now.
    let mut head_seen: Option<(u32, Instant)> =
        (!h2 && conn_state.head_pending()).then(|| (conn_state.served(), Instant::now()));
    let idle = tokio::time::sleep(recheck);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    debug!(%error, "client connection ended with an error");
                    return Ended::Done;
                }
                return if conn_state.is_parking() { Ended::Parked } else { Ended::Done };
            }
            changed = state.changed(), if !told => {
                if changed.is_err() {
                    // The lifecycle is gone: the process is stopping.
                    conn.as_mut().graceful();
                    told = true;
                    continue;
                }
                let (draining, close_idle) = {
                    let s = state.borrow_and_update();
                    (s.phase.is_draining(), s.close_idle)
                };
                if let (Some(grace), true) = (grace, draining) {
                    grace.start();
                    conn.as_mut().graceful();
                    ctx.proxy.acct.metrics.connection_closed(CloseHow::Goaway);
                    debug!("drain: GOAWAY sent");
                    told = true;
                } else if !h2 && close_idle {
                    // Only a keep-alive idle between requests is closed. A busy connection's
                    // response carries `Connection: close`; so does the first response of a
                    // connection opened during the drain, whose request is already arriving.
                    if conn_state.is_idle_keep_alive(served_before) {
                        ctx.proxy.acct.metrics.connection_closed(CloseHow::IdleClose);
                        debug!("drain: idle keep-alive closed at min_delay");
                        conn.as_mut().graceful();
                    }
                    told = true;
                }
            }
            _ = &mut idle => {
                let now = Instant::now();
                let head_deadline = if !h2 && conn_state.at_message_boundary() && conn_state.head_pending() {
                    let served = conn_state.served();
                    let since = match head_seen {
                        Some((s, t)) if s == served => t,
                        _ => head_seen.insert((served, now)).1,
                    };
                    Some(since + head_timeout)
                } else {
                    head_seen = None;
                    None
                };
                if head_deadline.is_some_and(|d| now >= d) {
                    debug!(header_read_timeout_ms = head_timeout.as_millis() as u64, "request head not complete within limits.header_read_timeout: closing");
                    return Ended::Done;
                }
                if told {
                    // Only the head's bound still applies; the connection is ending.
                    idle.as_mut().reset(head_deadline.unwrap_or(now + recheck).into());
                    continue;
                }
                let since = conn_state.idle_since();
                let parkable = !h2
                    && head_deadline.is_none()
                    && conn_state.is_idle_keep_alive(served_before)
                    && conn_state.at_message_boundary();
                if conn_state.active() == 0 && now >= since + idle_timeout {
                    debug!(idle_timeout_ms = idle_timeout.as_millis() as u64, "closing idle client connection");
                    conn.as_mut().graceful();
                    told = true;
                    idle.as_mut().reset(head_deadline.unwrap_or(now + recheck).into());
                } else if parkable && now >= since + PARK_AFTER {
                    // hyper ends an idle connection at once when asked to; the socket stays open.
                    conn_state.set_parking(true);
                    conn.as_mut().graceful();
                    told = true;
                } else {
                    let next = if conn_state.active() > 0 {
                        now + idle_timeout.min(PARK_AFTER)
                    } else if let Some(d) = head_deadline {
                        d.min(since + idle_timeout)
                    } else if parkable {
                        since + idle_timeout.min(PARK_AFTER)
                    } else if h2 {
                        since + idle_timeout
                    } else {
                        // Nothing pending yet: look again soon, in case a head starts.
                        (since + idle_timeout).min(now + recheck)
                    };
                    idle.as_mut().reset(next.max(now).into());
                }
            }
        }
    }
}

/// Reads until the connection's first bytes tell HTTP/2 (prior knowledge) from HTTP/1.x,
/// and returns a stream that replays them.
async fn sniff(mut stream: ClientStream) -> io::Result<(Prefixed, bool)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(H2_PREFACE.len());
        let h2 = if buf[..n] != H2_PREFACE[..n] {
            Some(false)
        } else if buf.len() >= H2_PREFACE.len() {
            Some(true)
        } else {
            None
        };
        if let Some(h2) = h2 {
            return Ok((Prefixed { prefix: buf.freeze(), inner: stream, conn: None }, h2));
        }
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a client speaking plain HTTP to the TLS listener gets, instead of a TLS alert it
/// would print as garbage.
const PLAIN_HTTP_TO_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 48\r\nConnection: close\r\n\r\nThis port expects TLS: use https:// to reach it\n";

/// Runs the TLS handshake within `deadline`, counting its outcome.
async fn handshake(
    tls: &TlsAcceptor,
    stream: Accepted,
    deadline: tokio::time::Instant,
    metrics: &crate::metrics::Metrics,
) -> Option<ClientStream> {
    let [ok, failed, timeout] = &metrics.tls_handshakes;
    // A handshake waits on the client at once: the socket goes to tokio from the start.
    let stream = match stream.into_watched() {
        Ok(s) => s,
        Err(error) => {
            failed.inc();
            debug!(%error, "cannot watch the connection: closed before the TLS handshake");
            return None;
        }
    };
    let mut first = [0u8; 1];
    let accepted = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            failed.inc();
            debug!("plain HTTP on the TLS listener: answered 400");
            let _ = tokio::time::timeout_at(deadline, answer_plain_http(stream)).await;
            return None;
        }
        Ok(Ok(_)) => tokio::time::timeout_at(deadline, tls.accept(stream)).await,
        Ok(Err(error)) => Ok(Err(error)),
        Err(elapsed) => Err(elapsed),
    };
    match accepted {
        Ok(Ok(s)) => {
            ok.inc();
            Some(ClientStream::Tls(Box::new(s)))
        }
        Ok(Err(error)) => {
            failed.inc();
            debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            timeout.inc();
            debug!("TLS handshake not complete within limits.header_read_timeout: closing");
            None
        }
    }
}

/// Answers a client that spoke plain HTTP to the TLS listener, then reads what it sent:
/// closing with it unread would reset the connection and could lose the answer.
async fn answer_plain_http(mut stream: TcpStream) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    stream.write_all(PLAIN_HTTP_TO_TLS).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if stream.read(&mut sink).await? == 0 {
            break;
        }
    }
    Ok(())
}

/// A client connection: plain TCP, or TLS over it (boxed: rustls' state is large, and the
/// plain connections are the many).
pub enum ClientStream {
    Plain(Accepted),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientStream {
    fn alpn_h2(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

    /// Waits until the socket has bytes to read (parking: plain connections only, since
    /// TLS may hold decrypted bytes the socket no longer shows).
    async fn readable(&mut self) -> bool {
        match self {
            ClientStream::Plain(s) => s.readable().await.is_ok(),
            ClientStream::Tls(_) => true,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => crate::sock::write_vectored(Pin::new(s), cx, bufs),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            // Sends close_notify, then shuts the socket's write side.
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A client stream whose first bytes were already read: they are replayed before the rest.
pub struct Prefixed {
    prefix: Bytes,
    inner: ClientStream,
    /// Set for HTTP/1.1: while the connection is being parked, a shutdown leaves it open.
    conn: Option<Arc<ConnState>>,
}

impl Prefixed {
    /// Puts bytes read but not used back in front (hyper's read buffer, when parking).
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.prefix.is_empty() {
            self.prefix = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            self.prefix = joined.freeze();
        }
    }

    fn has_unread(&self) -> bool {
        !self.prefix.is_empty()
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = if self.prefix.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Release the sniffing buffer: idle connections are many and long-lived.
                self.prefix = Bytes::new();
            }
            Poll::Ready(Ok(()))
        };
        if let Some(c) = &self.conn {
            if buf.filled().len() > before {
                c.bytes_read();
            }
        }
        polled
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // HTTP/1.1: hyper shuts the write side when it ends a connection, and the socket is
        // closed right after, which sends the same FIN: one syscall fewer per closed
        // connection. A connection being parked must stay open. A tunnel (upgrade) needs the
        // real half-close, to relay one side's end to the other, and TLS its close_notify.
        let plain = matches!(self.inner, ClientStream::Plain(_));
        if plain && self.conn.as_ref().is_some_and(|c| !c.is_upgraded()) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// `serve_proxy_conn` does not set `TCP_NODELAY` itself: it relies on this.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let l = Listener::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut accepted, _) = l.accept().await.unwrap();
        assert!(accepted.watched().unwrap().nodelay().unwrap());
        drop(client);
    }

    /// Each client connection is one task as large as its future; idle HTTP/1.1 connections
    /// are the many, so the HTTP/2 branch (twice the size) must not set that size.
    #[tokio::test]
    async fn a_connection_task_is_sized_for_http1_not_http2() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let cfg = crate::config::Config::default();
        let ctx = Arc::new(ConnCtx::new(crate::proxy::test_proxy(addr), &cfg.limits, Arc::default()));
        let task = std::mem::size_of_val(&serve_proxy_conn(ctx, Accepted::Watched(stream), addr, None));
        let h2 =
            std::mem::size_of::<http2::Connection<TokioIo<Corked<GraceRead<Prefixed>>>, ProxyService, TokioExecutor>>();
        assert!(task < h2 + 1024, "connection task {task} bytes (an HTTP/2 connection alone is {h2})");
    }
}
