//! The one owner of the phase (DESIGN §3–§4): consumes health verdicts, drain triggers and
//! signals, runs the drain timeline, opens and closes the proxy listener, and decides exit.
//!
//! Everyone else reads the published [`State`] from a `watch` channel; nothing else writes
//! it. This module makes decisions only; it never touches a client connection itself.
//! Connections react to the published state (`server.rs`).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;
use tracing::{info, warn};

use crate::activity::Activity;
use crate::config::{DrainConfig, WarmupConfig};
use crate::hooks::{Hooks, When};
use crate::metrics::Metrics;
use crate::server::ProxyListener;
use crate::warmup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Unhealthy = 2,
    Draining = 3,
    Drained = 4,
}

impl Phase {
    pub const ALL: [Phase; 5] = [Phase::Starting, Phase::Ready, Phase::Unhealthy, Phase::Draining, Phase::Drained];
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Unhealthy => "unhealthy",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
        }
    }
    /// From t=0 of a drain until resume: HTTP/1.1 responses carry `Connection: close` and
    /// HTTP/2 connections get GOAWAY.
    pub fn is_draining(self) -> bool {
        matches!(self, Phase::Draining | Phase::Drained)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Http,
    Sigterm,
    Sigint,
}

impl Trigger {
    pub const ALL: [Trigger; 3] = [Trigger::Http, Trigger::Sigterm, Trigger::Sigint];
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Http => "http",
            Trigger::Sigterm => "sigterm",
            Trigger::Sigint => "sigint",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Idle,
    Forced,
}

impl Outcome {
    pub const ALL: [Outcome; 2] = [Outcome::Idle, Outcome::Forced];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Idle => "idle",
            Outcome::Forced => "forced",
        }
    }
}

/// The current or last drain, as `/status`, `/drain` and the drain log line report it.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    pub trigger: Trigger,
    /// Unix time of t=0, in seconds.
    pub started_at: f64,
    #[serde(skip)]
    pub started: Instant,
    pub outcome: Option<Outcome>,
    /// t=0 to release.
    pub duration_seconds: Option<f64>,
    pub requests_after_start: u64,
    /// t=0 to the newest request received since: the measured propagation delay.
    pub last_request_seconds: Option<f64>,
    pub inflight_at_release: Option<usize>,
}

/// The published state. Cloned by readers only when they need more than a field or two.
#[derive(Debug, Clone)]
pub struct State {
    pub phase: Phase,
    pub reason: &'static str,
    pub app_healthy: Option<bool>,
    /// `min_delay` has passed (or the drain is over): idle HTTP/1.1 keep-alives close now.
    pub close_idle: bool,
    /// Forced release: upgraded connections still open are closed now.
    pub force_close: bool,
    pub drain: Option<DrainReport>,
}

impl State {
    fn initial() -> Self {
        State {
            phase: Phase::Starting,
            reason: "process started",
            app_healthy: None,
            close_idle: false,
            force_close: false,
            drain: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Int,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthReport {
    /// This probe passed.
    pub ok: bool,
    /// The verdict after `healthy_threshold`/`unhealthy_threshold`, once there is one.
    pub verdict: Option<bool>,
}

#[derive(Debug)]
pub enum Event {
    /// One health probe's result (sent for every probe).
    Health(HealthReport),
    Drain(Trigger),
    Signal(Signal),
    /// The warm-up with number `n` has ended: every request sent, or cut at `warmup.timeout`.
    WarmedUp {
        n: u64,
        complete: bool,
    },
}

/// How the process should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Released and stopped by a signal.
    Drained,
    /// SIGQUIT (or a stop before any release): exit at once.
    Abandoned,
}

pub struct Lifecycle {
    tx: watch::Sender<State>,
    events: mpsc::Receiver<Event>,
    cfg: DrainConfig,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    listener: ProxyListener,
    /// A stop signal (SIGTERM/SIGINT) arrived: once released, exit; never resume.
    stop_requested: bool,
    warmup: Option<Warmup>,
    hooks: Hooks,
}

/// The app warm-up (DESIGN §5) the lifecycle runs before it turns ready.
pub struct Warmup {
    cfg: Arc<WarmupConfig>,
    target: warmup::Target,
    /// Weak: the lifecycle must still see every other sender go.
    events: mpsc::WeakSender<Event>,
    /// The app instance has been warmed up (until it restarts).
    done: bool,
    /// The warm-up running now: its number and its task.
    running: Option<(u64, tokio::task::AbortHandle)>,
    started: u64,
}

impl Warmup {
    /// `None` when no warm-up request is configured.
    pub fn new(cfg: &WarmupConfig, target: warmup::Target, events: &mpsc::Sender<Event>) -> Option<Self> {
        (!cfg.requests.is_empty()).then(|| Warmup {
            cfg: Arc::new(cfg.clone()),
            target,
            events: events.downgrade(),
            done: false,
            running: None,
            started: 0,
        })
    }

    /// Starts a warm-up unless one is running; the lifecycle hears of its end as
    /// [`Event::WarmedUp`].
    fn start(&mut self, metrics: &Arc<Metrics>) {
        if self.running.is_some() {
            return;
        }
        let Some(events) = self.events.upgrade() else { return };
        self.started += 1;
        let n = self.started;
        let (cfg, target, metrics) = (self.cfg.clone(), self.target.clone(), metrics.clone());
        let task = tokio::spawn(async move {
            let complete = !warmup::run(&cfg, &target, &metrics).await.timed_out;
            let _ = events.send(Event::WarmedUp { n, complete }).await;
        });
        self.running = Some((n, task.abort_handle()));
    }

    /// Stops a running warm-up; it starts over when next asked.
    fn stop(&mut self, why: &str) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
            info!(why, "warm-up stopped");
        }
    }

