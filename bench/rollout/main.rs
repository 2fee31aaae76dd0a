//! The rollout harness: Deployment rolling updates and scale-downs on loopback, through real
//! front ends, with and without drainproxy, under load; reports failed requests per scenario.
//!
//! Run `cargo run --release --example rollout -- --help`. Pods are `127.0.2.x` addresses;
//! every loop is bounded by counts and timeouts and nothing leaves the machine.

mod fronts;
mod load;
mod pods;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use drainproxy::config::parse_duration;

use fronts::{Front, FrontKind};
use load::{Load, LoadConfig, Stats};
use pods::{Deletion, Pod, PodEnv, PodKind};

#[derive(Parser, Debug)]
#[command(
    name = "rollout",
    about = "Rolling updates and scale-downs on loopback, with and without drainproxy, through nginx, HAProxy and a kube-proxy-like TCP path",
    long_about = "Simulates Deployment rollouts on one machine: each pod is a 127.0.2.x address running a demo app \
                  (which exits at once on SIGTERM) with or without a sidecar; an endpoints controller updates the \
                  front ends after a random propagation lag; a kubelet deletes pods with preStop, SIGTERM and SIGKILL. \
                  Load runs throughout and every failed request is counted.\n\n\
                  Needs nginx and haproxy on PATH and the release binary (cargo build --release)."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Front ends, comma-separated: haproxy (ingress, runtime API), tcp (kube-proxy's path), nginx (ingress, reloads)
    #[arg(long, default_value = "haproxy,tcp,nginx")]
    fronts: String,
    /// Pod kinds: native, classic (drainproxy), app (app alone), sleep15 (app + preStop sleep 15), nginx-sidecar
    #[arg(long, default_value = "native,classic,app,sleep15,nginx-sidecar")]
    kinds: String,
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Deployment strategy: pods above `replicas` allowed during a rollout
    #[arg(long, default_value_t = 1)]
    max_surge: usize,
    /// Deployment strategy: pods below `replicas` allowed during a rollout
    #[arg(long, default_value_t = 0)]
    max_unavailable: usize,
    /// Pod replacements per rollout scenario
    #[arg(long, default_value_t = 20)]
    replacements: usize,
    /// Endpoint propagation lag, random in MIN-MAX (e.g. 0s-3s)
    #[arg(long, default_value = "0s-3s")]
    lag: String,
    /// Keep-alive GETs per second
    #[arg(long, default_value_t = 1000)]
    get_rps: u32,
    #[arg(long, default_value_t = 32)]
    get_conns: usize,
    /// POSTs per second (fresh connection each, never retried)
    #[arg(long, default_value_t = 20)]
    post_rps: u32,
    /// Slow requests started per second
    #[arg(long, default_value_t = 2)]
    slow_rps: u32,
    #[arg(long, default_value_t = 2000)]
    slow_ms: u64,
    /// WebSocket connections kept open (each reopened after --ws-lifetime)
    #[arg(long, default_value_t = 8)]
    websockets: usize,
    #[arg(long, default_value = "3s")]
    ws_lifetime: String,
    /// Also scale FROM:TO (e.g. 10:1) per front end and kind; "none" to skip
    #[arg(long, default_value = "10:1")]
    scale_down: String,
    /// Skip the control runs (endpoint churn without pod deletions)
    #[arg(long)]
    no_control: bool,
    /// terminationGracePeriodSeconds
    #[arg(long, default_value = "30s")]
    grace: String,
    /// minReadySeconds: how long the rollout waits after a new pod is ready before the next step
    #[arg(long, default_value = "1s")]
    min_ready: String,
    /// drainproxy's drain.min_delay (default: the lag's maximum plus 1.5s)
    #[arg(long)]
    min_delay: Option<String>,
    /// A short run for CI: haproxy and nginx ingresses and the TCP path, native drainproxy and the app alone
    #[arg(long)]
    quick: bool,
    /// Exit 1 when a drainproxy scenario lost a request or the app-only baseline lost none
    #[arg(long)]
    check: bool,
    /// Where the report, chart and logs go
    #[arg(long, default_value = "target/rollout")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the demo app (used by the harness for each pod)
    App {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "demo")]
        name: String,
        #[arg(long, default_value = "0s")]
        listen_delay: String,
        #[arg(long, default_value = "0s")]
        health_delay: String,
        #[arg(long, default_value = "5s")]
        keepalive_idle: String,
    },
}

