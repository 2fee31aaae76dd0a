//! A lean HTTP/1.1 exchange with the app for requests without a body (GET, HEAD, most
//! DELETE and OPTIONS requests): most of a sidecar's traffic.
//!
//! hyper's client runs each app connection as a task of its own, hands it each request
//! through a channel, and gets the response back through another, with the response body in
//! a third. Per request, that is two task wake-ups and three channel messages, and with
//! hundreds of app connections a cold channel block for each (`perf`: hyper's
//! `try_send_request` alone took 2% of the proxy's CPU under HTTP/2 load). A request without
//! a body needs none of it. The request's own task writes the head on a pooled connection,
//! reads the response head, then reads the body as the client side asks for it, and puts
//! the connection back once the body has ended. Requests with a body go through hyper,
//! because the app may answer while they still upload; so do upgrades.
//!
//! Framing follows RFC 9112 §6.3:
//! - no body for a HEAD request or a 1xx, 204 or 304 response;
//! - `Transfer-Encoding` ending in `chunked`: chunks, trailers passed on; any other
//!   `Transfer-Encoding`: the body runs to the connection's end;
//! - `Content-Length`, which must be a number (all copies equal): that many bytes;
//! - neither: the body runs to the connection's end.
//!
//! A connection goes back to the pool only after an HTTP/1.1 response framed by its length
//! or by chunks, without `Connection: close`, with nothing after it. Interim responses
//! (100, 103) are skipped, as hyper does; a 101 to a request that asked for no upgrade is an
//! error.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::Upstream;

/// The first read of an exchange asks for this much (jemalloc's largest slab-backed size
/// class is 14 KiB; above it each buffer is an extent of its own, taken under an arena lock);
/// a read that fills its buffer doubles the next, up to [`MAX_READ`] (a large body goes
/// through in few reads).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// The largest response head (or chunk-size line plus trailers) accepted.
pub const MAX_HEAD: usize = 256 * 1024;
/// Header fields parsed without a heap allocation; a head with more is parsed again with
/// room for [`MAX_HEADERS`].
const STACK_HEADERS: usize = 64;
const MAX_HEADERS: usize = 1024;
/// The longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// A connection to the app that is not in an exchange with hyper.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    read_size: usize,
    /// A write of a request failed: whatever the app answered, the connection goes no further.
    spent: bool,
}

/// How a response's body is delimited, and how far it has been read.
#[derive(Debug, PartialEq)]
pub enum Framing {
    /// No body, or all of it read.
    Done,
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// To the connection's end.
    ToEnd,
}

#[derive(Debug, PartialEq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes left in the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers(Option<HeaderMap>),
}

