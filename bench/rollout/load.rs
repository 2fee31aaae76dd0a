//! Load during the whole run, through the front end, counted per kind and per 100 ms:
//!
//! - `get`: keep-alive GETs at a fixed rate. Like common HTTP clients (Go's `net/http`
//!   Transport, browsers), a GET that fails on a *reused* keep-alive connection before any
//!   response byte arrived (the server closed or reset it while idle) is retried once on a new
//!   connection; nothing else is retried, and a timeout never is.
//! - `post`: POST /echo with a 1 KiB body, each on a fresh connection, never retried; the
//!   echo must match.
//! - `slow`: GET /slow lasting seconds, each on a fresh connection, never retried.
//! - `ws`: WebSocket connections that echo a message every 200 ms; each lives a few seconds
//!   and is then closed by the client and reopened (a lost echo, a failed handshake or a
//!   close by the server counts as a failure).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

pub const KINDS: [&str; 4] = ["get", "post", "slow", "ws"];
pub const BUCKET: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub get_rps: u32,
    pub get_conns: usize,
    pub post_rps: u32,
    pub slow_rps: u32,
    pub slow_ms: u64,
    pub websockets: usize,
    pub ws_lifetime: Duration,
}

#[derive(Default)]
pub struct KindStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failures: Mutex<BTreeMap<String, u64>>,
}

pub struct Stats {
    pub start: Instant,
    /// Per 100 ms: [ok, failed].
    pub buckets: Mutex<Vec<[u32; 2]>>,
    pub kinds: [KindStats; 4],
}

impl Stats {
    fn record(&self, kind: usize, result: Result<(), String>) {
        let k = &self.kinds[kind];
        k.sent.fetch_add(1, Relaxed);
        let idx = (self.start.elapsed().as_millis() / BUCKET.as_millis()) as usize;
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() <= idx {
            b.resize(idx + 1, [0, 0]);
        }
        match result {
            Ok(()) => {
                k.ok.fetch_add(1, Relaxed);
                b[idx][0] += 1;
            }
            Err(reason) => {
                b[idx][1] += 1;
                *k.failures.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
            }
        }
    }

    pub fn failed(&self) -> u64 {
        self.kinds.iter().map(|k| k.sent.load(Relaxed) - k.ok.load(Relaxed)).sum()
    }
    pub fn sent(&self) -> u64 {
        self.kinds.iter().map(|k| k.sent.load(Relaxed)).sum()
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// POSTs and slow requests under way (each runs in its own task).
    outstanding: Arc<AtomicU64>,
    pub stats: Arc<Stats>,
}

impl Load {
    pub fn start(cfg: LoadConfig, start: Instant) -> Load {
        let stats = Arc::new(Stats { start, buckets: Mutex::new(Vec::new()), kinds: Default::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let outstanding = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let per_conn = Duration::from_secs_f64(cfg.get_conns as f64 / f64::from(cfg.get_rps.max(1)));
        for i in 0..cfg.get_conns {
            let offset = per_conn.mul_f64(i as f64 / cfg.get_conns as f64);
            tasks.push(tokio::spawn(paced(stop.clone(), per_conn, offset, {
                let (stats, target) = (stats.clone(), cfg.target);
                let conn = Arc::new(tokio::sync::Mutex::new(None));
                move || {
                    let (stats, conn) = (stats.clone(), conn.clone());
                    async move {
                        let r = get_keep_alive(&mut *conn.lock().await, target).await;
                        stats.record(0, r);
                    }
                }
            })));
        }
        // POSTs and slow requests each run in their own task at a fixed start rate, counted
        // in `outstanding` so that `stop` can wait for them.
        let target = cfg.target;
        let slow_ms = cfg.slow_ms;
        for (kind, rps) in [(1usize, cfg.post_rps), (2, cfg.slow_rps)] {
            if rps == 0 {
                continue;
            }
            let every = Duration::from_secs_f64(1.0 / f64::from(rps));
            let (stats, outstanding) = (stats.clone(), outstanding.clone());
            tasks.push(tokio::spawn(paced(stop.clone(), every, Duration::ZERO, move || {
                let (stats, outstanding) = (stats.clone(), outstanding.clone());
                outstanding.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let result = if kind == 1 { post_once(target).await } else { slow_once(target, slow_ms).await };
                    stats.record(kind, result);
                    outstanding.fetch_sub(1, Relaxed);
                });
                std::future::ready(())
            })));
        }
        for i in 0..cfg.websockets {
            let (stats, stop, target, life) = (stats.clone(), stop.clone(), cfg.target, cfg.ws_lifetime);
            let offset = life.mul_f64(i as f64 / cfg.websockets.max(1) as f64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                while !stop.load(Relaxed) {
                    websocket_session(&stats, target, life, &stop).await;
                }
            }));
        }
        Load { stop, tasks, outstanding, stats }
    }

    /// Stops issuing new work and waits (bounded) for what is under way.
    pub async fn stop(self) -> Arc<Stats> {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
        // POSTs and slow requests already sent must finish before pods are torn down.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.outstanding.load(Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stats
    }
}

