//! The HTTP/1.1 server's own path for the requests a sidecar mostly carries: a head without a
//! body (GET, HEAD, most DELETE and OPTIONS) or with a small one (`Content-Length` up to
//! [`BODY_MAX`]: most API POSTs), answered by the app over the lean exchange. A body is read
//! whole, then written behind its head in one write; it must keep coming (no gap of
//! `limits.header_read_timeout`, else 408 and the connection closes), and the request is in
//! flight from its head.
//!
//! hyper's server turns each request head into an `http::Request` (a header map, every name
//! hashed, every value its own `Bytes`), the proxy rewrites that map, the lean client writes it
//! out again, reads the app's head into a second map, and hyper writes that one out. This path
//! parses the client's head with httparse on the stack and writes the app's head straight from
//! it, with the same rewrite (`proxy.rs`, `ProxyService::prepare`): hop-by-hop fields out,
//! `X-Forwarded-For` joined into one line with the peer appended, `X-Forwarded-Proto` and
//! `X-Forwarded-Host` added when absent. The app's response head goes back the same way: its
//! fields as they came, less the hop-by-hop ones, plus the framing the client needs. No header
//! map is built on either side.
//!
//! Only what this path is sure to do exactly as hyper's would stays on it. Anything else is
//! handed to hyper with the bytes already read, for the rest of the connection's life or until
//! it parks: a chunked body (`Transfer-Encoding`), a larger one, a `Content-Length` said
//! twice or with a leading zero, `Expect`, `Upgrade`, a
//! `Connection` naming other fields, a host that is not exactly one `Host` field, a target
//! that is not a plain origin-form path, `CONNECT`, more than [`MAX_FIELDS`] fields, a head
//! larger than `limits.max_header_bytes` or one httparse refuses (hyper answers those 400 or
//! 431), and any request once the drain has released (hyper answers it with the retry hint).
//!
//! The drain rules are those of hyper's connections (`server.rs`): every response from t=0 of
//! the drain carries `Connection: close` and the connection closes after it; an idle
//! keep-alive closes at `min_delay`; a head must be complete within
//! `limits.header_read_timeout` once its first bytes are here; a connection idle for
//! `PARK_AFTER` goes back to `server.rs` to be parked, holding no buffer. A request is in
//! flight from its head until the last byte of its response has been written.

use std::cell::RefCell;
use std::future::Future as _;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use crate::body::{AccessInfo, ConnState, RequestGuard};
use crate::lean::{self, tokens, Fields, Framing, LeanBody, ParsedHead};
use crate::lifecycle::{Phase, State};
use crate::metrics::CloseHow;
use crate::proxy::ProxyService;
use crate::server::{ConnCtx, Prefixed, PARK_AFTER};

/// Request header fields parsed on the stack; a head with more goes to hyper.
pub const MAX_FIELDS: usize = 64;
/// What each read of a request head asks for at least.
const READ: usize = 4096;
/// Body data up to this size is copied behind the head (one write); larger data is written
/// from its own buffer.
const COPY_MAX: usize = 16 * 1024;
/// The largest request body (`Content-Length`) this path takes: read whole, then sent to the
/// app behind its head in one write. A larger one goes to hyper, which streams it.
pub const BODY_MAX: usize = 64 * 1024;

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The connection is done: closed by the client, by the drain, by a timeout, or after a
    /// response that closes it.
    Close,
    /// Idle for `PARK_AFTER` between requests, holding no buffer: park it.
    Park,
    /// A request this path does not serve: its bytes are back in `io` for hyper.
    Handoff,
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// Not for this path (see the module's list).
    Handoff,
    Ready(Request),
}

/// A request head taken by this path.
#[derive(Debug)]
struct Request {
    /// Bytes of the client's head.
    len: usize,
    /// Bytes of its body (`Content-Length`), which follow the head.
    body: usize,
    /// The client spoke HTTP/1.0.
    http10: bool,
    /// The client wants its connection kept after the response.
    keep_alive: bool,
    /// A HEAD request: the response has no body whatever its fields say.
    head: bool,
    /// `TE: trailers`: the client takes trailer fields (those the app declared).
    trailers: bool,
    /// Method and target, for the access log.
    access: Option<(Method, String)>,
}

/// The request fields this path acts on.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    Host,
    Te,
    Connection,
    ContentLength,
    /// Hop-by-hop fields that are simply not passed on.
    HopByHop,
    /// Fields that only hyper's path handles.
    Handoff,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    Other,
}

/// Whether `name`, a field name httparse took (a token), is `lower` in any case. `lower` is
/// lower-case letters and `-`: on a token, setting each byte's 0x20 bit lower-cases a letter
/// and leaves `-` and the other token bytes unlike every letter (one operation per byte
/// where `eq_ignore_ascii_case` lower-cases both sides).
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|&b| b.is_ascii_lowercase() || b == b'-'));
    name.len() == lower.len() && name.iter().zip(lower).all(|(&n, &l)| n | 0x20 == l)
}