/// Why an exchange failed before its response head was read.
#[derive(Debug)]
pub enum ExchangeError {
    /// Not a byte of the request reached the connection: safe to send again.
    NotWritten(io::Error),
    /// The request may have reached the app.
    Failed(io::Error),
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("app response: {what}"))
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn { io, buf: BytesMut::new(), read_size: FIRST_READ, spent: false }
    }

    /// An idle connection is still fit for a request: the app has neither closed it nor sent
    /// anything since the last response. A system call only when the socket was reported
    /// readable since (tokio clears that on a short read, which ends most responses).
    pub fn is_fit(&mut self) -> bool {
        if self.spent || !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what the socket has into the buffer; 0 at the connection's end.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        let read = self.io.read_buf(&mut self.buf);
        let n = ready!(std::pin::pin!(read).poll(cx))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Sends a request head (`head`, from [`encode_head`]), reads the final response's head
    /// (interim responses skipped) and gives it to `take` parsed where it lies, in the
    /// connection's buffer; what `take` makes of it is the answer. The buffer then moves past
    /// the head, to the body. With `keep`, the head's bytes come back too, split off the buffer
    /// without a copy (a header map can share them); without, the buffer stays the
    /// connection's own, which is cheaper to read into again.
    pub async fn exchange<T>(
        &mut self,
        head: &[u8],
        keep: bool,
        take: &mut impl FnMut(ParsedHead<'_>) -> io::Result<T>,
    ) -> Result<(T, Bytes), ExchangeError> {
        let written = self.io.write(head).await.map_err(ExchangeError::NotWritten)?;
        if written == 0 {
            return Err(ExchangeError::NotWritten(io::ErrorKind::WriteZero.into()));
        }
        let (answer, len) = match self.io.write_all(&head[written..]).await {
            Ok(()) => self.read_head(take).await.map_err(ExchangeError::Failed)?,
            // The app may have answered and closed before it read the whole request (a body
            // it refuses): a whole head it sent is the answer, not a 502 (as `sock.rs` keeps
            // it for hyper's client).
            Err(e) => {
                self.spent = true;
                self.read_head(take).await.map_err(|_| ExchangeError::Failed(e))?
            }
        };
        if keep {
            return Ok((answer, self.buf.split_to(len).freeze()));
        }
        self.buf.advance(len);
        Ok((answer, Bytes::new()))
    }

    /// The final head's answer and length; the head is left at the buffer's start.
    async fn read_head<T>(&mut self, take: &mut impl FnMut(ParsedHead<'_>) -> io::Result<T>) -> io::Result<(T, usize)> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf, take)? {
                    Read::Final(answer, len) => return Ok((answer, len)),
                    // 100 Continue, 103 Early Hints: the final response follows.
                    Read::Interim(len) => {
                        self.buf.advance(len);
                        continue;
                    }
                    Read::Partial if self.buf.len() >= MAX_HEAD => return Err(invalid("head larger than 256 KiB")),
                    Read::Partial => {}
                }
            }
            if poll_fn(|cx| self.poll_read_more(cx)).await? == 0 {
                let what = if self.buf.is_empty() { "closed before responding" } else { "closed mid-head" };
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("app connection {what}")));
            }
        }
    }
}

/// A final response head as the app sent it, parsed in place: what [`Conn::exchange`] gives
/// its caller.
pub struct ParsedHead<'b> {
    pub status: StatusCode,
    pub version: Version,
    /// The reason phrase when it is not the status's usual one.
    pub reason: Option<&'b [u8]>,
    pub fields: &'b [httparse::Header<'b>],
    /// The whole head, fields' positions included.
    pub bytes: &'b [u8],
}

/// A final response head, owned: status, version and reason parsed, the header fields as
/// positions in `bytes`, for hyper's server ([`Head::into_response`]).
pub struct Head {
    res: Response<Spans>,
    bytes: Bytes,
}

impl Head {
    /// The response's status line and the positions of its fields, for [`Head::new`].
    pub fn parts(p: ParsedHead<'_>) -> Response<Spans> {
        let base = p.bytes.as_ptr() as usize;
        let span = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let spans: Spans = p.fields.iter().map(|h| (span(h.name.as_bytes()), span(h.value))).collect();
        let mut res = Response::new(spans);
        *res.status_mut() = p.status;
        *res.version_mut() = p.version;
        if let Some(Ok(r)) = p.reason.map(|r| hyper::ext::ReasonPhrase::try_from(r.to_vec())) {
            res.extensions_mut().insert(r);
        }
        res
    }

    /// The head: its [`Head::parts`] and its bytes, which the header map's values share.
    pub fn new(res: Response<Spans>, bytes: Bytes) -> Head {
        Head { res, bytes }
    }

    /// The response with a header map for hyper's server (without the hop-by-hop fields, and
    /// without a length it must not pass on), its framing, and whether the connection may
    /// carry another exchange after it.
    pub fn into_response(self, method: &Method) -> io::Result<(Response<()>, Framing, bool)> {
        let (mut res, fields) = with_headers(self.res, &self.bytes)?;
        let (framing, keep_alive, drop_length) = framing(method == Method::HEAD, res.version(), res.status(), &fields)?;
        if drop_length {
            res.headers_mut().remove(header::CONTENT_LENGTH);
        }
        Ok((res, framing, keep_alive))
    }
}

