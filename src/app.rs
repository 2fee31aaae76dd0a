//! Wiring: binds the listeners, builds the shared values and starts the tasks. `start` is
//! what the binary runs and what in-process tests drive; it takes a validated `Config`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::activity::Activity;
use crate::admin::Admin;
use crate::body::Accounting;
use crate::config::Config;
use crate::cork::Releases;
use crate::hooks::Hooks;
use crate::lifecycle::{self, Event, Exit, Lifecycle, Signal, State, Warmup};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::server::{self, ConnCtx, ProxyListener};
use crate::upstream::Upstream;

/// Options that differ between the binary and in-process tests.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Install SIGTERM/SIGINT/SIGQUIT handlers (the binary does; tests send events instead).
    pub signals: bool,
    /// The releases of held HTTP/2 writes that the runtime's park hook calls (see
    /// [`runtime`] and `cork`). Without them, the watchdog alone releases, within 2 ms.
    pub releases: Option<Arc<Releases>>,
}

/// A running drainproxy.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: watch::Receiver<State>,
    pub events: mpsc::Sender<Event>,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
    /// Resolves when the lifecycle decides the process should end.
    pub exit: JoinHandle<Exit>,
    /// The admin, health and signal tasks; aborted when this value is dropped.
    pub tasks: Tasks,
}

/// Aborts the tasks it holds when dropped, so an in-process drainproxy stops completely.
#[derive(Default)]
pub struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

pub async fn start(cfg: Config, opts: StartOptions) -> anyhow::Result<Running> {
    let app_addr = cfg
        .upstream
        .address
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve upstream.address {:?}", cfg.upstream.address))?
        .next()
        .with_context(|| format!("upstream.address {:?} resolves to nothing", cfg.upstream.address))?;
    // Templates are filled in before anything is bound: a missing variable stops start-up.
    let hooks = Hooks::prepare(&cfg.hooks, |name| std::env::var(name).ok())?;
    let tls = cfg.tls.as_ref().map(crate::tls::load).transpose()?;
    let proxy_listener =
        server::bind(cfg.listen).with_context(|| format!("cannot bind listen address {}", cfg.listen))?;
    let admin_listener = server::bind(cfg.admin).with_context(|| format!("cannot bind admin address {}", cfg.admin))?;
    let admin_addr = admin_listener.local_addr()?;

    let metrics = Arc::new(Metrics::new());
    let activity = Arc::new(Activity::new());
    let acct = Arc::new(Accounting { metrics: metrics.clone(), activity: activity.clone() });
    let (state_tx, state_rx) = lifecycle::channel();
    let (events_tx, events_rx) = mpsc::channel(64);
    let upstream = Arc::new(Upstream::new(&cfg.upstream, app_addr, metrics.connect_resends.clone()));
    let proxy = Arc::new(Proxy::new(
        acct.clone(),
        state_rx.clone(),
        upstream.clone(),
        cfg.drain.retry_after.0,
        cfg.log.access_log,
    ));
    let releases = opts.releases.unwrap_or_default();
    let (acceptor, reloader) = tls.unzip();
    let ctx = Arc::new(
        ConnCtx::new(proxy, &cfg.limits, releases.clone())
            .with_tls(acceptor)
            .with_fast_path(cfg.runtime.http1_fast_path),
    );
    let listener = ProxyListener::start(proxy_listener, ctx)?;
    let proxy_addr = listener.local_addr();

    let admin = Arc::new(Admin {
        state: state_rx.clone(),
        events: events_tx.clone(),
        acct: acct.clone(),
        upstream: upstream.clone(),
        token: cfg.drain.token.clone(),
        header_read_timeout: cfg.limits.header_read_timeout.0,
        tls: cfg.tls.is_some(),
    });
    let mut tasks = Tasks::default();
    tasks.0.push(upstream.spawn_reaper());
    tasks.0.push(tokio::spawn(releases.watchdog()));
    if let Some(reloader) = reloader {
        reloader.report(&metrics);
        tasks.0.push(tokio::spawn(reloader.run(metrics.clone())));
    }
    let admin_listener = crate::accepted::Listener::new(admin_listener).context("cannot watch the admin listener")?;
    tasks.0.push(tokio::spawn(admin::serve(admin_listener, admin, std::future::pending::<()>())));
    tasks.0.push(tokio::spawn(crate::health::run(cfg.health.clone(), app_addr, events_tx.clone(), metrics.clone())));
    if opts.signals {
        tasks.0.extend(spawn_signal_handlers(events_tx.clone())?);
    }
    let warmup_target = crate::warmup::Target {
        app: app_addr,
        protocol: cfg.upstream.protocol,
        connect_timeout: cfg.upstream.connect_timeout.0,
    };
    let life = Lifecycle::new(state_tx, events_rx, cfg.drain.clone(), activity.clone(), metrics.clone(), listener)
        .with_warmup(Warmup::new(&cfg.warmup, warmup_target, &events_tx))
        .with_hooks(hooks);
    let exit = tokio::spawn(life.run());
    info!(
        listen = %proxy_addr,
        admin = %admin_addr,
        upstream = %app_addr,
        protocol = ?cfg.upstream.protocol,
        threads = cfg.runtime.threads,
        tls = cfg.tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "drainproxy started"
    );
    Ok(Running { proxy_addr, admin_addr, state: state_rx, events: events_tx, metrics, activity, exit, tasks })
}

use crate::admin;

fn spawn_signal_handlers(events: mpsc::Sender<Event>) -> std::io::Result<Vec<JoinHandle<()>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut handles = Vec::new();
    for (kind, sig) in [
        (SignalKind::terminate(), Signal::Term),
        (SignalKind::interrupt(), Signal::Int),
        (SignalKind::quit(), Signal::Quit),
    ] {
        let mut stream = signal(kind)?;
        let events = events.clone();
        handles.push(tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!(signal = ?sig, "signal received");
                if events.send(Event::Signal(sig)).await.is_err() {
                    return;
                }
            }
        }));
    }
    Ok(handles)
}

/// The runtime `runtime.threads` asks for: `current_thread` for one. Each worker releases
/// the held HTTP/2 flushes when it runs out of work.
pub fn runtime(threads: usize, releases: Arc<Releases>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().on_thread_park(move || releases.release()).build()
}

/// Builds the runtime and runs until exit.
pub fn run_blocking(cfg: Config) -> anyhow::Result<Exit> {
    let releases = Arc::new(Releases::default());
    let rt = runtime(cfg.runtime.threads, releases.clone())?;
    let exit = rt.block_on(async move {
        let running = start(cfg, StartOptions { signals: true, releases: Some(releases) }).await?;
        let exit = running.exit.await.context("lifecycle task failed");
        drop(running.tasks);
        exit
    });
    // Connection tasks still running are abandoned: the decision to exit was already made.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    exit
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    #[test]
    fn each_runtime_releases_held_flushes_once_it_runs_out_of_work() {
        for threads in [1, 2] {
            let releases = Arc::new(Releases::default());
            let rt = runtime(threads, releases.clone()).unwrap();
            // No watchdog runs: only the park hook can wake this task.
            let held = rt.spawn(async move {
                let mut generation = None;
                std::future::poll_fn(|cx| match generation {
                    None => {
                        generation = Some(releases.hold(cx.waker()));
                        Poll::Pending
                    }
                    Some(g) => Poll::Ready(releases.released_since(g)),
                })
                .await
            });
            let released = rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), held).await });
            assert!(matches!(released, Ok(Ok(true))), "threads {threads}: {released:?}");
        }
    }
}