fn field(name: &str) -> Field {
    let is = |s: &str| is_name(name.as_bytes(), s.as_bytes());
    match name.len() {
        2 if is("te") => Field::Te,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::Handoff,
        7 if is("upgrade") => Field::Handoff,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::HopByHop,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::XForwardedFor,
        16 if is("proxy-connection") => Field::HopByHop,
        16 if is("x-forwarded-host") => Field::XForwardedHost,
        17 if is("transfer-encoding") => Field::Handoff,
        17 if is("x-forwarded-proto") => Field::XForwardedProto,
        _ => Field::Other,
    }
}

/// An origin-form target of bytes `http::Uri` takes as they are: a path, a query, no
/// fragment. Anything else (`#`, quotes, brackets, non-ASCII) goes to hyper, which parses
/// the target as a URI and answers 400 or rewrites it.
fn plain_target(path: &str) -> bool {
    path.starts_with('/')
        && path.bytes().all(|b| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x5A | 0x5F | 0x61..=0x7A | 0x7E))
}

/// A `Content-Length` value this path takes: digits only, no leading zero, at most
/// [`BODY_MAX`].
fn body_length(value: &[u8]) -> Option<usize> {
    // (Seven digits or more are over `BODY_MAX`: the sum below cannot overflow.)
    if value.is_empty() || value.len() > 6 || (value[0] == b'0' && value.len() > 1) {
        return None;
    }
    let n = value.iter().try_fold(0usize, |n, &b| b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0')))?;
    (n <= BODY_MAX).then_some(n)
}

/// Parses a request head at the start of `buf` and, when this path takes it, writes the head
/// for the app into `out` (cleared first).
fn parse(buf: &[u8], max_head: usize, svc: &ProxyService, access_log: bool, out: &mut Vec<u8>) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Parsed::Partial,
        _ => return Parsed::Handoff,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Handoff;
    };
    if method == "CONNECT" || !plain_target(path) {
        return Parsed::Handoff;
    }
    let mut host: Option<&[u8]> = None;
    let mut body: Option<usize> = None;
    let (mut close, mut keep_alive, mut trailers) = (false, false, false);
    let (mut xff, mut xfp, mut xfh) = (0, false, false);
    for f in req.headers.iter() {
        match field(f.name) {
            Field::Host if host.is_none() => host = Some(f.value),
            Field::Host | Field::Handoff => return Parsed::Handoff,
            // One length this path reads whole; a second field (even an equal one), a list or
            // a larger body goes to hyper.
            Field::ContentLength => match (body, body_length(f.value)) {
                (None, Some(n)) => body = Some(n),
                _ => return Parsed::Handoff,
            },
            Field::Connection => {
                for t in tokens(f.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else if !t.is_empty() {
                        // It names fields to remove: hyper's path reads the names.
                        return Parsed::Handoff;
                    }
                }
            }
            Field::Te => trailers |= tokens(f.value).any(|t| t.eq_ignore_ascii_case(b"trailers")),
            Field::XForwardedFor => xff += 1,
            Field::XForwardedProto => xfp = true,
            Field::XForwardedHost => xfh = true,
            Field::HopByHop | Field::Other => {}
        }
    }
    // HTTP/1.0 may name no host; hyper's path then sends the app's address.
    let Some(host) = host else { return Parsed::Handoff };
    let http10 = version == 0;

    let peer_ip = svc.peer_ip.as_bytes();
    out.clear();
    out.reserve(len + 96 + peer_ip.len() + host.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut lines = Lines::new(&buf[..len]);
    for f in req.headers.iter() {
        match field(f.name) {
            Field::Connection | Field::Te | Field::HopByHop | Field::XForwardedFor => {}
            _ => lines.push(out, f),
        }
    }
    lines.flush(out);
    // `take`: none are looked for when none came.
    let client_xff = req.headers.iter().filter(|f| field(f.name) == Field::XForwardedFor).map(|f| f.value);
    write_forwarded_for(out, client_xff.take(xff), peer_ip);
    if !xfp {
        out.extend_from_slice(if svc.tls { b"x-forwarded-proto: https\r\n" } else { b"x-forwarded-proto: http\r\n" });
    }
    if !xfh {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let access = access_log.then(|| (Method::from_bytes(method.as_bytes()).unwrap_or_default(), path.to_string()));
    Parsed::Ready(Request {
        len,
        body: body.unwrap_or(0),
        http10,
        keep_alive: if http10 { keep_alive && !close } else { !close },
        head: method == "HEAD",
        trailers,
        access,
    })
}

/// Why a request body did not come whole.
enum BodyWait {
    /// The client closed, or its connection failed.
    Gone,
    /// No byte of it came for the bound.
    Stalled,
}

/// Reads until `buf` holds `want` bytes: a request's head and its body, which must keep
/// coming (no gap longer than `gap`, as nginx's `client_body_timeout`).
///
/// The buffer gets `READ` bytes of room past the body. tokio forgets that a socket was readable
/// only after a short read; a read that fills the buffer exactly leaves it marked, and the
/// next request's first read is a system call that finds nothing. The buffer is kept for the
/// next request, so without the room every same-sized request after it would fill it exactly.
async fn read_body<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    want: usize,
    gap: std::time::Duration,
) -> Result<(), BodyWait> {
    buf.reserve(want - buf.len() + READ);
    while buf.len() < want {
        match tokio::time::timeout(gap, io.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(BodyWait::Gone),
            Ok(Ok(_)) => {}
            Err(_) => return Err(BodyWait::Stalled),
        }
    }
    Ok(())
}