/// Where each parsed header's name and value lie in the head.
pub type Spans = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// What [`parse_head`] found at the start of a buffer.
enum Read<T> {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    /// The final response's head, of this many bytes, as `take` took it.
    Final(T, usize),
}

/// The response head at the start of `buf`, given to `take` once it is complete and final.
fn parse_head<T>(buf: &[u8], take: &mut impl FnMut(ParsedHead<'_>) -> io::Result<T>) -> io::Result<Read<T>> {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    match parse_into(buf, &mut stack, take) {
        Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
            let mut heap = Vec::with_capacity(MAX_HEADERS);
            heap.resize_with(MAX_HEADERS, MaybeUninit::uninit);
            parse_into(buf, &mut heap, take)
        }
        r => r,
    }
}

fn parse_into<'b, T>(
    buf: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
    take: &mut impl FnMut(ParsedHead<'_>) -> io::Result<T>,
) -> io::Result<Read<T>> {
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Read::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "app response: too many header fields"))
        }
        Err(e) => return Err(invalid(&e.to_string())),
    };
    if len > MAX_HEAD {
        return Err(invalid("head larger than 256 KiB"));
    }
    let status = res.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or_else(|| invalid("bad status code"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid("101 Switching Protocols to a request without an upgrade"));
        }
        return Ok(Read::Interim(len));
    }
    let parsed = ParsedHead {
        status,
        version: if res.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 },
        reason: res.reason.filter(|r| Some(*r) != status.canonical_reason()).map(str::as_bytes),
        fields: res.headers,
        bytes: &buf[..len],
    };
    Ok(Read::Final(take(parsed)?, len))
}

/// What a response's header fields say about its framing, noted as they are passed on.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    /// `Transfer-Encoding` is present; whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// `Content-Length`, all its values equal.
    length: Option<u64>,
    /// A `Content-Length` value is not a number, or differs from another.
    bad_length: bool,
    /// `Connection: close`.
    close: bool,
    /// A `Connection` value other than `close` and `keep-alive`: it names fields to remove.
    pub connection_names: bool,
}

impl Fields {
    /// Notes a field by its parsed name, which compares as an enum; whether the field is
    /// hop-by-hop.
    fn note_name(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        if name == header::CONTENT_LENGTH {
            self.content_length(value);
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding(value);
        } else if name == header::CONNECTION {
            self.connection(value);
        } else {
            return crate::proxy::is_hop_by_hop(name);
        }
        name != header::CONTENT_LENGTH
    }

    pub fn content_length(&mut self, value: &[u8]) {
        for n in tokens(value).map(parse_decimal) {
            self.bad_length |= n.is_none() || (self.length.is_some() && self.length != n);
            self.length = n;
        }
    }

    pub fn transfer_encoding(&mut self, value: &[u8]) {
        self.chunked = Some(tokens(value).next_back().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
    }

    pub fn connection(&mut self, value: &[u8]) {
        // What most apps send, without splitting it.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            return;
        }
        for t in tokens(value) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if !t.eq_ignore_ascii_case(b"keep-alive") && !t.is_empty() {
                self.connection_names = true;
            }
        }
    }
}

