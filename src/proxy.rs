//! The request path: one service per client connection that forwards to the app, rewrites
//! hop-by-hop and forwarding headers, tunnels upgrades, and applies the drain's per-request
//! rules (`Connection: close` on HTTP/1.1 from t=0; retry hints once released).
//!
//! Nothing here decides phases: it reads the published state and reports to `Accounting`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::body::{AccessInfo, Accounting, ConnState, RequestBody, RequestGuard, ResponseBody, SharedBody};
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::fast::{write_field, write_forwarded_for};
use crate::lean;
use crate::lifecycle::{Phase, State};
use crate::metrics::CloseHow;
use crate::upstream::{AppBody, Pooled, Upstream};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What every connection's service shares.
pub struct Proxy {
    pub acct: Arc<Accounting>,
    pub state: watch::Receiver<State>,
    pub upstream: Arc<Upstream>,
    retry_after: HeaderValue,
    pub(crate) access_log: bool,
    /// `Host` for requests that arrive without one (HTTP/1.0): the app's address.
    fallback_host: HeaderValue,
}

impl Proxy {
    pub fn new(
        acct: Arc<Accounting>,
        state: watch::Receiver<State>,
        upstream: Arc<Upstream>,
        retry_after: std::time::Duration,
        access_log: bool,
    ) -> Self {
        let fallback_host =
            HeaderValue::from_str(&upstream.addr().to_string()).unwrap_or(HeaderValue::from_static("localhost"));
        let retry_after = HeaderValue::from(retry_after.as_secs().max(1));
        Proxy { acct, state, upstream, retry_after, access_log, fallback_host }
    }
}

/// The service for one client connection.
#[derive(Clone)]
pub struct ProxyService {
    pub(crate) proxy: Arc<Proxy>,
    conn: Arc<ConnState>,
    pub(crate) peer: SocketAddr,
    pub(crate) peer_ip: HeaderValue,
    /// The client speaks HTTP/2 (GOAWAY, not `Connection: close`, tells it to leave).
    h2: bool,
    /// The proxy terminated TLS: `X-Forwarded-Proto: https`.
    pub(crate) tls: bool,
}

impl ProxyService {
    pub fn new(proxy: Arc<Proxy>, conn: Arc<ConnState>, peer: SocketAddr, h2: bool, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ProxyService { proxy, conn, peer, peer_ip, h2, tls }
    }

    async fn handle(self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        let mut req = req.map(|b| RequestBody::new(b, if self.h2 { None } else { Some(&self.conn) }));
        let start = Instant::now();
        let p = &*self.proxy;
        let phase = p.state.borrow().phase;
        let mut guard = RequestGuard::start(p.acct.clone(), self.conn.clone(), phase, start);
        if phase.is_draining() {
            p.acct.metrics.drain_requests.inc();
        }
        if p.access_log {
            let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_string();
            guard.set_access(AccessInfo { method: req.method().clone(), path, peer: self.peer });
        }
        let seen = Seen::scan(req.headers());
        let upgrade = !self.h2 && seen.is_upgrade_request(req.headers());
        let client_upgrade = if upgrade { Some(hyper::upgrade::on(&mut req)) } else { None };

        // An HTTP/2 body still streaming: the response ends only after it (`SharedBody`).
        let request_body = req.body().shared();
        let result = if phase == Phase::Drained {
            // Released: the app may be stopping now. Not forwarding is the safe answer.
            Err(ProxyError::Released)
        } else if req.method() == Method::CONNECT {
            Err(ProxyError::ConnectMethod)
        } else if !self.h2 && seen.bad_host(&req) {
            Err(ProxyError::BadHost)
        } else if let Some(head) = self.lean_head(&req, &seen) {
            p.upstream.send_head(&head, req.method(), start).await
        } else {
            self.prepare(&mut req, upgrade, seen);
            if upgrade {
                // Boxed: rare, and its connect would make every request's future larger.
                Box::pin(p.upstream.send_upgrade(req)).await.map(|r| (r.map(AppBody::Hyper), None))
            } else {
                p.upstream.send(req).await
            }
        };

        let mut res = match result {
            Ok((res, _)) if upgrade && res.status() == StatusCode::SWITCHING_PROTOCOLS => {
                return Ok(self.start_tunnel(res, client_upgrade, guard));
            }
            Ok((res, pooled)) => into_client_response(res, pooled, request_body),
            Err(error) => self.failed(error),
        };
        // From t=0 every HTTP/1.1 response tells its connection to leave (DESIGN §4.2).
        // Read again now: a request that started before the drain may end after it.
        if !self.h2
            && p.state.borrow().phase.is_draining()
            && res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close")).is_none()
        {
            p.acct.metrics.connection_closed(CloseHow::ConnectionClose);
        }
        guard.set_status(res.status().as_u16());
        Ok(res.map(|b| b.with_guard(guard)))
    }