    /// Whether `n` is the running warm-up, which is then over and the app warm.
    fn finished(&mut self, n: u64) -> bool {
        if self.running.as_ref().is_some_and(|(r, _)| *r == n) {
            self.running = None;
            self.done = true;
            return true;
        }
        false
    }
}

/// Creates the state channel, readable by everyone, before the owner is built.
pub fn channel() -> (watch::Sender<State>, watch::Receiver<State>) {
    watch::channel(State::initial())
}

impl Lifecycle {
    pub fn new(
        tx: watch::Sender<State>,
        events: mpsc::Receiver<Event>,
        cfg: DrainConfig,
        activity: Arc<Activity>,
        metrics: Arc<Metrics>,
        listener: ProxyListener,
    ) -> Self {
        metrics.set_phase(Phase::Starting);
        Lifecycle {
            tx,
            events,
            cfg,
            activity,
            metrics,
            listener,
            stop_requested: false,
            warmup: None,
            hooks: Hooks::default(),
        }
    }

    /// Registry hooks: `on_ready` each time the proxy turns ready from `starting` or on a
    /// resume (not after a spell of `unhealthy`: nothing was deregistered), `on_drain` when a
    /// drain starts.
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Warms the app up before every turn to ready from `starting` (see [`Warmup`]).
    pub fn with_warmup(mut self, warmup: Option<Warmup>) -> Self {
        self.warmup = warmup;
        self
    }

    /// The app passed its health check in `starting`, `unhealthy` or on resume: ready now,
    /// or once a warm-up of this app instance has run.
    fn app_ready(&mut self, reason: &'static str) {
        match &mut self.warmup {
            Some(w) if !w.done => {
                w.start(&self.metrics);
                self.set_phase(Phase::Starting, "app healthy; warming it up");
            }
            _ => self.set_phase(Phase::Ready, reason),
        }
    }

    fn phase(&self) -> Phase {
        self.tx.borrow().phase
    }

    fn set_phase(&self, phase: Phase, reason: &'static str) {
        let from = self.phase();
        self.tx.send_if_modified(|s| {
            let changed = s.phase != phase || s.reason != reason;
            s.phase = phase;
            s.reason = reason;
            changed
        });
        self.metrics.set_phase(phase);
        if from != phase {
            info!(from = from.as_str(), to = phase.as_str(), reason, "phase changed");
            if phase == Phase::Ready && from != Phase::Unhealthy {
                self.hooks.run(When::OnReady, &self.metrics);
            }
        }
    }

    /// Publishes the app's health only when it changed: every publish wakes every
    /// connection task, and probes arrive every `health.interval`.
    fn set_health(&self, healthy: bool) {
        self.tx.send_if_modified(|s| s.app_healthy.replace(healthy) != Some(healthy));
    }