/// The comma-separated tokens of a field value, trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// The response with its header fields, values shared with `head` (no copy), and what they say
/// about its framing. The hop-by-hop fields (RFC 9110 §7.6.1) are left out of the map: no
/// client is sent them, and leaving them out costs a comparison where removing them costs a
/// scan of the map and a lookup each.
fn with_headers(res: Response<Spans>, head: &Bytes) -> io::Result<(Response<()>, Fields)> {
    let (mut parts, spans) = res.into_parts();
    let mut map = HeaderMap::with_capacity(spans.len());
    let mut fields = Fields::default();
    for (name, value) in &spans {
        let name = HeaderName::from_bytes(&head[name.clone()]).map_err(|_| invalid("bad header name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value.clone())).map_err(|_| invalid("bad header value"))?;
        if !fields.note_name(&name, value.as_bytes()) {
            map.append(name, value);
        }
    }
    if fields.connection_names {
        // `Connection` names other fields, which are hop-by-hop too (rare): the whole map,
        // stripped as hyper's client's answers are.
        map.clear();
        for (name, value) in spans {
            // Each name and value was checked in the loop above.
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(&head[name]), HeaderValue::from_maybe_shared(head.slice(value)))
            {
                map.append(name, value);
            }
        }
        crate::proxy::strip_hop_by_hop(&mut map);
    }
    parts.headers = map;
    Ok((Response::from_parts(parts, ()), fields))
}

/// How the body of a response with this `version`, `status` and header `fields`, an answer to
/// a HEAD request or not, is delimited; whether the connection can carry another exchange
/// after it; and whether its `Content-Length` must be dropped.
pub(crate) fn framing(
    head_request: bool,
    version: Version,
    status: StatusCode,
    fields: &Fields,
) -> io::Result<(Framing, bool, bool)> {
    let length = fields.length.is_some() || fields.bad_length;
    // Both framings at once is how requests are smuggled: the chunks win, and the connection is
    // not used again.
    let both = length && fields.chunked.is_some();
    let keep_alive = version == Version::HTTP_11 && !fields.close && !both;
    let drop_length = length && length_dropped(status, fields.chunked.is_some());
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, keep_alive, drop_length));
    }
    if let Some(chunked) = fields.chunked {
        return Ok(if chunked {
            (Framing::Chunked(Chunk::Size), keep_alive, drop_length)
        } else {
            (Framing::ToEnd, false, drop_length)
        });
    }
    if fields.bad_length {
        return Err(invalid("bad or conflicting Content-Length"));
    }
    Ok(match fields.length {
        Some(0) => (Framing::Done, keep_alive, false),
        Some(n) => (Framing::Length(n), keep_alive, false),
        None => (Framing::ToEnd, false, false),
    })
}

/// Whether an answer's `Content-Length` must not be passed on, whichever client fetched it:
/// beside `Transfer-Encoding`, which overrides it (RFC 9112 §6.3: an intermediary removes it,
/// with a body or not); on a 204, which must not carry one (RFC 9110 §8.6); on a 304, from
/// which hyper's server drops it too, and the fast path answers as hyper does.
pub fn length_dropped(status: StatusCode, transfer_encoding: bool) -> bool {
    transfer_encoding || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The HTTP/1.1 head of `req`, whose body is empty, as hyper's client writes it: the header
/// fields as they are (the proxy has already rewritten them), no framing added.
pub fn encode_head<B>(req: &Request<B>) -> Vec<u8> {
    use std::io::Write;
    let h = req.headers();
    let mut out = Vec::with_capacity(64 + h.len() * 32);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let uri = req.uri();
    match uri.path_and_query() {
        // Origin form (the proxy's rewrite makes it so): what `Display` would write, without it.
        Some(pq) if uri.scheme().is_none() && uri.authority().is_none() => {
            out.extend_from_slice(pq.as_str().as_bytes())
        }
        _ => {
            let _ = write!(out, "{uri}");
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in h {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A response body read from its app connection as it is asked for; the connection goes back
/// to the pool when the body has ended.
pub struct LeanBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    upstream: Arc<Upstream>,
}

impl LeanBody {
    pub fn new(conn: Conn, framing: Framing, keep_alive: bool, upstream: Arc<Upstream>) -> LeanBody {
        let mut body = LeanBody { conn: Some(conn), framing, keep_alive, upstream };
        body.release_if_done();
        body
    }

    /// Once the body has ended: the connection back to the pool if it may carry another
    /// exchange, else closed.
    fn release_if_done(&mut self) {
        if self.framing != Framing::Done {
            return;
        }
        if let Some(mut conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                // An idle connection holds no buffer (the pool may keep hundreds).
                conn.buf = BytesMut::new();
                conn.read_size = FIRST_READ;
                self.upstream.checkin_lean(conn);
            }
        }
    }
}

impl Framing {
    /// The next frame from what is buffered: `None` when more must be read first.
    fn next(&mut self, conn_buf: &mut BytesMut) -> io::Result<Option<Frame<Bytes>>> {
        loop {
            match self {
                Framing::Done => return Ok(None),
                Framing::Length(left) => {
                    let data = take_up_to(left, conn_buf);
                    if *left == 0 {
                        *self = Framing::Done;
                    }
                    return Ok(data);
                }
                Framing::ToEnd => {
                    if conn_buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(conn_buf.split().freeze())));
                }
                Framing::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(end) = conn_buf.iter().position(|&b| b == b'\n') else {
                            if conn_buf.len() > MAX_CHUNK_LINE {
                                return Err(invalid("chunk-size line too long"));
                            }
                            return Ok(None);
                        };
                        let size = parse_chunk_size(&conn_buf[..end])?;
                        conn_buf.advance(end + 1);
                        *chunk = if size == 0 { Chunk::Trailers(None) } else { Chunk::Data(size) };
                    }
                    Chunk::Data(left) => {
                        let data = take_up_to(left, conn_buf);
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Ok(data);
                    }
                    Chunk::DataEnd => match conn_buf.first() {
                        None => return Ok(None),
                        Some(b'\n') => {
                            conn_buf.advance(1);
                            *chunk = Chunk::Size;
                        }
                        Some(b'\r') if conn_buf.len() < 2 => return Ok(None),
                        Some(b'\r') if conn_buf[1] == b'\n' => {
                            conn_buf.advance(2);
                            *chunk = Chunk::Size;
                        }
                        Some(_) => return Err(invalid("chunk data longer than its size")),
                    },
                    Chunk::Trailers(fields) => {
                        let Some(end) = conn_buf.iter().position(|&b| b == b'\n') else {
                            if conn_buf.len() > MAX_HEAD {
                                return Err(invalid("trailers larger than 256 KiB"));
                            }
                            return Ok(None);
                        };
                        let line = conn_buf.split_to(end + 1);
                        let line = line.strip_suffix(b"\n").unwrap_or(&line);
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        if line.is_empty() {
                            let fields = fields.take();
                            *self = Framing::Done;
                            return Ok(fields.map(Frame::trailers));
                        }
                        let (name, value) = parse_field(line)?;
                        fields.get_or_insert_with(HeaderMap::new).append(name, value);
                    }
                },
            }
        }
    }
}