    /// Counts and logs a request that was not answered by the app, and builds its answer.
    pub(crate) fn failed(&self, error: ProxyError) -> Response<ResponseBody> {
        let p = &*self.proxy;
        if let Some(kind) = error.upstream_kind() {
            p.acct.metrics.upstream_error(kind);
        }
        if let Some(reason) = error.retry_reason() {
            p.acct.metrics.retry_hint(reason);
        }
        match &error {
            ProxyError::Released => {
                debug!(peer = %self.peer, "request after release answered with a retry hint")
            }
            ProxyError::ConnectMethod => debug!(peer = %self.peer, "CONNECT refused"),
            ProxyError::BadHost => debug!(peer = %self.peer, "request without exactly one Host refused"),
            _ => {
                warn!(error = %error, cause = ?std::error::Error::source(&error).map(|s| s.to_string()), peer = %self.peer, status = error.status().as_u16(), "upstream request failed")
            }
        }
        error.to_response(&p.retry_after)
    }

    /// An HTTP/2 client's request without a body, for an HTTP/1.1 app, as the head of a lean
    /// exchange: written straight from the request as [`Self::prepare`] and
    /// [`lean::encode_head`] would make it, without changing the header map (where each field
    /// set costs a hash, and the first over the map's capacity a rehash). `None` for every
    /// other request, and for the rare one whose `Connection` names fields (HTTP/2 forbids
    /// it): those take `prepare`.
    fn lean_head<B: http_body::Body>(&self, req: &Request<B>, seen: &Seen) -> Option<Vec<u8>> {
        if !self.h2
            || seen.connection_names
            || !req.body().is_end_stream()
            || req.uri().scheme().is_none()
            || self.proxy.upstream.protocol() != UpstreamProtocol::Http1
        {
            return None;
        }
        let h = req.headers();
        // The target's authority wins over `Host`, as in `prepare`.
        let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
        let client_host = authority.or_else(|| seen.host.as_ref().map(HeaderValue::as_bytes));
        let set_host = authority.is_some() || !seen.has(Seen::HOST);
        let mut out = Vec::with_capacity(160 + h.len() * 32);
        out.extend_from_slice(req.method().as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(req.uri().path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if set_host {
            write_field(&mut out, b"host", client_host.unwrap_or(self.proxy.fallback_host.as_bytes()));
        }
        let mut cookies_written = false;
        for (name, value) in h {
            let bit = Seen::bit(name);
            if bit & (Seen::HOP_BY_HOP | Seen::X_FORWARDED_FOR) != 0 || (bit == Seen::HOST && set_host) {
                continue;
            }
            if bit == Seen::COOKIE && seen.cookie_repeated {
                // RFC 9113 §8.2.3: one `Cookie` for HTTP/1.1, as `prepare` joins it.
                if !cookies_written {
                    cookies_written = true;
                    write_field(&mut out, b"cookie", &joined(h.get_all(header::COOKIE), b"; "));
                }
                continue;
            }
            write_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        let client_xff = seen.has(Seen::X_FORWARDED_FOR).then(|| h.get_all(&X_FORWARDED_FOR));
        write_forwarded_for(
            &mut out,
            client_xff.into_iter().flatten().map(HeaderValue::as_bytes),
            self.peer_ip.as_bytes(),
        );
        if !seen.has(Seen::X_FORWARDED_PROTO) {
            write_field(&mut out, b"x-forwarded-proto", if self.tls { b"https" } else { b"http" });
        }
        if let (Some(host), false) = (client_host, seen.has(Seen::X_FORWARDED_HOST)) {
            write_field(&mut out, b"x-forwarded-host", host);
        }
        out.extend_from_slice(b"\r\n");
        Some(out)
    }

    /// Rewrites the request for the app: hop-by-hop headers out, forwarding headers in,
    /// the URI in the form the app's protocol wants. `seen`: what [`Seen::scan`] found in the
    /// request's headers.
    fn prepare<B>(&self, req: &mut Request<B>, upgrade: bool, seen: Seen) {
        let h2_upstream = self.proxy.upstream.protocol() == UpstreamProtocol::H2c && !upgrade;
        // The host the client named. The target's authority (HTTP/2's `:authority`, or an
        // HTTP/1.1 absolute-form target) wins over `Host` (RFC 9112 §3.2.2, RFC 9113 §8.3.1);
        // HTTP/1.0 may name neither.
        let authority = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let replace_host = authority.is_some() && seen.has(Seen::HOST);
        let client_host = authority.or_else(|| seen.host.clone());
        let headers = req.headers_mut();
        let wants_trailers = h2_upstream && seen.has(Seen::TE) && has_token(headers, &header::TE, "trailers");
        let upgrade_proto = if upgrade { headers.get(header::UPGRADE).cloned() } else { None };
        let seen = seen.strip_hop_by_hop(headers);
        if let Some(proto) = upgrade_proto {
            headers.insert(header::UPGRADE, proto);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if wants_trailers {
            // gRPC servers require `te: trailers`; it is the one TE value HTTP/2 allows.
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if self.h2 && !h2_upstream && seen.cookie_repeated {
            // RFC 9113 §8.2.3: one `Cookie` for HTTP/1.1; many apps read only the first.
            let cookies = joined(headers.get_all(header::COOKIE), b"; ");
            if let Ok(v) = HeaderValue::from_bytes(&cookies) {
                headers.insert(header::COOKIE, v);
            }
        }
        append(headers, &X_FORWARDED_FOR, &self.peer_ip, seen.has(Seen::X_FORWARDED_FOR));
        // Scheme and host as the client's side saw them: a front end that set them (an ingress
        // that terminated TLS) knows better than this hop inside the pod, and a list such as
        // `https, http` makes Tomcat's RemoteIpValve (Spring Boot) call the request insecure.
        if !seen.has(Seen::X_FORWARDED_PROTO) {
            headers.append(&X_FORWARDED_PROTO, HeaderValue::from_static(if self.tls { "https" } else { "http" }));
        }
        if let (Some(host), false) = (&client_host, seen.has(Seen::X_FORWARDED_HOST)) {
            headers.append(&X_FORWARDED_HOST, host.clone());
        }
        let host = client_host.unwrap_or_else(|| self.proxy.fallback_host.clone());

        if h2_upstream {
            // HTTP/2 carries the host as :authority; the app sees the client's host.
            if seen.has(Seen::HOST) {
                headers.remove(header::HOST);
            }
            let mut uri = std::mem::take(req.uri_mut()).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Authority::try_from(host.as_bytes())
                .ok()
                .or_else(|| Authority::try_from(self.proxy.fallback_host.as_bytes()).ok());
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
            *req.version_mut() = Version::HTTP_2;
        } else {
            if !seen.has(Seen::HOST) || replace_host {
                headers.insert(header::HOST, host);
            }
            if req.uri().scheme().is_some() {
                // Origin-form for the app, whatever form the client used.
                let pq = req.uri().path_and_query().cloned().unwrap_or(PathAndQuery::from_static("/"));
                *req.uri_mut() = Uri::from(pq);
            }
            *req.version_mut() = Version::HTTP_11;
        }
    }

    fn start_tunnel(
        &self,
        mut res: Response<AppBody>,
        client: Option<OnUpgrade>,
        mut guard: RequestGuard,
    ) -> Response<ResponseBody> {
        let upstream = hyper::upgrade::on(&mut res);
        let proto = res.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(res.headers_mut());
        if let Some(proto) = proto {
            res.headers_mut().insert(header::UPGRADE, proto);
        }
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        guard.set_status(101);
        self.conn.set_upgraded();
        let mut state = self.proxy.state.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            let Some(client) = client else { return };
            let (client, app) = match tokio::try_join!(client, upstream) {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, %peer, "upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut app) => {
                    if let Err(error) = r {
                        debug!(%error, %peer, "upgraded connection ended with an error");
                    }
                }
                _ = state.wait_for(|s| s.force_close) => {
                    info!(%peer, "closing an upgraded connection still open at max_duration");
                }
            }
            // The guard ends the request's in-flight span only when the tunnel closes.
            drop(guard);
        });
        res.map(|_| ResponseBody::empty())
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().handle(req))
    }
}

fn into_client_response(
    res: Response<AppBody>,
    pooled: Option<Pooled>,
    request_body: Option<Arc<SharedBody>>,
) -> Response<ResponseBody> {
    let (mut parts, body) = res.into_parts();
    // A lean answer comes without a length it must not pass on, and without hop-by-hop fields
    // (`Head::into_response`). hyper's client leaves both in the map: the length beside the
    // chunks it decodes.
    if let AppBody::Hyper(_) = body {
        if lean::length_dropped(parts.status, parts.headers.contains_key(header::TRANSFER_ENCODING)) {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut parts.headers);
    }
    // An intermediary sends its own version (RFC 9110 §6.2): an HTTP/1.0 app's answer must
    // not make hyper treat the client's keep-alive as HTTP/1.0 and close it after each one.
    parts.version = Version::HTTP_11;
    let status = parts.status;
    Response::from_parts(parts, ResponseBody::upstream(body, pooled, request_body, status))
}

/// The headers a proxy acts on, found in one pass over a header map: one comparison per
/// header present, where asking the map about each name would hash every name asked about.
#[derive(Default)]
struct Seen {
    bits: u16,
    /// The first `Host` value.
    host: Option<HeaderValue>,
    /// `Host` came more than once.
    host_repeated: bool,
    /// `Cookie` came more than once (HTTP/2 clients send each cookie as a field of its own).
    cookie_repeated: bool,
    /// A `Connection` value is other than the usual `keep-alive` or `close`: it may name
    /// headers to remove.
    connection_names: bool,
}

impl Seen {
    const CONNECTION: u16 = 1;
    const KEEP_ALIVE: u16 = 1 << 1;
    const PROXY_CONNECTION: u16 = 1 << 2;
    const TE: u16 = 1 << 3;
    const TRANSFER_ENCODING: u16 = 1 << 4;
    const UPGRADE: u16 = 1 << 5;
    const HOP_BY_HOP: u16 = (1 << 6) - 1;
    const HOST: u16 = 1 << 6;
    const X_FORWARDED_FOR: u16 = 1 << 7;
    const X_FORWARDED_PROTO: u16 = 1 << 8;
    const X_FORWARDED_HOST: u16 = 1 << 9;
    const COOKIE: u16 = 1 << 10;