/// Room for a read of the request head: at least `READ` bytes.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ {
        buf.reserve(READ);
    }
}

/// The read buffer after a request, kept for the next. Emptied, it takes back the room its
/// requests used (no allocation: `capacity` counts only what lies past the bytes consumed), so
/// a request the size of the one before is read whole in one read, with room to spare (see
/// [`read_body`]); a buffer a large head or body grew is given up. One that holds the next
/// request (pipelined) is left as it is.
fn keep_for_next(buf: &mut BytesMut) {
    if buf.is_empty() {
        let _ = buf.try_reclaim(buf.capacity() + 1);
        // (A body up to `COPY_MAX` keeps the buffer it was read into.)
        if buf.capacity() > COPY_MAX + 4 * READ {
            *buf = BytesMut::new();
        }
    }
}

/// What woke a connection waiting for a request head.
enum Wake {
    Read(std::io::Result<usize>),
    /// The published state changed (the receiver, to wait on again), or its sender is gone.
    State(Option<watch::Receiver<State>>),
    Timer,
}

/// Resolves with the receiver once the published state has changed, with `None` once the
/// lifecycle is gone.
async fn next_change(mut rx: watch::Receiver<State>) -> Option<watch::Receiver<State>> {
    rx.changed().await.ok().map(|()| rx)
}