/// A data frame of what is buffered, at most `left` bytes, counted off `left`; `None` when
/// nothing is buffered.
fn take_up_to(left: &mut u64, buf: &mut BytesMut) -> Option<Frame<Bytes>> {
    if buf.is_empty() {
        return None;
    }
    let take = (*left).min(buf.len() as u64) as usize;
    *left -= take as u64;
    Some(Frame::data(buf.split_to(take).freeze()))
}

fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid("bad chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))))
}

fn parse_field(line: &[u8]) -> io::Result<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':').ok_or_else(|| invalid("bad trailer field"))?;
    let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| invalid("bad trailer name"))?;
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).map_err(|_| invalid("bad trailer value"))?;
    Ok((name, value))
}

impl Body for LeanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            let next = this.framing.next(&mut conn.buf);
            match next {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(frame) if this.framing == Framing::Done => {
                    this.release_if_done();
                    return Poll::Ready(frame.map(Ok));
                }
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
            }
            let conn = this.conn.as_mut().expect("kept above");
            let n = match ready!(conn.poll_read_more(cx)) {
                Ok(n) => n,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            if n == 0 {
                this.conn = None;
                if this.framing == Framing::ToEnd {
                    this.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "app connection closed mid-body",
                ))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for LeanBody {
    fn drop(&mut self) {
        // hyper drops a body it knows is empty without polling it; one dropped part-way leaves
        // its connection mid-response, and it is closed.
        self.release_if_done();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The head at the start of `raw`, as hyper's server is given it, and its length.
    pub(crate) fn head(raw: &str, method: Method) -> io::Result<(Response<()>, Framing, bool, usize)> {
        let Read::Final(res, len) = parse_head(raw.as_bytes(), &mut |p| Ok(Head::parts(p)))? else {
            panic!("not a complete final head: {raw}")
        };
        let head = Head::new(res, Bytes::copy_from_slice(&raw.as_bytes()[..len]));
        let (res, f, k) = head.into_response(&method)?;
        Ok((res, f, k, len))
    }

    /// What `take` makes of the final head at the start of `buf`; `None` if there is none.
    pub(crate) fn parse_final<T>(
        buf: &[u8],
        take: &mut impl FnMut(ParsedHead<'_>) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        Ok(match parse_head(buf, take)? {
            Read::Final(t, _) => Some(t),
            _ => None,
        })
    }

    #[test]
    fn hop_by_hop_fields_stay_out_of_the_map_and_still_frame() {
        let names = |raw: &str| {
            let (res, f, k, _) = head(raw, Method::GET).unwrap();
            let mut names: Vec<_> = res.headers().keys().map(|n| n.as_str().to_owned()).collect();
            names.sort();
            (names, f, k)
        };
        assert_eq!(
            names("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nProxy-Connection: x\r\nTE: trailers\r\nUpgrade: y\r\n\r\n"),
            (vec!["x-a".to_owned()], Framing::Chunked(Chunk::Size), true)
        );
        // A field named in `Connection` goes too, before or after it, and `close` is heeded.
        assert_eq!(
            names("HTTP/1.1 200 OK\r\nX-Secret: 1\r\nConnection: close, X-Secret, x-later\r\nX-A: 1\r\nContent-Length: 2\r\nx-later: 2\r\n\r\n"),
            (vec!["content-length".to_owned(), "x-a".to_owned()], Framing::Length(2), false)
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |raw: &str| head(raw, Method::GET).map(|(_, f, k, _)| (f, k));
        assert_eq!(f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n").unwrap(), (Framing::Length(5), true));
        assert_eq!(f("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n").unwrap(), (Framing::Length(5), true));
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n").is_err());
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n").is_err());
        assert_eq!(f("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap(), (Framing::Done, true));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n").unwrap(),
            (Framing::Chunked(Chunk::Size), true)
        );
        // Both framings: chunks win, the length goes, and the connection is not used again.
        let (res, framing, keep_alive, _) =
            head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", Method::GET).unwrap();
        assert_eq!((framing, keep_alive), (Framing::Chunked(Chunk::Size), false));
        assert!(!res.headers().contains_key("content-length"));
        assert_eq!(f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n").unwrap(), (Framing::ToEnd, false));
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n").unwrap(), (Framing::ToEnd, false));
        assert_eq!(f("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n").unwrap(), (Framing::Done, true));
        // No length goes on with a 204 or a 304, as hyper's server sends neither; HEAD keeps it.
        for raw in [
            "HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
        ] {
            assert!(!head(raw, Method::GET).unwrap().0.headers().contains_key("content-length"), "{raw}");
        }
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n";
        assert!(head(ok, Method::HEAD).unwrap().0.headers().contains_key("content-length"));
        assert_eq!(f("HTTP/1.1 304 Not Modified\r\n\r\n").unwrap(), (Framing::Done, true));
        assert!(!f("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n").unwrap().1);
        assert!(!f("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").unwrap().1);
        let (_, framing_head, _, _) = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", Method::HEAD).unwrap();
        assert_eq!(framing_head, Framing::Done);
        // So too without a body: the length a HEAD or 304 answer carries beside chunks goes.
        let both = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n";
        let (res, framing_head, keep_alive, _) = head(both, Method::HEAD).unwrap();
        assert_eq!((framing_head, keep_alive), (Framing::Done, false));
        assert!(!res.headers().contains_key("content-length"));
        let both = "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(f(both).unwrap(), (Framing::Done, false));
    }

    #[test]
    fn heads_keep_their_fields_reason_and_length() {
        let raw = "HTTP/1.1 404 Gone Fishing\r\nx-a: 1\r\nX-A: 2\r\nset-cookie: s=1\r\n\r\nrest";
        let (res, _, _, len) = head(raw, Method::GET).unwrap();
        assert_eq!(len, raw.len() - 4);
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers().get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(res.extensions().get::<hyper::ext::ReasonPhrase>().unwrap().as_bytes(), b"Gone Fishing");
        assert!(parse_final(b"HTTP/1.1 200 OK\r\nx-a: 1\r\n", &mut |_| Ok(())).unwrap().is_none());
        assert!(parse_final(b"HTTP/1.1 2000 OK\r\n\r\n", &mut |_| Ok(())).is_err());
        // An interim head is skipped whole, without being taken.
        let interim = b"HTTP/1.1 100 Continue\r\nx-a: 1\r\n\r\nHTTP/1.1 200 OK\r\n";
        let read = parse_head(interim, &mut |_| -> io::Result<()> { panic!("an interim head was taken") });
        assert!(matches!(read, Ok(Read::Interim(n)) if n == interim.len() - 17));
        let many: String = (0..300).map(|i| format!("x-{i}: {i}\r\n")).collect();
        let (res, _, _, _) = head(&format!("HTTP/1.1 200 OK\r\n{many}content-length: 0\r\n\r\n"), Method::GET).unwrap();
        assert_eq!(res.headers().len(), 301);
    }

    fn decode(mut framing: Framing, wire: &[u8]) -> (io::Result<Vec<Frame<Bytes>>>, Framing, usize) {
        // Fed one byte at a time: every state must wait for more at every split.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for &b in wire {
            buf.extend_from_slice(&[b]);
            loop {
                match framing.next(&mut buf) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (Err(e), framing, buf.len()),
                }
            }
        }
        (Ok(frames), framing, buf.len())
    }

    fn data(frames: &[Frame<Bytes>]) -> Vec<u8> {
        frames.iter().filter_map(|f| f.data_ref()).flat_map(|d| d.to_vec()).collect()
    }

    #[test]
    fn chunks_are_decoded_at_any_split_with_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 42\r\nx-b:  two \r\n\r\n";
        let (frames, framing, left) = decode(Framing::Chunked(Chunk::Size), wire);
        let frames = frames.unwrap();
        assert_eq!(data(&frames), b"helloabcdefghijklmnopqrstuvwxyz");
        let trailers = frames.last().and_then(|f| f.trailers_ref()).expect("trailers");
        assert_eq!(trailers["x-sum"], "42");
        assert_eq!(trailers["x-b"], "two");
        assert_eq!((framing, left), (Framing::Done, 0));
        // Bare LF line ends, no trailers.
        let (frames, framing, _) = decode(Framing::Chunked(Chunk::Size), b"3\nabc\n0\n\n");
        assert_eq!(data(&frames.unwrap()), b"abc");
        assert_eq!(framing, Framing::Done);
    }

    #[test]
    fn bad_chunks_are_errors() {
        for wire in [&b"z\r\n"[..], b"5\r\nhelloX\r\n", b"10000000000000000\r\n", b"5 x\r\nhello\r\n"] {
            assert!(decode(Framing::Chunked(Chunk::Size), wire).0.is_err(), "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn a_length_ends_exactly_and_leaves_what_follows() {
        let (frames, framing, left) = decode(Framing::Length(3), b"abcHTTP");
        assert_eq!(data(&frames.unwrap()), b"abc");
        assert_eq!((framing, left), (Framing::Done, 4));
    }

    #[test]
    fn a_request_head_is_written_as_hyper_writes_it() {
        let req = Request::builder()
            .method(Method::DELETE)
            .uri("/a?b=1")
            .header("host", "app")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        assert_eq!(
            String::from_utf8(encode_head(&req)).unwrap(),
            "DELETE /a?b=1 HTTP/1.1\r\nhost: app\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
        for uri in ["*", "http://app:8080/p?q", "/"] {
            let req = Request::builder().method(Method::OPTIONS).uri(uri).body(()).unwrap();
            let head = String::from_utf8(encode_head(&req)).unwrap();
            assert_eq!(head, format!("OPTIONS {} HTTP/1.1\r\n\r\n", req.uri()), "{uri}");
        }
    }
}