    /// Runs until the process should exit.
    pub async fn run(mut self) -> Exit {
        // Set while drained: the app went down after the release, so a healthy verdict
        // means it restarted (a container restart, not a pod deletion).
        let mut app_went_down = false;
        loop {
            let Some(event) = self.events.recv().await else {
                // Every sender is gone: nothing can trigger anything any more.
                return Exit::Abandoned;
            };
            let phase = self.phase();
            match event {
                Event::Health(report) => {
                    if let Some(v) = report.verdict {
                        self.set_health(v);
                    }
                    match (phase, report.verdict) {
                        (Phase::Starting | Phase::Unhealthy, Some(true)) => self.app_ready("app healthy"),
                        (Phase::Starting, Some(false)) => {
                            if let Some(w) = &mut self.warmup {
                                w.stop("the app failed its health check");
                            }
                        }
                        (Phase::Ready, Some(false)) => self.set_phase(Phase::Unhealthy, "app health check failing"),
                        // Any failed probe after release counts: a quick container restart
                        // may never reach unhealthy_threshold.
                        (Phase::Drained, _) if !report.ok => app_went_down = true,
                        (Phase::Drained, Some(true)) if app_went_down && !self.stop_requested => {
                            match self.listener.reopen() {
                                Ok(()) => {
                                    app_went_down = false;
                                    self.tx.send_modify(|s| {
                                        s.close_idle = false;
                                        s.force_close = false;
                                    });
                                    // A restarted app is cold again.
                                    if let Some(w) = &mut self.warmup {
                                        w.done = false;
                                    }
                                    self.app_ready("app restarted and healthy: resumed");
                                }
                                Err(error) => {
                                    warn!(%error, "cannot reopen the listener to resume; will retry on the next health probe");
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Event::Drain(trigger) => {
                    if phase == Phase::Drained {
                        info!(trigger = trigger.as_str(), "drain requested again; already released");
                    } else if let Some(exit) = self.drain(trigger).await {
                        return exit;
                    } else {
                        app_went_down = false;
                    }
                }
                Event::WarmedUp { n, complete } => {
                    let finished = self.warmup.as_mut().is_some_and(|w| w.finished(n));
                    if finished && phase == Phase::Starting && self.tx.borrow().app_healthy == Some(true) {
                        let reason = if complete {
                            "app healthy and warmed up"
                        } else {
                            "app healthy; warm-up cut at its timeout"
                        };
                        self.set_phase(Phase::Ready, reason);
                    }
                }
                Event::Signal(Signal::Quit) => return self.quit(),
                Event::Signal(sig @ (Signal::Term | Signal::Int)) => {
                    if phase == Phase::Drained {
                        info!(signal = ?sig, "stop signal after release: exiting");
                        return self.exit_after_inflight().await;
                    }
                    self.stop_requested = true;
                    let trigger = if sig == Signal::Term { Trigger::Sigterm } else { Trigger::Sigint };
                    if let Some(exit) = self.drain(trigger).await {
                        return exit;
                    }
                }
            }
            if self.stop_requested && self.phase() == Phase::Drained {
                return self.exit_after_inflight().await;
            }
        }
    }

    fn quit(&self) -> Exit {
        let released = self.phase() == Phase::Drained;
        warn!(released, "SIGQUIT: exiting now");
        if released {
            Exit::Drained
        } else {
            Exit::Abandoned
        }
    }

    /// After release and a stop signal: let what is still in flight finish, bounded by
    /// `drain.exit_grace`.
    async fn exit_after_inflight(&self) -> Exit {
        let grace = self.cfg.exit_grace.0;
        match tokio::time::timeout(grace, self.activity.wait_idle()).await {
            Ok(()) => info!("exiting: nothing in flight"),
            Err(_) => warn!(
                inflight = self.activity.inflight(),
                grace_ms = grace.as_millis() as u64,
                "exiting with requests still in flight after drain.exit_grace"
            ),
        }
        Exit::Drained
    }

    /// Runs one drain to release (DESIGN §4.2). Returns `Some` when the process must exit
    /// before the drain finished (SIGQUIT), else `None` once released.
    async fn drain(&mut self, trigger: Trigger) -> Option<Exit> {
        if let Some(w) = &mut self.warmup {
            w.stop("a drain started");
        }
        let t0 = Instant::now();
        let min_deadline = t0 + self.cfg.min_delay.0;
        let max_deadline = t0 + self.cfg.max_duration.0;
        let quiet = self.cfg.quiet_period.0;
        let started_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let requests_before = self.metrics.drain_requests.get();
        self.tx.send_modify(|s| {
            s.close_idle = false;
            s.force_close = false;
            s.drain = Some(DrainReport {
                trigger,
                started_at,
                started: t0,
                outcome: None,
                duration_seconds: None,
                requests_after_start: 0,
                last_request_seconds: None,
                inflight_at_release: None,
            });
        });
        self.set_phase(Phase::Draining, trigger_reason(trigger));
        self.hooks.run(When::OnDrain, &self.metrics);
        info!(
            trigger = trigger.as_str(),
            min_delay_ms = self.cfg.min_delay.0.as_millis() as u64,
            quiet_period_ms = quiet.as_millis() as u64,
            max_duration_ms = self.cfg.max_duration.0.as_millis() as u64,
            inflight = self.activity.inflight(),
            "drain started: readiness off, connections told to close"
        );

        let outcome = loop {
            let now = Instant::now();
            if now >= min_deadline && !self.tx.borrow().close_idle {
                self.tx.send_modify(|s| s.close_idle = true);
                info!("min_delay reached: closing idle keep-alive connections");
            }
            if now >= max_deadline {
                break Outcome::Forced;
            }
            let inflight = self.activity.inflight();
            let quiet_from = self.activity.last_request().map_or(t0, |t| t + quiet);
            let releasable_at = min_deadline.max(quiet_from);
            if inflight == 0 && now >= releasable_at {
                break Outcome::Idle;
            }
            let mut wake = max_deadline;
            if !self.tx.borrow().close_idle {
                wake = wake.min(min_deadline);
            }
            if inflight == 0 {
                wake = wake.min(releasable_at);
            }
            tokio::select! {
                _ = self.activity.wait_idle(), if inflight > 0 => {}
                _ = sleep_until(wake.into()) => {}
                event = self.events.recv() => match event {
                    Some(Event::Health(report)) => {
                        if let Some(v) = report.verdict {
                            self.set_health(v);
                        }
                    }
                    Some(Event::Drain(t)) => info!(trigger = t.as_str(), "joined the drain in progress"),
                    Some(Event::Signal(Signal::Quit)) => return Some(self.quit()),
                    Some(Event::Signal(sig)) => {
                        info!(signal = ?sig, "stop signal during drain: will exit after release");
                        self.stop_requested = true;
                    }
                    // Stopped when the drain started; a late report changes nothing.
                    Some(Event::WarmedUp { .. }) | None => {}
                },
            }
        };

        // Release: stop accepting first, so that when `/drain` callers are answered (they
        // wait for `drained`) a late connection attempt is already refused.
        self.listener.close().await;
        let released = Instant::now();
        let inflight = self.activity.inflight();
        let duration = released.duration_since(t0);
        let requests = self.metrics.drain_requests.get() - requests_before;
        let last_request = self.activity.last_request().filter(|t| *t >= t0).map(|t| t.duration_since(t0));
        self.metrics.drain_finished(trigger, outcome, duration.as_secs_f64());
        if let Some(d) = last_request {
            self.metrics.drain_last_request.set(d.as_secs_f64());
        }
        self.tx.send_modify(|s| {
            s.close_idle = true;
            s.force_close = outcome == Outcome::Forced;
            if let Some(r) = s.drain.as_mut() {
                r.outcome = Some(outcome);
                r.duration_seconds = Some(duration.as_secs_f64());
                r.requests_after_start = requests;
                r.last_request_seconds = last_request.map(|d| d.as_secs_f64());
                r.inflight_at_release = Some(inflight);
            }
        });
        self.set_phase(Phase::Drained, release_reason(outcome));
        let last_request_ms = last_request.map_or(-1, |d| d.as_millis() as i64);
        // One line per drain with everything measured; a forced release is a warning.
        macro_rules! drain_report {
            ($level:ident, $message:literal) => {
                $level!(
                    trigger = trigger.as_str(),
                    outcome = outcome.as_str(),
                    duration_ms = duration.as_millis() as u64,
                    requests_after_start = requests,
                    last_request_ms,
                    inflight_at_release = inflight,
                    $message
                )
            };
        }
        match outcome {
            Outcome::Forced => {
                drain_report!(warn, "drain report: forced release at max_duration with requests in flight")
            }
            Outcome::Idle => drain_report!(info, "drain report: released on measured idleness"),
        }
        None
    }
}

fn trigger_reason(t: Trigger) -> &'static str {
    match t {
        Trigger::Http => "drain requested on /drain",
        Trigger::Sigterm => "drain started by SIGTERM",
        Trigger::Sigint => "drain started by SIGINT",
    }
}

fn release_reason(o: Outcome) -> &'static str {
    match o {
        Outcome::Idle => "released: idle for quiet_period after min_delay",
        Outcome::Forced => "released: max_duration reached",
    }
}