fn dur(s: &str) -> anyhow::Result<Duration> {
    parse_duration(s).map_err(anyhow::Error::msg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Rollout,
    ScaleDown(usize, usize),
    /// Endpoint churn (pods added and removed from the front end) but no pod is deleted.
    Control,
}

#[derive(Debug, Clone)]
struct Scenario {
    front: FrontKind,
    kind: PodKind,
    pattern: Pattern,
}

impl Scenario {
    fn name(&self) -> String {
        let p = match self.pattern {
            Pattern::Rollout => "rollout".to_string(),
            Pattern::ScaleDown(a, b) => format!("scale {a}->{b}"),
            Pattern::Control => "control (churn, no deletion)".to_string(),
        };
        format!(
            "{} / {} / {p}",
            self.front.name(),
            if self.pattern == Pattern::Control { "-" } else { self.kind.name() }
        )
    }
}

struct Outcome {
    scenario: Scenario,
    stats: Arc<Stats>,
    duration: Duration,
    deletions: Vec<Deletion>,
    marks: Vec<Duration>,
}

struct Ctx {
    args: Args,
    env: PodEnv,
    lag: (Duration, Duration),
    next_pod: AtomicUsize,
    scenario_no: AtomicUsize,
    seed: AtomicUsize,
}

impl Ctx {
    fn lag(&self) -> Duration {
        // A small xorshift: reproducible enough, no dependency.
        let mut x = self.seed.load(Relaxed) as u64 | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x as usize, Relaxed);
        let (lo, hi) = self.lag;
        lo + (hi.saturating_sub(lo)).mul_f64((x % 10_000) as f64 / 10_000.0)
    }
    async fn new_pod(&self, kind: PodKind) -> anyhow::Result<Pod> {
        let id = self.next_pod.fetch_add(1, Relaxed);
        let pod = Pod::start(id, kind, &self.env).await?;
        pod.wait_ready(Duration::from_secs(20)).await?;
        Ok(pod)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Cmd::App { listen, name, listen_delay, health_delay, keepalive_idle }) = &args.command {
        let opts = drainproxy::demo_app::DemoAppOptions {
            listen: *listen,
            name: name.clone(),
            listen_delay: dur(listen_delay)?,
            health_delay: dur(health_delay)?,
            keepalive_idle: dur(keepalive_idle)?,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return rt.block_on(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let listener = drainproxy::demo_app::bind(&opts).await?;
            // Like a worker that never heard of graceful shutdown: SIGTERM ends it at once.
            drainproxy::demo_app::serve(listener, opts, async move { term.recv().await }).await;
            std::process::exit(0)
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.fronts = "haproxy,tcp,nginx".into();
        args.kinds = "native,app".into();
        args.replicas = 2;
        args.replacements = 4;
        args.lag = "0s-1s".into();
        args.get_rps = 300;
        args.get_conns = 8;
        args.post_rps = 10;
        args.slow_rps = 1;
        args.slow_ms = 1500;
        args.websockets = 2;
        args.ws_lifetime = "2s".into();
        args.min_ready = "300ms".into();
        args.scale_down = "none".into();
        args.no_control = true;
    }
    let (lo, hi) = args.lag.split_once('-').context("--lag takes MIN-MAX, e.g. 0s-3s")?;
    let lag = (dur(lo)?, dur(hi)?);
    if lag.0 > lag.1 {
        bail!("--lag: MIN must not exceed MAX");
    }
    if args.max_surge == 0 && args.max_unavailable == 0 {
        bail!("--max-surge and --max-unavailable cannot both be 0 (Kubernetes refuses it too)");
    }
    let min_delay = match &args.min_delay {
        Some(s) => dur(s)?,
        None => lag.1 + Duration::from_millis(1500),
    };
    let exe = std::env::current_exe()?;
    let drainproxy = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("drainproxy"))
        .filter(|p| p.exists())
        .context("the drainproxy binary is not next to this harness: run `cargo build --release` first")?;
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let env = PodEnv { harness: exe, drainproxy, dir: out.join("pods"), min_delay, grace: dur(&args.grace)? };

    let fronts: Vec<FrontKind> = args.fronts.split(',').map(FrontKind::parse).collect::<Result<_, _>>()?;
    let kinds: Vec<PodKind> = args.kinds.split(',').map(PodKind::parse).collect::<Result<_, _>>()?;
    let scale = match args.scale_down.as_str() {
        "none" | "" => None,
        s => {
            let (a, b) = s.split_once(':').context("--scale-down takes FROM:TO")?;
            Some((a.parse::<usize>()?, b.parse::<usize>()?))
        }
    };
    let mut scenarios = Vec::new();
    for &front in &fronts {
        if !args.no_control {
            scenarios.push(Scenario { front, kind: PodKind::AppOnly, pattern: Pattern::Control });
        }
        for &kind in &kinds {
            scenarios.push(Scenario { front, kind, pattern: Pattern::Rollout });
        }
        if let Some((a, b)) = scale {
            for &kind in kinds.iter().filter(|k| matches!(k, PodKind::Native | PodKind::AppOnly)) {
                scenarios.push(Scenario { front, kind, pattern: Pattern::ScaleDown(a, b) });
            }
        }
    }
    let ctx = Arc::new(Ctx {
        args,
        env,
        lag,
        next_pod: AtomicUsize::new(0),
        scenario_no: AtomicUsize::new(0),
        seed: AtomicUsize::new(0x9e37_79b9),
    });
    let started = chrono_like_now();
    eprintln!("{} scenarios; results in {}", scenarios.len(), out.display());
    let mut outcomes = Vec::new();
    for sc in scenarios {
        eprint!("{:<48} ", sc.name());
        let o = run_scenario(&ctx, sc, &out).await?;
        eprintln!(
            "sent {:>7}  failed {:>5}  rollout {:>5.1}s",
            o.stats.sent(),
            o.stats.failed(),
            o.duration.as_secs_f64()
        );
        outcomes.push(o);
    }
    let report = report(&ctx, &outcomes, &started);
    std::fs::write(out.join("results.md"), &report)?;
    std::fs::write(out.join("rollout.svg"), chart(&outcomes))?;
    std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes())?;
    if ctx.args.check {
        let mut bad = Vec::new();
        for o in &outcomes {
            if o.scenario.pattern != Pattern::Control && o.scenario.kind.has_drainproxy() && o.stats.failed() > 0 {
                bad.push(format!("{} lost {} requests", o.scenario.name(), o.stats.failed()));
            }
        }
        for &front in &fronts {
            let baseline_failed: u64 = outcomes
                .iter()
                .filter(|o| {
                    o.scenario.front == front
                        && o.scenario.kind == PodKind::AppOnly
                        && o.scenario.pattern == Pattern::Rollout
                })
                .map(|o| o.stats.failed())
                .sum();
            if kinds.contains(&PodKind::AppOnly) && baseline_failed == 0 {
                bad.push(format!("{}: the app-only baseline lost nothing, so this run proves nothing", front.name()));
            }
        }
        if !bad.is_empty() {
            bail!("check failed:\n  {}", bad.join("\n  "));
        }
        eprintln!("check passed: drainproxy lost nothing; the baseline lost requests");
    }
    Ok(())
}

