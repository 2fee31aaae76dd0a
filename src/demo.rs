//! `drainproxy demo`: a pod replacement under load on loopback, with and without drainproxy,
//! in about fifteen seconds and with nothing to install.
//!
//! Each pod is a demo app (which stops at once when told to, like most apps) on its own
//! `127.0.1.x` address, with drainproxy in front of it in the first run. Callers pick a pod
//! per connection from an endpoint list that learns of changes only after a propagation
//! lag, as kube-proxy and load balancers do. The old pod is deleted the way the kubelet does
//! it in native sidecar mode: preStop `GET /drain` (blocking), then the app is stopped, then
//! drainproxy gets SIGTERM. Without drainproxy the app is stopped at deletion.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::app::{self, Running, StartOptions};
use crate::config::{Config, Dur};
use crate::demo_app::{self, DemoAppOptions};
use crate::lifecycle::{Event, Phase, Signal};

/// Knobs of the demo; the defaults are what `drainproxy demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long callers keep using a deleted pod before they learn of it.
    pub propagation_lag: Duration,
    pub workers: usize,
    /// Pause between two requests of one worker.
    pub pace: Duration,
    pub min_delay: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            propagation_lag: Duration::from_millis(1500),
            workers: 16,
            pace: Duration::from_millis(20),
            min_delay: Duration::from_secs(2),
        }
    }
}

/// What one run measured.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub failed_status: u64,
    pub failed_connect: u64,
    pub failed_io: u64,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.failed_status + self.failed_connect + self.failed_io
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    failed_status: AtomicU64,
    failed_connect: AtomicU64,
    failed_io: AtomicU64,
}

impl Counters {
    fn tally(&self) -> Tally {
        Tally {
            sent: self.sent.load(Relaxed),
            ok: self.ok.load(Relaxed),
            failed_status: self.failed_status.load(Relaxed),
            failed_connect: self.failed_connect.load(Relaxed),
            failed_io: self.failed_io.load(Relaxed),
        }
    }
}

/// The endpoint list callers pick from: one pod per new connection, round robin.
#[derive(Default)]
struct Endpoints {
    list: RwLock<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl Endpoints {
    fn pick(&self) -> Option<SocketAddr> {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        (!list.is_empty()).then(|| list[self.next.fetch_add(1, Relaxed) % list.len()])
    }
    fn set(&self, f: impl FnOnce(&mut Vec<SocketAddr>)) {
        f(&mut self.list.write().unwrap_or_else(|p| p.into_inner()));
    }
}

struct Pod {
    /// Where callers connect: drainproxy's listener, or the app itself.
    serving: SocketAddr,
    stop_app: Option<oneshot::Sender<()>>,
    proxy: Option<Running>,
}

async fn start_pod(ip: [u8; 4], name: &str, with_proxy: bool, opts: &DemoOptions) -> anyhow::Result<Pod> {
    let app_opts = DemoAppOptions {
        listen: SocketAddr::from((ip, 0)),
        name: name.into(),
        keepalive_idle: Duration::from_secs(5),
        ..DemoAppOptions::default()
    };
    let listener = demo_app::bind(&app_opts).await.with_context(|| format!("cannot bind {}", app_opts.listen))?;
    let app_addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(demo_app::serve(listener, app_opts, stop_rx));
    if !with_proxy {
        return Ok(Pod { serving: app_addr, stop_app: Some(stop_tx), proxy: None });
    }
    let mut cfg = Config { listen: SocketAddr::from((ip, 0)), admin: SocketAddr::from((ip, 0)), ..Config::default() };
    cfg.upstream.address = app_addr.to_string();
    cfg.health.path = Some("/healthz".into());
    cfg.health.interval = Dur::millis(100);
    cfg.drain.min_delay = Dur(opts.min_delay);
    cfg.drain.quiet_period = Dur::millis(300);
    cfg.drain.max_duration = Dur::secs(10);
    let running = app::start(cfg, StartOptions::default()).await?;
    let mut state = running.state.clone();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.phase == Phase::Ready))
        .await
        .context("the demo pod never became ready")??;
    Ok(Pod { serving: running.proxy_addr, stop_app: Some(stop_tx), proxy: Some(running) })
}

/// One caller: a connection to a pod picked from the endpoints, re-picked whenever the
/// connection closes. A `keep_alive` caller reuses its connection; the others open one per
/// request, as many HTTP clients do.
async fn worker(
    endpoints: Arc<Endpoints>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    pace: Duration,
    keep_alive: bool,
) {
    let mut tick = tokio::time::interval(pace);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Relaxed) {
        tick.tick().await;
        counters.sent.fetch_add(1, Relaxed);
        let mut sender = match conn.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                let Some(addr) = endpoints.pick() else { continue };
                let connected = match TcpStream::connect(addr).await {
                    Ok(s) => http1::handshake(TokioIo::new(s)).await.ok(),
                    Err(_) => None,
                };
                let Some((s, c)) = connected else {
                    counters.failed_connect.fetch_add(1, Relaxed);
                    continue;
                };
                tokio::spawn(c);
                s
            }
        };
        let req = Request::get("/").header("host", "demo").body(Empty::new()).unwrap_or_default();
        let status = match sender.ready().await {
            Ok(()) => match sender.send_request(req).await {
                Ok(res) => {
                    let status = res.status();
                    let close = res.headers().get("connection").is_some_and(|v| v == "close");
                    match res.into_body().collect().await {
                        Ok(_) if keep_alive && !close => {
                            conn = Some(sender);
                            Some(status)
                        }
                        Ok(_) => Some(status),
                        Err(_) => None,
                    }
                }
                Err(_) => None,
            },
            Err(_) => None,
        };
        let counter = match status {
            Some(s) if s.is_success() => &counters.ok,
            Some(_) => &counters.failed_status,
            None => &counters.failed_io,
        };
        counter.fetch_add(1, Relaxed);
    }
}