    fn scan(h: &HeaderMap) -> Seen {
        let mut seen = Seen::default();
        for (name, value) in h {
            let bit = Self::bit(name);
            if bit == Self::HOST {
                match seen.host {
                    None => seen.host = Some(value.clone()),
                    Some(_) => seen.host_repeated = true,
                }
            } else if bit == Self::COOKIE {
                seen.cookie_repeated |= seen.has(Self::COOKIE);
            } else if bit == Self::CONNECTION {
                let v = value.as_bytes();
                seen.connection_names |= !v.eq_ignore_ascii_case(b"keep-alive") && !v.eq_ignore_ascii_case(b"close");
            }
            seen.bits |= bit;
        }
        seen
    }

    fn bit(name: &HeaderName) -> u16 {
        // Standard names compare as enum values, custom ones as bytes.
        if name == header::HOST {
            Self::HOST
        } else if name == header::CONNECTION {
            Self::CONNECTION
        } else if name == header::COOKIE {
            Self::COOKIE
        } else if name == header::TE {
            Self::TE
        } else if name == header::TRANSFER_ENCODING {
            Self::TRANSFER_ENCODING
        } else if name == header::UPGRADE {
            Self::UPGRADE
        } else if name == KEEP_ALIVE {
            Self::KEEP_ALIVE
        } else if name == PROXY_CONNECTION {
            Self::PROXY_CONNECTION
        } else if name == X_FORWARDED_FOR {
            Self::X_FORWARDED_FOR
        } else if name == X_FORWARDED_PROTO {
            Self::X_FORWARDED_PROTO
        } else if name == X_FORWARDED_HOST {
            Self::X_FORWARDED_HOST
        } else {
            0
        }
    }