async fn paced<F, Fut>(stop: Arc<AtomicBool>, every: Duration, offset: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Relaxed) {
        tick.tick().await;
        f().await;
    }
}

fn classify(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        "closed before response".into()
    } else if e.is_canceled() {
        "canceled".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else {
        let s = format!("{e:?}");
        if s.contains("ConnectionReset") {
            "reset".into()
        } else {
            format!("error: {e}")
        }
    }
}

async fn connect<B>(target: SocketAddr) -> Result<http1::SendRequest<B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {}", e.kind())),
        Err(_) => return Err("connect: timeout".into()),
    };
    let _ = stream.set_nodelay(true);
    let (s, c) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(c);
    Ok(s)
}

async fn get_keep_alive(conn: &mut Option<http1::SendRequest<Empty<Bytes>>>, target: SocketAddr) -> Result<(), String> {
    let mut retried = false;
    loop {
        let pooled = match conn.take() {
            Some(mut c) if !c.is_closed() => c.ready().await.is_ok().then_some(c),
            _ => None,
        };
        let (mut s, reused) = match pooled {
            Some(c) => (c, true),
            None => (connect(target).await?, false),
        };
        let req = http::Request::get("/").header("host", "rollout").body(Empty::new()).map_err(|e| e.to_string())?;
        let res = match tokio::time::timeout(Duration::from_secs(10), s.send_request(req)).await {
            Err(_) => return Err("timeout".into()),
            Ok(Err(_)) if reused && !retried => {
                retried = true;
                continue;
            }
            Ok(Err(e)) => return Err(classify(&e)),
            Ok(Ok(res)) => res,
        };
        let status = res.status();
        let close = res.headers().get("connection").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        res.into_body().collect().await.map_err(|e| format!("body: {}", classify(&e)))?;
        if !close {
            *conn = Some(s);
        }
        return if status.is_success() { Ok(()) } else { Err(format!("status {}", status.as_u16())) };
    }
}

async fn post_once(target: SocketAddr) -> Result<(), String> {
    let body = Bytes::from((0..1024u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let mut s = connect::<Full<Bytes>>(target).await?;
    let req = http::Request::post("/echo")
        .header("host", "rollout")
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let res = match tokio::time::timeout(Duration::from_secs(10), s.send_request(req)).await {
        Err(_) => return Err("timeout".into()),
        Ok(Err(e)) => return Err(classify(&e)),
        Ok(Ok(r)) => r,
    };
    let status = res.status();
    let got = res.into_body().collect().await.map_err(|e| format!("body: {}", classify(&e)))?.to_bytes();
    if !status.is_success() {
        return Err(format!("status {}", status.as_u16()));
    }
    if got != body {
        return Err("echo mismatch".into());
    }
    Ok(())
}

async fn slow_once(target: SocketAddr, ms: u64) -> Result<(), String> {
    let mut s = connect::<Empty<Bytes>>(target).await?;
    let req = http::Request::get(format!("/slow?ms={ms}"))
        .header("host", "rollout")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let res = match tokio::time::timeout(Duration::from_millis(ms + 10_000), s.send_request(req)).await {
        Err(_) => return Err("timeout".into()),
        Ok(Err(e)) => return Err(classify(&e)),
        Ok(Ok(r)) => r,
    };
    let status = res.status();
    res.into_body().collect().await.map_err(|e| format!("body: {}", classify(&e)))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

async fn websocket_session(stats: &Stats, target: SocketAddr, life: Duration, stop: &AtomicBool) {
    let opened = Instant::now();
    let stream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            stats.record(3, Err(format!("connect: {}", e.kind())));
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
    };
    let handshake = tokio_tungstenite::client_async(format!("ws://{target}/ws"), stream);
    let mut ws = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            stats.record(3, Err(format!("ws handshake: {e}")));
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        Err(_) => {
            stats.record(3, Err("ws handshake: timeout".into()));
            return;
        }
    };
    let mut n = 0u64;
    while opened.elapsed() < life && !stop.load(Relaxed) {
        n += 1;
        let text = format!("message {n}");
        let result = async {
            ws.send(Message::text(text.clone())).await.map_err(|e| format!("ws send: {e}"))?;
            match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => Ok(()),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) => Err("ws closed by server".to_string()),
                Ok(Some(Ok(_))) => Err("ws wrong echo".to_string()),
                Ok(Some(Err(e))) => Err(format!("ws read: {e}")),
                Err(_) => Err("ws echo timeout".to_string()),
            }
        }
        .await;
        let failed = result.is_err();
        stats.record(3, result);
        if failed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = ws.close(None).await;
}