/// Serves requests on an HTTP/1.1 connection until it closes, parks, or brings a request
/// for hyper. `io` holds no unread bytes when this returns, except on [`End::Handoff`].
pub async fn serve(io: &mut Prefixed, svc: &ProxyService, conn: &Arc<ConnState>, ctx: &ConnCtx) -> End {
    let p = &*svc.proxy;
    // The drain's changes wake the connection while it waits for a head; one registration
    // for as long as nothing changes, not one per wait. Per request, the phase is read from
    // the proxy's own receiver.
    let mut changed = Some(Box::pin(next_change(p.state.clone())));
    let mut buf = BytesMut::new();
    // The head for the app, and what goes to the client: kept from request to request.
    let mut to_app: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let head_timeout = ctx.header_read_timeout;
    let idle_timeout = ctx.idle_timeout;
    let recheck = idle_timeout.min(PARK_AFTER).min(head_timeout);
    // The connection's one timer, looked at only when it fires (no timer per request): the
    // bound on a head being read, counted from the first check that sees its bytes, as
    // `server::drive` counts it; the idle timeout; parking.
    let timer = tokio::time::sleep(recheck);
    tokio::pin!(timer);
    // Bytes of a head are here already (what brought the connection to this path).
    let mut head_seen: Option<(u32, Instant)> = Some((conn.served(), Instant::now()));
    loop {
        let mut req = loop {
            if !buf.is_empty() {
                match parse(&buf, ctx.max_head, svc, p.access_log, &mut to_app) {
                    Parsed::Ready(req) => break req,
                    Parsed::Handoff => {
                        io.unread(buf.freeze());
                        return End::Handoff;
                    }
                    Parsed::Partial => {}
                }
            }
            make_room(&mut buf);
            let wake = tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => Wake::Read(r),
                c = std::future::poll_fn(|cx| match changed.as_mut() {
                    Some(f) => f.as_mut().poll(cx),
                    None => std::task::Poll::Pending,
                }) => Wake::State(c),
                () = &mut timer => Wake::Timer,
            };
            match wake {
                Wake::Read(Ok(0)) => return End::Close,
                Wake::Read(Ok(_)) => {}
                Wake::Read(Err(error)) => {
                    debug!(%error, "client connection ended with an error");
                    return End::Close;
                }
                Wake::State(alive) => {
                    // The lifecycle gone means the process is stopping: as a drain's idle close.
                    let alive = alive.map(|mut rx| {
                        let close_idle = rx.borrow_and_update().close_idle;
                        changed = Some(Box::pin(next_change(rx)));
                        close_idle
                    });
                    if alive.is_none() {
                        changed = None;
                    }
                    let close_idle = alive.unwrap_or(true);
                    // Only a keep-alive idle between requests closes; bytes here are a request
                    // on its way, whose response will say `Connection: close`.
                    if close_idle && buf.is_empty() && conn.served() > 0 {
                        if alive.is_some() {
                            p.acct.metrics.connection_closed(CloseHow::IdleClose);
                            debug!("drain: idle keep-alive closed at min_delay");
                        }
                        return End::Close;
                    }
                }
                Wake::Timer => {
                    let now = Instant::now();
                    let next = if buf.is_empty() {
                        head_seen = None;
                        let since = conn.idle_since();
                        if now >= since + idle_timeout {
                            debug!(idle_timeout_ms = idle_timeout.as_millis() as u64, "closing idle client connection");
                            return End::Close;
                        }
                        if now >= since + PARK_AFTER {
                            return End::Park;
                        }
                        since + PARK_AFTER.min(idle_timeout)
                    } else {
                        let served = conn.served();
                        let since = match head_seen {
                            Some((s, t)) if s == served => t,
                            _ => head_seen.insert((served, now)).1,
                        };
                        if now >= since + head_timeout {
                            debug!(
                                header_read_timeout_ms = head_timeout.as_millis() as u64,
                                "request head not complete within limits.header_read_timeout: closing"
                            );
                            return End::Close;
                        }
                        (since + head_timeout).min(now + recheck)
                    };
                    timer.as_mut().reset(next.max(now).into());
                }
            }
        };

        let phase = p.state.borrow().phase;
        if phase == Phase::Drained {
            // Released: hyper's path answers with the retry hint, as it does for every client.
            io.unread(buf.freeze());
            return End::Handoff;
        }
        // In flight from here, its head read, while the body is still coming.
        let started = Instant::now();
        let mut guard = RequestGuard::start(p.acct.clone(), conn.clone(), phase, started);
        if phase.is_draining() {
            p.acct.metrics.drain_requests.inc();
        }
        if let Some((method, path)) = req.access.take() {
            guard.set_access(AccessInfo { method, path, peer: svc.peer });
        }
        let whole = req.len + req.body;
        if buf.len() < whole {
            match read_body(io, &mut buf, whole, head_timeout).await {
                Ok(()) => {}
                Err(BodyWait::Gone) => return End::Close,
                Err(BodyWait::Stalled) => {
                    debug!(
                        header_read_timeout_ms = head_timeout.as_millis() as u64,
                        "request body stalled for limits.header_read_timeout: 408, closing"
                    );
                    guard.set_status(408);
                    out.clear();
                    let end = Ending { keep: false, http10: req.http10, say_close: true };
                    write_own_answer(&mut out, &req, StatusCode::REQUEST_TIMEOUT, &HeaderMap::new(), b"", end);
                    let _ = io.write_all(&out).await;
                    let _ = io.shutdown().await;
                    return End::Close;
                }
            }
        }
        to_app.extend_from_slice(&buf[req.len..whole]);
        buf.advance(whole);
        out.clear();
        let answer = p
            .upstream
            .exchange_lean(&to_app, started, false, &mut |h| {
                // Read again now: a request that started before the drain may end after it.
                write_head(&mut out, &req, &h, p.state.borrow().phase.is_draining())
            })
            .await;
        let keep = match answer {
            Ok((app, (a, _))) => {
                guard.set_status(a.status.as_u16());
                if a.draining {
                    p.acct.metrics.connection_closed(CloseHow::ConnectionClose);
                }
                let chunked = matches!(a.framing, Framing::Chunked(_) | Framing::ToEnd);
                let body = LeanBody::new(app, a.framing, a.app_keep, p.upstream.clone());
                if write_body(io, &mut out, body, chunked && !req.http10, a.trailers).await.is_err() {
                    return End::Close;
                }
                a.keep
            }
            Err(error) => {
                // A head the app sent that could not be passed on leaves part of it here.
                out.clear();
                let draining = p.state.borrow().phase.is_draining();
                let body = error.body();
                let res = svc.failed(error);
                guard.set_status(res.status().as_u16());
                let says_close = res.headers().contains_key(http::header::CONNECTION);
                let keep = req.keep_alive && !draining && !says_close;
                if draining && !says_close {
                    p.acct.metrics.connection_closed(CloseHow::ConnectionClose);
                }
                let end = Ending { keep, http10: req.http10, say_close: req.keep_alive || draining || says_close };
                write_own_answer(&mut out, &req, res.status(), res.headers(), &body, end);
                if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
                    return End::Close;
                }
                keep
            }
        };
        // The response is written: the request is no longer in flight.
        drop(guard);
        if !keep {
            let _ = io.shutdown().await;
            return End::Close;
        }
        // Buffers stay for the next request, unless a large head or body grew them; an idle
        // connection gives them up when it parks.
        if out.capacity() > 4 * COPY_MAX {
            out = Vec::new();
        }
        if to_app.capacity() > 4 * COPY_MAX {
            to_app = Vec::new();
        }
        keep_for_next(&mut buf);
    }
}

/// An answer of drainproxy's own to `req` (an error, a timeout): its status, its `fields`
/// (less `Connection`, which `end` says), a length, and `body` unless the request was HEAD.
fn write_own_answer(
    out: &mut Vec<u8>,
    req: &Request,
    status: StatusCode,
    fields: &HeaderMap,
    body: &[u8],
    end: Ending,
) {
    write_status(out, req.http10, status, None);
    for (name, value) in fields.iter().filter(|(n, _)| *n != http::header::CONNECTION) {
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    write_field(out, b"content-length", body.len().to_string().as_bytes());
    end_head(out, true, end);
    if !req.head {
        out.extend_from_slice(body);
    }
}

fn write_status(out: &mut Vec<u8>, http10: bool, status: StatusCode, reason: Option<&[u8]>) {
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.unwrap_or(status.canonical_reason().unwrap_or("").as_bytes()));
    out.extend_from_slice(b"\r\n");
}