    fn has(&self, bit: u16) -> bool {
        self.bits & bit != 0
    }

    /// An HTTP/1.x request's host is not the one field RFC 9112 §3.2 asks for: `Host` twice,
    /// or an HTTP/1.1 request with neither `Host` nor an absolute-form target.
    fn bad_host<B>(&self, req: &Request<B>) -> bool {
        self.host_repeated
            || (self.host.is_none() && req.version() == Version::HTTP_11 && req.uri().authority().is_none())
    }

    /// An upgrade to tunnel to the app: `Upgrade` named in `Connection`, to a protocol other
    /// than `h2c`. The HTTP/1.1 upgrade to cleartext HTTP/2 (RFC 9113 §3.1 deprecated it) is
    /// ignored, as a server without it must: its headers are hop-by-hop and the request goes on
    /// as HTTP/1.1. Tunnelled, an app that accepts it (Tomcat, Jetty, Go's h2c handler, with
    /// Java's HttpClient sending it by default) would speak HTTP/2 to the client past the
    /// proxy: no GOAWAY at a drain, no request count, and a tunnel held open until
    /// `max_duration`. Clients that want HTTP/2 get it with prior knowledge.
    fn is_upgrade_request(&self, h: &HeaderMap) -> bool {
        self.has(Self::UPGRADE)
            && self.has(Self::CONNECTION)
            && has_token(h, &header::CONNECTION, "upgrade")
            && h.get_all(header::UPGRADE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|p| !p.trim().eq_ignore_ascii_case("h2c"))
    }

