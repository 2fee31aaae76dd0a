//! The demo app: behaves like a typical app that never heard of graceful shutdown. It stops
//! the moment it is told to (like Gunicorn or uWSGI workers on SIGTERM), closes idle
//! keep-alives after a configurable timeout (Node.js: 5 s), and can be slow to start.
//!
//! Used by `drainproxy demo` and the rollout harness (`bench/rollout.rs`); not part of the
//! proxy. Routes: `GET /` fast, `GET /slow?ms=N`, `POST /echo` (streams the body back),
//! `GET /healthz`, `GET /ws` (WebSocket echo).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, Clone)]
pub struct DemoAppOptions {
    pub listen: SocketAddr,
    /// Included in `GET /` answers, so a reader sees which pod answered.
    pub name: String,
    /// Time before the app even listens.
    pub listen_delay: Duration,
    /// Time after listening before `/healthz` passes (a cold start).
    pub health_delay: Duration,
    /// Idle keep-alive connections are closed after this.
    pub keepalive_idle: Duration,
}

impl Default for DemoAppOptions {
    fn default() -> Self {
        DemoAppOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            name: "demo".into(),
            listen_delay: Duration::ZERO,
            health_delay: Duration::ZERO,
            keepalive_idle: Duration::from_secs(5),
        }
    }
}

struct Shared {
    name: Bytes,
    healthy_at: Instant,
}

/// Binds after `listen_delay` and returns the bound listener; `serve` then runs the app.
pub async fn bind(opts: &DemoAppOptions) -> std::io::Result<TcpListener> {
    tokio::time::sleep(opts.listen_delay).await;
    TcpListener::bind(opts.listen).await
}

/// Serves until `stop` resolves, then drops every connection at once: no graceful anything.
pub async fn serve(listener: TcpListener, opts: DemoAppOptions, stop: impl std::future::Future) {
    let shared = Arc::new(Shared {
        name: Bytes::from(format!("ok from {}\n", opts.name)),
        healthy_at: Instant::now() + opts.health_delay,
    });
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, shared.clone(), opts.keepalive_idle));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Dropping the JoinSet aborts every connection: in-flight requests are cut.
    drop(conns);
}

async fn connection(stream: tokio::net::TcpStream, shared: Arc<Shared>, idle: Duration) {
    let epoch = Instant::now();
    let active = Arc::new(AtomicU32::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let svc = {
        let (active, last) = (active.clone(), last.clone());
        service_fn(move |req| {
            let (shared, active, last) = (shared.clone(), active.clone(), last.clone());
            async move {
                active.fetch_add(1, Relaxed);
                let res = route(req, &shared).await;
                last.store(epoch.elapsed().as_millis() as u64, Relaxed);
                active.fetch_sub(1, Relaxed);
                Ok::<_, Infallible>(res)
            }
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades();
    tokio::pin!(conn);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = &mut timer => {
                let idle_for = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Relaxed)));
                if active.load(Relaxed) == 0 && idle_for >= idle {
                    // Like Node's keepAliveTimeout: closes without warning the client.
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
                } else {
                    timer.as_mut().reset(tokio::time::Instant::now() + idle.saturating_sub(idle_for).max(Duration::from_millis(10)));
                }
            }
        }
    }
}

fn text(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *res.status_mut() = status;
    res
}

fn query_ms(req: &Request<Incoming>) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")?.parse().ok()))
        .unwrap_or(100)
        .min(600_000)
}

async fn route(mut req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => text(StatusCode::OK, shared.name.clone()),
        (&Method::GET, "/slow") => {
            tokio::time::sleep(Duration::from_millis(query_ms(&req))).await;
            text(StatusCode::OK, shared.name.clone())
        }
        (&Method::POST, "/echo") => Response::new(req.into_body().boxed()),
        (&Method::GET, "/healthz") => {
            if Instant::now() >= shared.healthy_at {
                text(StatusCode::OK, Bytes::from_static(b"healthy\n"))
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"warming up\n"))
            }
        }
        (&Method::GET, "/ws") => websocket(&mut req),
        _ => text(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    }
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64(&sha.digest().bytes())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn websocket(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").map(|k| k.as_bytes().to_vec()) else {
        return text(StatusCode::BAD_REQUEST, Bytes::from_static(b"not a websocket handshake\n"));
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let _ = echo_frames(TokioIo::new(upgraded)).await;
        }
    });
    let mut res = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = res.headers_mut();
    h.insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
    if let Ok(v) = header::HeaderValue::from_str(&websocket_accept(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    res
}

/// Echoes WebSocket frames: unmasks what the client sends and returns it unmasked, answers
/// ping with pong and close with close. Frames above 1 MiB end the connection.
async fn echo_frames<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await?);
        } else if len == 127 {
            len = s.read_u64().await?;
        }
        if len > 1 << 20 {
            return Ok(());
        }
        let mut mask = [0u8; 4];
        if masked {
            s.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let reply_op = match opcode {
            0x8 => 0x8,
            0x9 => 0xA,
            0xA => continue,
            op => op,
        };
        let mut frame = Vec::with_capacity(payload.len() + 10);
        frame.push(0x80 | reply_op);
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n <= 0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&payload);
        s.write_all(&frame).await?;
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }
}
