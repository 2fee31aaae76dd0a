//! Test peers and helpers: an in-process app with controllable handlers, an in-process
//! drainproxy on ephemeral ports, HTTP clients that keep one connection, and the real binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drainproxy::app::{self, Running, StartOptions};
use drainproxy::config::{Config, Dur};
use drainproxy::lifecycle::Phase;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Holds requests to `/hold` in flight until the test releases them.
#[derive(Default)]
pub struct Hold {
    pub started: Notify,
    pub release: Notify,
}

#[derive(Default)]
pub struct AppState {
    pub hold: Hold,
    pub unhealthy: AtomicBool,
    /// Connections accepted (health checks included).
    pub connections: AtomicUsize,
    /// Connections ended, and a signal each time one ends.
    pub closed: AtomicUsize,
    pub closed_signal: tokio::sync::Notify,
    /// Requests other than health checks.
    pub requests: AtomicUsize,
    /// The last request's headers as seen by the app.
    pub last_headers: std::sync::Mutex<HeaderMap>,
}

pub struct App {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Stops accepting and drops every open connection (the app process "exits").
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An app speaking HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1.
pub async fn app() -> App {
    app_on("127.0.0.1:0".parse().unwrap(), Arc::new(AppState::default())).await
}

pub async fn app_on(addr: SocketAddr, state: Arc<AppState>) -> App {
    serve_app(bind_retry(addr).await, state)
}

/// The app's container restarts: it goes away until `p`'s health check has seen it down, then
/// comes back on the same port with the same state.
pub async fn restart_app(p: &Running, app: App) -> App {
    let (addr, state) = (app.addr, app.state.clone());
    app.kill();
    drop(app);
    let mut rx = p.state.clone();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.app_healthy == Some(false)))
        .await
        .expect("health check saw the app go down")
        .unwrap();
    app_on(addr, state).await
}

/// The test app, serving connections from `listener` (and those already queued on it).
pub fn serve_app(listener: TcpListener, state: Arc<AppState>) -> App {
    let addr = listener.local_addr().unwrap();
    let st = state.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            st.connections.fetch_add(1, Ordering::SeqCst);
            let st = st.clone();
            let st2 = st.clone();
            conns.spawn(async move {
                let svc = service_fn(move |req| handle(req, st.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
                st2.closed.fetch_add(1, Ordering::SeqCst);
                st2.closed_signal.notify_waiters();
            });
        }
    });
    App { addr, state, task }
}

impl AppState {
    /// Waits until every connection the app accepted has ended (false after `limit`).
    pub async fn all_connections_closed(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                let ended = self.closed_signal.notified();
                if self.closed.load(Ordering::SeqCst) == self.connections.load(Ordering::SeqCst) {
                    return;
                }
                ended.await;
            }
        })
        .await
        .is_ok()
    }
}

/// The proxy's own `bind`: its backlog is larger than tokio's default of 128, which a burst of
/// streams that each need a fresh app connection overflows (the overflowing connects then wait
/// a 1 s SYN retransmit).
async fn bind_retry(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = drainproxy::server::bind(addr) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cannot bind {addr}");
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn handle(mut req: Request<Incoming>, st: Arc<AppState>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != "/healthz" {
        st.requests.fetch_add(1, Ordering::SeqCst);
        *st.last_headers.lock().unwrap() = req.headers().clone();
    }
    if req.uri().path() == "/early" {
        // Answers at once and reads the request body afterwards, as nginx does with a
        // request it answers without needing the body.
        let status = query(&req, "status").unwrap_or(200) as u16;
        tokio::spawn(req.into_body().collect());
        let mut res = Response::new(full("early"));
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        return Ok(res);
    }
    let res = match req.uri().path() {
        "/healthz" if st.unhealthy.load(Ordering::SeqCst) => status(503),
        "/hold" => {
            st.hold.started.notify_one();
            st.hold.release.notified().await;
            Response::new(full("held"))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(100))).await;
            Response::new(full("slow"))
        }
        "/bytes" => {
            let total = query(&req, "n").unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let n = left.min(chunk.len() as u64);
                    Some((Ok::<_, hyper::Error>(Frame::data(chunk.slice(..n as usize))), left - n))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/count" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return Ok(status(400)),
                }
            }
            Response::new(full(n.to_string()))
        }
        "/echo" => {
            // The request's content, decoded, as the answer.
            match req.into_body().collect().await {
                Ok(c) => Response::new(full(c.to_bytes())),
                Err(_) => status(400),
            }
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("x-checksum", "abc123".parse().unwrap());
            let frames =
                vec![Ok::<_, hyper::Error>(Frame::data(Bytes::from("payload"))), Ok(Frame::trailers(trailers))];
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))))
        }
        "/ws" => return Ok(websocket_echo(&mut req)),
        _ => Response::new(full("ok")),
    };
    Ok(res)
}

fn status(code: u16) -> Response<Body> {
    let mut r = Response::new(full(code.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role};
    let Some(key) = req.headers().get("sec-websocket-key") else { return status(400) };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() || ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(Bytes::new()))
        .unwrap()
}