    /// Removes the hop-by-hop headers of RFC 9110 §7.6.1 from `h` (the map this was scanned
    /// from), including every header named in `Connection`; returns what is left.
    fn strip_hop_by_hop(self, h: &mut HeaderMap) -> Seen {
        if self.bits & Self::HOP_BY_HOP == 0 {
            return self;
        }
        let mut named_removed = false;
        if self.connection_names {
            // `close` names no header; `keep-alive` is removed below. Anything else is rare.
            let named: Vec<HeaderName> = h
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect();
            for name in named {
                named_removed |= h.remove(name).is_some();
            }
        }
        if self.has(Self::CONNECTION) {
            h.remove(header::CONNECTION);
        }
        for (bit, name) in [
            (Self::KEEP_ALIVE, &KEEP_ALIVE),
            (Self::PROXY_CONNECTION, &PROXY_CONNECTION),
            (Self::TE, &header::TE),
            (Self::TRANSFER_ENCODING, &header::TRANSFER_ENCODING),
            (Self::UPGRADE, &header::UPGRADE),
        ] {
            if self.has(bit) {
                h.remove(name);
            }
        }
        if named_removed {
            // `Connection` named a header this proxy acts on (Host, X-Forwarded-*): look again.
            return Seen::scan(h);
        }
        Seen { bits: self.bits & !Self::HOP_BY_HOP, connection_names: false, ..self }
    }
}

/// Whether a comma-separated header contains `token` (case-insensitive).
fn has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including every header named in
/// `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    Seen::scan(h).strip_hop_by_hop(h);
}