/// One X-Forwarded-For line: the client's values, joined, then this hop's peer.
pub(crate) fn write_forwarded_for<'a>(out: &mut Vec<u8>, client: impl Iterator<Item = &'a [u8]>, peer: &[u8]) {
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in client {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer);
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response head ends its connection's say: HTTP/1.1 says `close` when the connection
/// closes after it; HTTP/1.0, where closing is the default, says `keep-alive` when it stays
/// open, and `close` when the client asked to keep it or the drain is on (as hyper's path
/// writes it; where hyper would write `close, keep-alive`, this says `close` alone).
#[derive(Clone, Copy)]
struct Ending {
    keep: bool,
    http10: bool,
    /// The client asked to keep the connection, or the drain is on.
    say_close: bool,
}

/// The end of a response head: `Date` unless the app sent one (RFC 9110 §6.6.1 asks a proxy
/// to add it), `Connection`, the empty line.
fn end_head(out: &mut Vec<u8>, add_date: bool, end: Ending) {
    if add_date {
        DATE.with(|d| {
            let mut d = d.borrow_mut();
            let now = SystemTime::now();
            let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if d.0 != secs {
                *d = (secs, httpdate::fmt_http_date(now));
            }
            write_field(out, b"date", d.1.as_bytes());
        });
    }
    if end.keep {
        if end.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    } else if !end.http10 || end.say_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value of the current second.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Whether `name` is among the comma-separated names in any of `values`.
fn named_in(values: &[&[u8]], name: &[u8]) -> bool {
    values.iter().flat_map(|v| tokens(v)).any(|t| t.eq_ignore_ascii_case(name))
}

/// What followed the app's response head, once the client's head is written.
struct Answer {
    status: StatusCode,
    framing: Framing,
    /// The app connection may carry another exchange after this response.
    app_keep: bool,
    /// The client connection stays open after it.
    keep: bool,
    /// The drain was on when the head was written: the connection closes after it.
    draining: bool,
    /// The trailer fields to pass on in a chunked body: as hyper does, those the app declared
    /// (`Trailer`), to a client that said `TE: trailers`.
    trailers: Vec<Bytes>,
}

/// Writes the client's response head for the app's head `h` into `out`: its fields in one
/// pass, noting those that frame the body, and a second pass only when that noting finds a
/// length not to pass on or a `Connection` that names fields.
fn write_head(out: &mut Vec<u8>, req: &Request, h: &ParsedHead<'_>, draining: bool) -> std::io::Result<Answer> {
    write_status(out, req.http10, h.status, h.reason);
    let fields_at = out.len();
    let mut fields = Fields::default();
    let (mut has_date, mut trailers) = write_fields(out, req, h, &mut fields, false, &[]);
    let (framing, app_keep, drop_length) = lean::framing(req.head, h.version, h.status, &fields)?;
    if drop_length || fields.connection_names {
        out.truncate(fields_at);
        let named: Vec<&[u8]> = if fields.connection_names {
            h.fields.iter().filter(|f| is_name(f.name.as_bytes(), b"connection")).map(|f| f.value).collect()
        } else {
            Vec::new()
        };
        (has_date, trailers) = write_fields(out, req, h, &mut Fields::default(), drop_length, &named);
    }
    let chunked = matches!(framing, Framing::Chunked(_) | Framing::ToEnd);
    if chunked && !req.http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    // An HTTP/1.0 client cannot take chunks: the body runs to the connection's end.
    // From t=0 every HTTP/1.1 response tells its connection to leave (DESIGN §4.2).
    let keep = req.keep_alive && !draining && !(chunked && req.http10);
    end_head(out, !has_date, Ending { keep, http10: req.http10, say_close: req.keep_alive || draining });
    Ok(Answer { status: h.status, framing, app_keep, keep, draining, trailers })
}

/// What a response field is to [`write_fields`].
enum Kind {
    Pass,
    HopByHop,
    Date,
    Trailer,
}

/// Writes the app's fields that a client is passed, each line as it came: not the hop-by-hop
/// ones, nor those `named` in `Connection`, nor `Content-Length` when `drop_length`, nor
/// `Trailer` where no chunks can follow. Notes the framing fields in `fields`. Returns whether
/// a `Date` was written, and the trailer fields to pass on.
fn write_fields(
    out: &mut Vec<u8>,
    req: &Request,
    h: &ParsedHead<'_>,
    fields: &mut Fields,
    drop_length: bool,
    named: &[&[u8]],
) -> (bool, Vec<Bytes>) {
    // `Trailer` announces fields after a chunked body: not to a client that cannot get one.
    let no_chunks = req.http10 || req.head || matches!(h.status.as_u16(), 204 | 304);
    let mut has_date = false;
    let mut trailers = Vec::new();
    let mut lines = Lines::new(h.bytes);
    for f in h.fields {
        let name = f.name.as_bytes();
        let is = |known: &[u8]| is_name(name, known);
        let kind = match name.len() {
            2 if is(b"te") => Kind::HopByHop,
            4 if is(b"date") => Kind::Date,
            7 if is(b"upgrade") => Kind::HopByHop,
            7 if is(b"trailer") => Kind::Trailer,
            10 if is(b"connection") => {
                fields.connection(f.value);
                Kind::HopByHop
            }
            10 if is(b"keep-alive") => Kind::HopByHop,
            14 if is(b"content-length") => {
                fields.content_length(f.value);
                if drop_length {
                    Kind::HopByHop
                } else {
                    Kind::Pass
                }
            }
            16 if is(b"proxy-connection") => Kind::HopByHop,
            17 if is(b"transfer-encoding") => {
                fields.transfer_encoding(f.value);
                Kind::HopByHop
            }
            _ => Kind::Pass,
        };
        match kind {
            // A line left out ends the run before it (the next one does not adjoin it).
            Kind::HopByHop => continue,
            _ if !named.is_empty() && named_in(named, name) => continue,
            Kind::Trailer if no_chunks => continue,
            Kind::Trailer if req.trailers => {
                trailers.extend(tokens(f.value).filter(|t| !t.is_empty()).map(Bytes::copy_from_slice));
            }
            Kind::Date => has_date = true,
            _ => {}
        }
        lines.push(out, f);
    }
    lines.flush(out);
    (has_date, trailers)
}

/// Copies header fields' lines from a head to an output as they came, each run of adjacent
/// lines in one copy: a head mostly passes on whole, and a copy per field cost more than the
/// fields' bytes. A line is copied as it is only when its value ends at `\r\n`; one with a
/// bare `\n` or trailing spaces, or a value httparse gave from elsewhere, is written out as
/// `name: value\r\n`.
struct Lines<'b> {
    head: &'b [u8],
    /// The run of lines not yet copied: `head[run.0..run.1]`.
    run: (usize, usize),
}

impl<'b> Lines<'b> {
    fn new(head: &'b [u8]) -> Lines<'b> {
        Lines { head, run: (0, 0) }
    }

    /// Adds the line of `f`, a field parsed from the head.
    fn push(&mut self, out: &mut Vec<u8>, f: &httparse::Header<'b>) {
        let base = self.head.as_ptr() as usize;
        let start = (f.name.as_ptr() as usize).wrapping_sub(base);
        let end = (f.value.as_ptr() as usize).wrapping_sub(base).wrapping_add(f.value.len());
        let stop = end.wrapping_add(2);
        if start < end
            && end < stop
            && stop <= self.head.len()
            && self.head[end] == b'\r'
            && self.head[end + 1] == b'\n'
        {
            if start != self.run.1 {
                self.flush(out);
                self.run.0 = start;
            }
            self.run.1 = stop;
            return;
        }
        self.flush(out);
        write_field(out, f.name.as_bytes(), f.value);
    }

    /// Copies the run so far: when the next line does not adjoin it (one in between was left
    /// out), and at the end.
    fn flush(&mut self, out: &mut Vec<u8>) {
        if self.run.0 < self.run.1 {
            out.extend_from_slice(&self.head[self.run.0..self.run.1]);
        }
        self.run = (0, 0);
    }
}

/// Writes the response: the head in `out`, then the body as the app sends it (chunked when
/// `chunked`). A body the app cuts short ends the connection, as hyper's path does.
async fn write_body<W, B>(
    io: &mut W,
    out: &mut Vec<u8>,
    mut body: B,
    chunked: bool,
    declared: Vec<Bytes>,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    B: http_body::Body<Data = Bytes, Error = std::io::Error> + Unpin,
{
    let mut trailers: Option<HeaderMap> = None;
    let mut next = body.frame().await;
    while let Some(frame) = next {
        let frame = match frame {
            Ok(f) => f,
            Err(error) => {
                debug!(%error, "app response body failed: closing the client connection");
                let _ = io.write_all(out).await;
                return Err(error);
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                if out.len() + data.len() <= COPY_MAX {
                    out.extend_from_slice(&data);
                } else {
                    // Both in one vectored write, `data` not copied: one segment on the wire
                    // and one wake-up of the client, where two writes make two of each (a
                    // 16 KiB answer comes in two reads: its head with the first part fills
                    // `out`, the rest is `data`).
                    io.write_all_buf(&mut Buf::chain(out.as_slice(), &data[..])).await?;
                    out.clear();
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
        // The next frame at once when its bytes are here already (a response larger than the
        // first read, which the app wrote whole): what is here goes out with it, in one write.
        // Otherwise what is here goes now, flushed (a TLS stream may hold records until
        // then), or a streamed body would wait.
        let now = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::pin::Pin::new(&mut body).poll_frame(&mut cx)
        };
        next = match now {
            std::task::Poll::Ready(frame) => frame,
            std::task::Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    out.clear();
                }
                io.flush().await?;
                body.frame().await
            }
        };
    }
    if chunked {
        out.extend_from_slice(b"0\r\n");
        if let Some(t) = trailers.filter(|_| !declared.is_empty()) {
            for (name, value) in &t {
                if declared.iter().any(|d| d.eq_ignore_ascii_case(name.as_str().as_bytes())) {
                    write_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's head this path writes for an app's head, parsed back: its field names
    /// (lower case, sorted, without those the path adds itself), framing, and whether the app
    /// connection is kept.
    fn fast_view(raw: &str, req: &Request) -> std::io::Result<(Vec<String>, Framing, bool)> {
        let mut out = Vec::new();
        let mut take = |h: ParsedHead<'_>| write_head(&mut out, req, &h, false);
        let a = match lean::tests::parse_final(raw.as_bytes(), &mut take)? {
            Some(a) => a,
            None => panic!("not a complete final head: {raw}"),
        };
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut fields);
        assert!(res.parse(&out).unwrap().is_complete(), "{}", String::from_utf8_lossy(&out));
        Ok((names(res.headers.iter().map(|h| h.name)), a.framing, a.app_keep))
    }

    fn names<'a>(all: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut v: Vec<String> = all
            .map(str::to_ascii_lowercase)
            .filter(|n| !matches!(n.as_str(), "date" | "connection" | "transfer-encoding" | "trailer"))
            .collect();
        v.sort();
        v
    }

    /// The bytes of each write call, a vectored one counted once (one `writev`).
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.len());
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.0.push(n);
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A client that sent `left` bytes at once; each read's room and what it returned.
    struct Sent {
        left: usize,
        reads: Vec<(usize, usize)>,
    }

    impl tokio::io::AsyncRead for Sent {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let (room, n) = (buf.remaining(), self.left.min(buf.remaining()));
            buf.put_slice(&vec![b'x'; n]);
            self.left -= n;
            self.reads.push((room, n));
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Requests with a body, read as the path reads them into the buffer the connection
    /// keeps: the last read of each is short, so tokio forgets the socket was readable and the
    /// next request's read is not a system call that finds nothing; a request no larger than
    /// the one before (a body up to `COPY_MAX`) is read in one read; and a buffer a larger
    /// body grew is not kept.
    #[tokio::test]
    async fn the_last_read_of_a_request_with_a_body_is_short() {
        let gap = std::time::Duration::from_secs(5);
        let mut buf = BytesMut::new();
        let mut before = 0;
        for whole in [109 + 16_384, 109 + 16_384, 109 + 16_384, 50 + 1_000, 80 + BODY_MAX, 80 + BODY_MAX, 60] {
            // As a client writes a request: all of it at once.
            let mut io = Sent { left: whole, reads: Vec::new() };
            make_room(&mut buf);
            io.read_buf(&mut buf).await.unwrap();
            if buf.len() < whole {
                assert!(read_body(&mut io, &mut buf, whole, gap).await.is_ok());
            }
            assert_eq!(buf.len(), whole);
            let &(room, n) = io.reads.last().unwrap();
            assert!(n < room, "{whole} bytes: the last read filled its buffer ({:?})", io.reads);
            if whole <= before && before <= COPY_MAX + READ {
                assert_eq!(io.reads.len(), 1, "{whole} bytes after {before}: {:?}", io.reads);
            }
            before = whole;
            buf.advance(whole);
            keep_for_next(&mut buf);
            assert!(buf.capacity() <= COPY_MAX + 4 * READ, "{whole} bytes: kept {}", buf.capacity());
        }
    }

    /// What of a response is here goes to the client in one write: a 16 KiB answer, read from
    /// the app in two parts (its head and first 8 KiB, then the rest), is one write and so one
    /// segment, not two (each of which wakes the client).
    #[tokio::test]
    async fn the_parts_of_an_answer_that_are_here_go_out_in_one_write() {
        // (the body's parts behind a 200-byte head, the writes the client must see)
        let cases: [(&[usize], &[usize]); 4] = [
            // A 16 KiB answer: the head with the first read, then the rest.
            (&[8_000, 8_434], &[16_634]),
            (&[100, 200, 300], &[800]),
            // Parts are joined up to `COPY_MAX`; the one that passes it goes out with them.
            (&[COPY_MAX - 200, 1, COPY_MAX], &[COPY_MAX + 1, COPY_MAX]),
            (&[3 * COPY_MAX], &[3 * COPY_MAX + 200]),
        ];
        for (parts, writes) in cases {
            let frames =
                parts.iter().map(|&n| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'x'; n]))));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let mut io = Writes::default();
            write_body(&mut io, &mut vec![b'h'; 200], body, false, Vec::new()).await.unwrap();
            assert_eq!(io.0, writes, "parts {parts:?}");
        }
    }

    #[test]
    fn body_length_takes_plain_digits_up_to_the_cap() {
        for (value, want) in [
            (&b"0"[..], Some(0)),
            (b"7", Some(7)),
            (b"16384", Some(16384)),
            (b"65536", Some(BODY_MAX)),
            (b"65537", None),
            (b"999999", None),
            (b"1000000", None),
            (b"", None),
            (b"04", None),
            (b"00", None),
            (b"+4", None),
            (b"4 ", None),
            (b"4,4", None),
            (b"0x10", None),
            (b"-1", None),
        ] {
            assert_eq!(body_length(value), want, "{:?}", String::from_utf8_lossy(value));
        }
    }

    /// `is_name` agrees with `eq_ignore_ascii_case` on every token: each name this path looks
    /// for, with each of its bytes replaced by each byte a token may hold.
    #[test]
    fn is_name_is_a_case_blind_compare_on_tokens() {
        let token: Vec<u8> =
            (0u8..=127).filter(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)).collect();
        let known: &[&[u8]] = &[
            b"te",
            b"date",
            b"host",
            b"expect",
            b"upgrade",
            b"trailer",
            b"connection",
            b"keep-alive",
            b"content-length",
            b"x-forwarded-for",
            b"proxy-connection",
            b"x-forwarded-host",
            b"transfer-encoding",
            b"x-forwarded-proto",
        ];
        let mut matched = 0;
        for &name in known {
            for i in 0..name.len() {
                for &b in &token {
                    let mut variant = name.to_vec();
                    variant[i] = b;
                    assert_eq!(
                        is_name(&variant, name),
                        variant.eq_ignore_ascii_case(name),
                        "{:?}",
                        String::from_utf8_lossy(&variant)
                    );
                    matched += usize::from(is_name(&variant, name));
                }
            }
            assert!(!is_name(&name[1..], name));
        }
        assert!(matched > 0);
    }

    /// Lines are copied as they came where they end in CRLF, adjacent ones in one run, and
    /// written out again where they do not; a line left out splits the run.
    #[test]
    fn lines_pass_on_as_they_came_or_rewritten() {
        let raw = b"GET / HTTP/1.1\r\nA: 1\r\nB:2\r\nSkip: x\r\nC:  3  \r\nD: 4\nE:\r\nF: 6\r\nSkip: y\r\n\r\n";
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        let len = req.parse(raw).unwrap().unwrap();
        let mut out = b"<".to_vec();
        let mut lines = Lines::new(&raw[..len]);
        let kept: Vec<_> = req.headers.iter().filter(|f| f.name != "Skip").collect();
        // A and B adjoin: held as one run, nothing copied yet.
        lines.push(&mut out, kept[0]);
        lines.push(&mut out, kept[1]);
        assert_eq!(out, b"<");
        for f in &kept[2..] {
            lines.push(&mut out, f);
        }
        lines.flush(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "<A: 1\r\nB:2\r\nC: 3\r\nD: 4\r\nE:\r\nF: 6\r\n");
    }

    /// The fast path's one-pass head and hyper's path (the header map `lean::Head` builds)
    /// pass on the same fields and agree on framing, for heads made of every framing and
    /// hop-by-hop field in any case, also repeated, named in `Connection`, or conflicting.
    #[test]
    fn the_one_pass_head_passes_what_hyper_s_map_passes() {
        const POOL: &[&str] = &[
            "Content-Length: 5",
            "content-length: 0",
            "Content-Length: 5, 5",
            "Content-Length: x",
            "Transfer-Encoding: chunked",
            "transfer-encoding: gzip",
            "Transfer-Encoding: gzip, chunked",
            "Connection: close",
            "connection: keep-alive",
            "Connection: X-Secret",
            "Connection: close, x-later",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Upgrade: h2c",
            "Proxy-Connection: keep-alive",
            "Trailer: x-t, y-t",
            "Date: Mon, 07 Dec 2026 19:00:00 GMT",
            "X-A: 1",
            "X-Secret: s",
            "x-later: 2",
            "Empty:",
            "Spaced:   v  ",
        ];
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0;
        for case in 0..4000 {
            let status = [200, 204, 304, 404][next(4)];
            let version = ["HTTP/1.1", "HTTP/1.0"][usize::from(next(5) == 0)];
            let mut raw = format!("{version} {status} X\r\n");
            for _ in 0..next(7) {
                raw.push_str(POOL[next(POOL.len())]);
                raw.push_str("\r\n");
            }
            raw.push_str("\r\n");
            let method = if next(4) == 0 { Method::HEAD } else { Method::GET };
            let req = Request {
                len: 0,
                body: 0,
                http10: next(5) == 0,
                keep_alive: true,
                head: method == Method::HEAD,
                trailers: next(2) == 0,
                access: None,
            };
            let hyper = lean::tests::head(&raw, method);
            let fast = fast_view(&raw, &req);
            match (hyper, fast) {
                (Ok((res, f, k, _)), Ok((fast_names, ff, fk))) => {
                    assert_eq!((&f, k), (&ff, fk), "case {case}: {raw}");
                    assert_eq!(names(res.headers().iter().map(|(n, _)| n.as_str())), fast_names, "case {case}: {raw}");
                    compared += 1;
                }
                (Err(_), Err(_)) => {}
                (h, f) => panic!("case {case}: hyper's path {:?}, the fast path {:?}: {raw}", h.is_ok(), f.is_ok()),
            }
        }
        assert!(compared > 2000, "{compared}");
    }
}