/// Short drain timings, loopback ports, fast health checks.
pub fn test_config(app: SocketAddr) -> Config {
    let mut c =
        Config { listen: "127.0.0.1:0".parse().unwrap(), admin: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
    c.upstream.address = app.to_string();
    c.health.path = Some("/healthz".into());
    c.health.interval = Dur::millis(20);
    c.health.timeout = Dur::millis(200);
    c.drain.min_delay = Dur::millis(300);
    c.drain.quiet_period = Dur::millis(100);
    c.drain.max_duration = Dur::secs(5);
    c
}

pub async fn proxy(app: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = test_config(app);
    tweak(&mut cfg);
    let problems = cfg.validate();
    assert!(problems.is_empty(), "test config invalid: {problems:?}");
    app::start(cfg, StartOptions::default()).await.expect("drainproxy starts")
}

/// Waits (bounded) until the published phase is `phase`.
pub async fn wait_phase(p: &Running, phase: Phase) {
    let mut rx = p.state.clone();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.phase == phase))
        .await
        .unwrap_or_else(|_| panic!("phase never became {phase:?} (now {:?})", p.state.borrow().phase))
        .unwrap();
}

/// Starts a drain (as `/drain` does) and waits until the proxy is draining.
pub async fn start_drain(p: &Running) {
    p.events.send(drainproxy::lifecycle::Event::Drain(drainproxy::lifecycle::Trigger::Http)).await.unwrap();
    wait_phase(p, Phase::Draining).await;
}

pub async fn ready_proxy(app: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Running {
    let p = proxy(app, tweak).await;
    wait_phase(&p, Phase::Ready).await;
    p
}

/// One HTTP/1.1 connection, kept so tests can see keep-alive and close behaviour.
pub struct H1 {
    pub sender: hyper::client::conn::http1::SendRequest<Body>,
    pub conn: tokio::task::JoinHandle<hyper::Result<()>>,
}

pub async fn h1(addr: SocketAddr) -> H1 {
    h1_on(TcpStream::connect(addr).await.unwrap()).await
}

/// An HTTP/1.1 client on a connection already made (TCP, TLS).
pub async fn h1_on<T>(io: T) -> H1
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    H1 { sender, conn: tokio::spawn(conn.with_upgrades()) }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn read(res: Response<Incoming>) -> Reply {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Reply { status: parts.status, headers: parts.headers, body }
}

impl H1 {
    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(Request::get(path).header("host", "test.local").body(full(Bytes::new())).unwrap()).await
    }
    pub async fn send(&mut self, req: Request<Body>) -> Reply {
        self.sender.ready().await.unwrap();
        read(self.sender.send_request(req).await.unwrap()).await
    }
}

/// A fresh HTTP/1.1 connection for one GET.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    h1(addr).await.get(path).await
}

/// An HTTP/2 client, without Nagle's algorithm as HTTP/2 clients run: a request's frames go at
/// once, not after the peer's delayed ACK.
pub async fn h2(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<Body>, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    h2_on(stream).await
}

/// An HTTP/2 client on a connection already made (TCP, TLS).
pub async fn h2_on<T>(
    io: T,
) -> (hyper::client::conn::http2::SendRequest<Body>, tokio::task::JoinHandle<hyper::Result<()>>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    (sender, tokio::spawn(conn))
}

pub fn h2_get(addr: SocketAddr, path: &str) -> Request<Body> {
    Request::get(format!("http://{addr}{path}")).body(full(Bytes::new())).unwrap()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Reads a counter or gauge value from the Prometheus text, summing matching series.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics(p: &Running) -> String {
    get(p.admin_addr, "/metrics").await.text()
}

/// Waits (bounded, 10 s) until a metric reaches `at_least`; for counters that move after
/// the event a test can see (a call answered, a file read).
pub async fn wait_metric(p: &Running, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(&metrics(p).await, name, labels);
        if got >= at_least {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name}{labels:?} stayed at {got}, expected {at_least}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The path of the real binary built by cargo for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_drainproxy")
}

/// A free loopback port (bound then released; good enough for a child process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A scripted app (see [`scripted_app`]): where it listens, the connections that brought a
/// request (not the proxy's TCP checks), and every request head it read, in order.
pub struct Scripted {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
}

/// An app that answers each request with the bytes `answer` gives for its path, verbatim,
/// closing the connection after the paths it names. A request body framed by
/// `Content-Length` is read whole before the answer, and recorded with its head as an
/// `x-body-read` field.
pub async fn scripted_app(answer: fn(&str) -> (&'static [u8], bool)) -> Scripted {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, seen) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let (count, seen) = (count.clone(), seen.clone());
            tokio::spawn(async move {
                let mut first = true;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let mut head = String::from_utf8_lossy(&got[..end]).into_owned();
                    got.drain(..end + 4);
                    let length: usize = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse().ok())
                        .unwrap_or(0);
                    while got.len() < length {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    // The body, recorded as a field of its own: what the app read of it.
                    if length > 0 {
                        head.push_str(&format!("\r\nx-body-read: {}", String::from_utf8_lossy(&got[..length])));
                        got.drain(..length);
                    }
                    if std::mem::take(&mut first) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    seen.lock().unwrap().push(head);
                    let (bytes, close) = answer(&path);
                    if s.write_all(bytes).await.is_err() || close {
                        let _ = s.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    Scripted { addr, accepted, heads }
}