async fn admin_drain(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let stream = TcpStream::connect(admin).await?;
    let (mut s, c) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(c);
    let res = s.send_request(Request::get("/drain").header("host", "admin").body(Empty::new())?).await?;
    let body = res.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// Runs one replacement; `with_proxy` selects the pods' shape. Timeline lines go to `out`.
async fn replacement(with_proxy: bool, opts: &DemoOptions, out: &mut dyn Write) -> anyhow::Result<Tally> {
    let t0 = Instant::now();
    let at = move || format!("{:>6.2}s", t0.elapsed().as_secs_f64());
    let endpoints = Arc::new(Endpoints::default());
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let base = if with_proxy { 1 } else { 3 };
    let mut old = start_pod([127, 0, 1, base], "old", with_proxy, opts).await?;
    endpoints.set(|l| l.push(old.serving));
    writeln!(out, "{} old pod ready at {}", at(), old.serving)?;
    let workers: Vec<_> = (0..opts.workers)
        .map(|i| tokio::spawn(worker(endpoints.clone(), counters.clone(), stop.clone(), opts.pace, i % 2 == 0)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let new = start_pod([127, 0, 1, base + 1], "new", with_proxy, opts).await?;
    endpoints.set(|l| l.push(new.serving));
    writeln!(out, "{} new pod ready at {}, added to the endpoints", at(), new.serving)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    writeln!(out, "{} old pod deleted; callers learn of it in {:.1}s", at(), opts.propagation_lag.as_secs_f64())?;
    let removed = old.serving;
    let lag = opts.propagation_lag;
    let eps = endpoints.clone();
    let propagation = tokio::spawn(async move {
        tokio::time::sleep(lag).await;
        eps.set(|l| l.retain(|a| *a != removed));
    });
    match old.proxy.take() {
        Some(proxy) => {
            writeln!(out, "{} preStop: GET /drain on the old pod (blocks until idle)", at())?;
            let summary = admin_drain(proxy.admin_addr).await?;
            let d = &summary["drain"];
            writeln!(
                out,
                "{} drain released ({}): {} requests arrived after the drain started, the last {:.2}s after it",
                at(),
                d["outcome"].as_str().unwrap_or("?"),
                d["requests_after_start"],
                d["last_request_seconds"].as_f64().unwrap_or(0.0)
            )?;
            if let Some(stop_app) = old.stop_app.take() {
                let _ = stop_app.send(());
            }
            writeln!(out, "{} app SIGTERM: it exits at once", at())?;
            proxy.events.send(Event::Signal(Signal::Term)).await?;
            let _ = proxy.exit.await;
            writeln!(out, "{} drainproxy SIGTERM: exited", at())?;
        }
        None => {
            if let Some(stop_app) = old.stop_app.take() {
                let _ = stop_app.send(());
            }
            writeln!(out, "{} app SIGTERM: it exits at once, callers still pick it", at())?;
        }
    }
    propagation.await?;
    writeln!(out, "{} every caller has converged", at())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    for w in workers {
        let _ = w.await;
    }
    drop(new);
    Ok(counters.tally())
}

/// Runs the demo and writes the report; returns the tallies (with, without drainproxy).
pub async fn run(opts: &DemoOptions, out: &mut dyn Write) -> anyhow::Result<(Tally, Tally)> {
    writeln!(
        out,
        "drainproxy demo: one pod replaced under load ({} callers, half of them keep-alive, ~{} requests/s),\nwith and without drainproxy\n",
        opts.workers,
        (opts.workers as f64 / opts.pace.as_secs_f64()).round()
    )?;
    writeln!(out, "-- with drainproxy (native sidecar: preStop /drain, then the app stops)")?;
    let with = replacement(true, opts, out).await?;
    writeln!(out, "\n-- without drainproxy (the app stops when the pod is deleted)")?;
    let without = replacement(false, opts, out).await?;
    writeln!(out, "\n                     sent       ok   failed  (status / connect / reset)")?;
    for (name, t) in [("with drainproxy", &with), ("without drainproxy", &without)] {
        writeln!(
            out,
            "{name:<18} {:>7} {:>8} {:>8}  ({} / {} / {})",
            t.sent,
            t.ok,
            t.failed(),
            t.failed_status,
            t.failed_connect,
            t.failed_io
        )?;
    }
    writeln!(out)?;
    if with.failed() == 0 {
        writeln!(out, "with drainproxy: 0 failed requests.")?;
    } else {
        writeln!(out, "with drainproxy: {} requests failed; this is a bug, please report it.", with.failed())?;
    }
    Ok((with, without))
}