/// Whether `name` is always hop-by-hop (RFC 9110 §7.6.1): `Connection`, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as enum values, and a custom one with them at its tag.
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Appends `value` to a comma-separated header, joining repeated lines into one. `present`:
/// whether `h` has the header already.
fn append(h: &mut HeaderMap, name: &HeaderName, value: &HeaderValue, present: bool) {
    if !present {
        h.append(name, value.clone());
        return;
    }
    let mut line = joined(h.get_all(name), b", ");
    line.extend_from_slice(b", ");
    line.extend_from_slice(value.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&line) {
        h.insert(name.clone(), v);
    }
}

/// The values of one header's lines, in order, as one line with `sep` between them.
fn joined(values: http::header::GetAll<'_, HeaderValue>, sep: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(128);
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            line.extend_from_slice(sep);
        }
        line.extend_from_slice(v.as_bytes());
    }
    line
}

/// A proxy with the default configuration for an app at `app`, for unit tests.
#[cfg(test)]
pub(crate) fn test_proxy(app: SocketAddr) -> Arc<Proxy> {
    let cfg = crate::config::Config::default();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let acct = Arc::new(Accounting { metrics: metrics.clone(), activity: Arc::new(crate::activity::Activity::new()) });
    let (_tx, state) = crate::lifecycle::channel();
    let upstream = Arc::new(Upstream::new(&cfg.upstream, app, metrics.connect_resends.clone()));
    Arc::new(Proxy::new(acct, state, upstream, std::time::Duration::from_secs(1), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(h2: bool, tls: bool) -> ProxyService {
        let proxy = test_proxy("127.0.0.1:9".parse().unwrap());
        ProxyService::new(proxy, Arc::new(ConnState::new()), "10.1.2.3:5555".parse().unwrap(), h2, tls)
    }

    /// A head's request line, and each field name's values in order (the order between names
    /// means nothing to an app).
    fn parsed(head: &[u8]) -> (String, std::collections::BTreeMap<String, Vec<String>>) {
        let text = std::str::from_utf8(head).unwrap();
        assert!(text.ends_with("\r\n\r\n"), "{text:?}");
        let mut lines = text[..text.len() - 4].split("\r\n");
        let line = lines.next().unwrap().to_owned();
        let mut fields = std::collections::BTreeMap::<String, Vec<String>>::new();
        for l in lines {
            let (name, value) = l.split_once(": ").unwrap_or_else(|| panic!("{l:?}"));
            fields.entry(name.to_ascii_lowercase()).or_default().push(value.to_owned());
        }
        (line, fields)
    }

    /// Random HTTP/2 requests without a body reach an HTTP/1.1 app with the head that
    /// rewriting the header map and encoding it would give: the same host, forwarding fields,
    /// joined cookies, hop-by-hop fields left out.
    #[test]
    fn http2_lean_heads_are_the_rewritten_maps_heads() {
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        let pool: &[(&str, &[&str])] = &[
            ("host", &["a.example", "b.example:8080"]),
            ("cookie", &["s=1", "theme=dark", "c=3"]),
            ("x-forwarded-for", &["10.0.0.1", "10.0.0.2, 10.0.0.3"]),
            ("x-forwarded-proto", &["https"]),
            ("x-forwarded-host", &["front.example"]),
            ("te", &["trailers"]),
            ("connection", &["keep-alive", "x-named"]),
            ("keep-alive", &["timeout=5"]),
            ("x-named", &["secret"]),
            ("user-agent", &["h2load nghttp2/1.59"]),
            ("accept", &["*/*"]),
            ("content-type", &["text/plain"]),
        ];
        let (mut lean, mut total) = (0, 0);
        for _ in 0..3000 {
            let svc = service(true, next(2) == 0);
            let authority = ["", "shop.example", "127.0.0.1:18101"][next(3)];
            let path = ["/", "/a?b=c", "/x/y%20z"][next(3)];
            let method = ["GET", "HEAD", "DELETE", "OPTIONS"][next(4)];
            let uri = if authority.is_empty() { path.to_owned() } else { format!("http://{authority}{path}") };
            let mut req =
                Request::builder().method(method).uri(uri).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
            for _ in 0..next(9) {
                let (name, values) = pool[next(pool.len())];
                req.headers_mut().append(name, HeaderValue::from_static(values[next(values.len())]));
            }
            let seen = Seen::scan(req.headers());
            let head = svc.lean_head(&req, &seen);
            let mut rewritten = req.clone();
            svc.prepare(&mut rewritten, false, seen);
            total += 1;
            let Some(head) = head else {
                // Only what needs the map's rewrite is refused: a scheme-less target, or a
                // `Connection` that names fields.
                assert!(authority.is_empty() || Seen::scan(req.headers()).connection_names, "{req:?}");
                continue;
            };
            lean += 1;
            assert_eq!(parsed(&head), parsed(&lean::encode_head(&rewritten)), "{req:?}");
        }
        assert!(lean * 2 > total, "{lean} of {total} requests took the lean head");
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn the_hop_by_hop_test_and_the_scan_agree() {
        let names = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"];
        for name in names.iter().chain(&["host", "cookie", "x-forwarded-for", "keep-alive-x", "trailer", "x-a"]) {
            let n = HeaderName::from_static(name);
            assert_eq!(is_hop_by_hop(&n), names.contains(name), "{name}");
            assert_eq!(is_hop_by_hop(&n), Seen::bit(&n) & Seen::HOP_BY_HOP != 0, "{name}");
        }
    }

    #[test]
    fn a_header_the_proxy_sets_that_connection_names_is_set_afresh() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Host, X-Forwarded-For"));
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.9"));
        let seen = Seen::scan(&h);
        assert!(seen.has(Seen::HOST) && seen.has(Seen::X_FORWARDED_FOR));
        assert_eq!(seen.host.as_ref().map(|v| v.as_bytes()), Some(&b"a.example"[..]));
        let seen = seen.strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        // What is left must say so, or the proxy would not put Host back.
        assert!(!seen.has(Seen::HOST) && !seen.has(Seen::X_FORWARDED_FOR) && !seen.has(Seen::CONNECTION));
    }

    #[test]
    fn every_connection_line_is_read_for_names() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Close"));
        h.insert("x-b", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!Seen::scan(&h).is_upgrade_request(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(Seen::scan(&h).is_upgrade_request(&h));
    }

    #[test]
    fn an_upgrade_to_h2c_alone_is_not_tunnelled() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, HTTP2-Settings"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!Seen::scan(&h).is_upgrade_request(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c, websocket"));
        assert!(Seen::scan(&h).is_upgrade_request(&h));
    }

    #[test]
    fn forwarding_headers_are_appended() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        append(&mut h, &X_FORWARDED_FOR, &HeaderValue::from_static("127.0.0.1"), true);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        append(&mut h, &X_FORWARDED_PROTO, &HeaderValue::from_static("http"), false);
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
    }
}