/// The endpoints controller as one front end sees it: changes arrive in the order they
/// happened, each after a random propagation lag, never overtaking an earlier one (an
/// EndpointSlice consumer sees every state, only late).
struct Endpoints {
    tx: tokio::sync::mpsc::UnboundedSender<(Instant, bool, SocketAddr)>,
    done: tokio::task::JoinHandle<()>,
}

impl Endpoints {
    fn start(ctx: Arc<Ctx>, front: Arc<Front>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, bool, SocketAddr)>();
        let done = tokio::spawn(async move {
            let mut last = Instant::now();
            while let Some((at, add, addr)) = rx.recv().await {
                let due = (at + ctx.lag()).max(last);
                tokio::time::sleep_until(due.into()).await;
                let _ = if add { front.add(addr).await } else { front.remove(addr).await };
                last = due;
            }
        });
        Endpoints { tx, done }
    }
    fn add(&self, addr: SocketAddr) {
        let _ = self.tx.send((Instant::now(), true, addr));
    }
    fn remove(&self, addr: SocketAddr) {
        let _ = self.tx.send((Instant::now(), false, addr));
    }
    /// Waits until every change sent so far has been applied.
    async fn settle(self) {
        drop(self.tx);
        let _ = self.done.await;
    }
}

async fn run_scenario(ctx: &Arc<Ctx>, sc: Scenario, out: &std::path::Path) -> anyhow::Result<Outcome> {
    // Short directory names: HAProxy's admin socket path must fit in 108 bytes.
    let n = ctx.scenario_no.fetch_add(1, Relaxed);
    let front = Arc::new(Front::start(sc.front, out.join("f").join(n.to_string())).await?);
    let a = &ctx.args;
    let initial = match sc.pattern {
        Pattern::ScaleDown(from, _) => from,
        _ => a.replicas,
    };
    let mut pods = Vec::new();
    for _ in 0..initial {
        let pod = ctx.new_pod(sc.kind).await?;
        front.add(pod.serving()).await?;
        pods.push(pod);
    }
    // nginx applies a reload asynchronously: wait until the front end really routes.
    let mut routed = 0;
    for _ in 0..500 {
        routed =
            if pods::get_status(front.addr, "/", Duration::from_secs(1)).await == Some(200) { routed + 1 } else { 0 };
        if routed >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if routed < 20 {
        bail!("{} never routed to the initial pods", sc.front.name());
    }
    let t0 = Instant::now();
    let load = Load::start(
        LoadConfig {
            target: front.addr,
            get_rps: a.get_rps,
            get_conns: a.get_conns,
            post_rps: a.post_rps,
            slow_rps: a.slow_rps,
            slow_ms: a.slow_ms,
            websockets: a.websockets,
            ws_lifetime: dur(&a.ws_lifetime)?,
        },
        t0,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rollout_start = Instant::now();
    let mut marks = Vec::new();
    let mut deleting = Vec::new();
    let mut kept = Vec::new();
    let grace = ctx.env.grace;
    let endpoints = Endpoints::start(ctx.clone(), front.clone());
    // Deletion starts the kubelet and the endpoint removal at the same moment.
    let delete = |pod: Pod| {
        endpoints.remove(pod.serving());
        tokio::spawn(async move { pod.delete(grace).await })
    };
    match sc.pattern {
        Pattern::Rollout | Pattern::Control => {
            // The Deployment controller: `replacements` old pods are replaced by new ones, never
            // more than replicas + maxSurge pods and never fewer than replicas - maxUnavailable
            // ready ones; it waits minReadySeconds after each new pod is ready.
            // `fresh`: new pods of the current wave (the newest entries of `pods`); once every
            // running pod is new, the next wave replaces them in turn.
            let (mut created, mut deleted, mut fresh) = (0usize, 0usize, 0usize);
            while deleted < a.replacements {
                let mut progressed = false;
                while pods.len() < a.replicas + a.max_surge && created < a.replacements {
                    let new = ctx.new_pod(sc.kind).await?;
                    endpoints.add(new.serving());
                    pods.push(new);
                    created += 1;
                    fresh += 1;
                    progressed = true;
                    tokio::time::sleep(dur(&a.min_ready)?).await;
                }
                while pods.len() > a.replicas.saturating_sub(a.max_unavailable)
                    && pods.len() > fresh
                    && deleted < a.replacements
                {
                    let old = pods.remove(0);
                    deleted += 1;
                    marks.push(t0.elapsed());
                    if sc.pattern == Pattern::Control {
                        endpoints.remove(old.serving());
                        kept.push(old);
                    } else {
                        deleting.push(delete(old));
                    }
                    progressed = true;
                }
                if fresh >= pods.len() {
                    fresh = 0;
                    progressed = true;
                }
                if !progressed {
                    bail!(
                        "rollout cannot progress with maxSurge {} and maxUnavailable {}",
                        a.max_surge,
                        a.max_unavailable
                    );
                }
            }
        }
        Pattern::ScaleDown(_, to) => {
            marks.push(t0.elapsed());
            while pods.len() > to {
                let old = pods.remove(0);
                deleting.push(delete(old));
            }
        }
    }
    let mut deletions = Vec::new();
    for d in deleting {
        if let Ok(Ok(d)) = tokio::time::timeout(grace + Duration::from_secs(10), d).await {
            deletions.push(d);
        }
    }
    endpoints.settle().await;
    let duration = rollout_start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = load.stop().await;
    for p in pods.into_iter().chain(kept) {
        drop(p);
    }
    if let Ok(front) = Arc::try_unwrap(front) {
        front.stop().await;
    }
    Ok(Outcome { scenario: sc, stats, duration, deletions, marks })
}

fn chrono_like_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn report(ctx: &Ctx, outcomes: &[Outcome], started: &str) -> String {
    let a = &ctx.args;
    let mut s = String::new();
    let _ = writeln!(s, "# Rollout results\n");
    let _ = writeln!(
        s,
        "{started}; {} replicas (maxSurge {}, maxUnavailable {}), {} replacements per rollout, minReadySeconds {}, propagation lag {:?}-{:?}, drainproxy min_delay {:?}; \
         load: {} keep-alive GET/s on {} connections, {} POST/s, {} slow ({} ms)/s, {} WebSockets.\n",
        a.replicas,
        a.max_surge,
        a.max_unavailable,
        a.replacements,
        a.min_ready,
        ctx.lag.0,
        ctx.lag.1,
        ctx.env.min_delay,
        a.get_rps,
        a.get_conns,
        a.post_rps,
        a.slow_rps,
        a.slow_ms,
        a.websockets
    );
    let _ = writeln!(s, "| front end | pods | scenario | sent | failed | get | post | slow | ws | rollout s | drains (idle/forced) | propagation max s |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let k = |i: usize| o.stats.kinds[i].sent.load(Relaxed) - o.stats.kinds[i].ok.load(Relaxed);
        let drains: Vec<&serde_json::Value> = o.deletions.iter().filter_map(|d| d.drain.as_ref()).collect();
        let idle = drains.iter().filter(|d| d["drain"]["outcome"] == "idle").count();
        let forced = drains.iter().filter(|d| d["drain"]["outcome"] == "forced").count();
        let prop = drains.iter().filter_map(|d| d["drain"]["last_request_seconds"].as_f64()).fold(0.0f64, f64::max);
        let pattern = match o.scenario.pattern {
            Pattern::Rollout => "rollout".to_string(),
            Pattern::ScaleDown(x, y) => format!("scale {x}→{y}"),
            Pattern::Control => "control".to_string(),
        };
        let kind = if o.scenario.pattern == Pattern::Control { "-" } else { o.scenario.kind.name() };
        let drains_cell = if o.scenario.kind.has_drainproxy() { format!("{idle}/{forced}") } else { "-".into() };
        let prop_cell = if drains.is_empty() { "-".into() } else { format!("{prop:.2}") };
        let _ = writeln!(
            s,
            "| {} | {kind} | {pattern} | {} | **{}** | {} | {} | {} | {} | {:.1} | {drains_cell} | {prop_cell} |",
            o.scenario.front.name(),
            o.stats.sent(),
            o.stats.failed(),
            k(0),
            k(1),
            k(2),
            k(3),
            o.duration.as_secs_f64()
        );
    }
    let _ = writeln!(s, "\nFailure reasons:\n");
    for o in outcomes.iter().filter(|o| o.stats.failed() > 0) {
        let mut reasons = Vec::new();
        for (i, kind) in load::KINDS.iter().enumerate() {
            for (r, n) in o.stats.kinds[i].failures.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                reasons.push(format!("{kind} {r}: {n}"));
            }
        }
        let killed = o.deletions.iter().filter(|d| d.killed).count();
        let _ = writeln!(
            s,
            "- {}: {}{}",
            o.scenario.name(),
            reasons.join(", "),
            if killed > 0 { format!(" ({killed} pods SIGKILLed at the grace period)") } else { String::new() }
        );
    }
    s
}

/// Small multiples: successful and failed requests per second over time, one row per
/// scenario, with a tick at each pod deletion.
fn chart(outcomes: &[Outcome]) -> String {
    let (w, row_h, left, top) = (960.0, 70.0, 300.0, 40.0);
    let plot_w = w - left - 20.0;
    let h = top + row_h * outcomes.len() as f64 + 30.0;
    let max_t =
        outcomes.iter().map(|o| o.stats.buckets.lock().map(|b| b.len()).unwrap_or(0)).max().unwrap_or(1).max(1) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"10\" y=\"20\" font-size=\"14\">Requests per second (grey) and failures per second (red) during each scenario; ticks mark pod deletions</text>"
    );
    for (i, o) in outcomes.iter().enumerate() {
        let y0 = top + row_h * i as f64;
        let buckets = o.stats.buckets.lock().map(|b| b.clone()).unwrap_or_default();
        let peak = buckets.iter().map(|b| b[0] + b[1]).max().unwrap_or(1).max(1) as f64;
        let x = |t: f64| left + plot_w * t / max_t;
        let y = |v: f64| y0 + row_h - 12.0 - (row_h - 20.0) * v / peak;
        let color = if o.stats.failed() == 0 { "#1a7f37" } else { "#cf222e" };
        let _ = write!(
            s,
            "<text x=\"10\" y=\"{:.1}\">{}</text><text x=\"10\" y=\"{:.1}\" fill=\"{color}\">{} failed of {}</text>",
            y0 + 28.0,
            xml(&o.scenario.name()),
            y0 + 44.0,
            o.stats.failed(),
            o.stats.sent()
        );
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ccc\"/>",
            y(0.0),
            left + plot_w,
            y(0.0)
        );
        let mut path = String::new();
        for (t, b) in buckets.iter().enumerate() {
            let _ = write!(path, "{}{:.1},{:.1}", if t == 0 { "M" } else { " L" }, x(t as f64), y(f64::from(b[0])));
        }
        let _ = write!(s, "<path d=\"{path}\" fill=\"none\" stroke=\"#888\" stroke-width=\"1\"/>");
        for (t, b) in buckets.iter().enumerate().filter(|(_, b)| b[1] > 0) {
            let bar = (row_h - 20.0) * f64::from(b[1]) / peak;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"2\" height=\"{:.1}\" fill=\"#cf222e\"/>",
                x(t as f64),
                y(0.0) - bar.max(2.0),
                bar.max(2.0)
            );
        }
        for m in &o.marks {
            let mx = x(m.as_secs_f64() / load::BUCKET.as_secs_f64());
            let _ = write!(
                s,
                "<line x1=\"{mx:.1}\" y1=\"{:.1}\" x2=\"{mx:.1}\" y2=\"{:.1}\" stroke=\"#0969da\"/>",
                y(0.0),
                y(0.0) + 5.0
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{left}\" y=\"{:.1}\">0 s</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0} s</text></svg>",
        h - 8.0,
        left + plot_w,
        h - 8.0,
        max_t * load::BUCKET.as_secs_f64()
    );
    s.push('\n');
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
