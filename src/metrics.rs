//! Prometheus metrics. A `Metrics` value owns its registry (no globals, so every test starts
//! from zero) and holds every per-request handle resolved in advance: the request path never
//! looks up a label.
//!
//! Gauges that mirror live counters (in flight, open connections) are filled in at scrape
//! time from the counters that own them, so the hot path updates one atomic, not two.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::error::{RetryReason, UpstreamErrorKind};
use crate::lifecycle::{Outcome, Phase, Trigger};

pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
pub const PROTOCOLS: [&str; 2] = ["http1", "http2"];

/// How the drain told a connection to leave.
#[derive(Debug, Clone, Copy)]
pub enum CloseHow {
    /// An HTTP/1.1 response carried `Connection: close`.
    ConnectionClose = 0,
    /// An HTTP/2 connection got a graceful GOAWAY.
    Goaway = 1,
    /// An idle HTTP/1.1 keep-alive was closed at `min_delay`.
    IdleClose = 2,
}
const CLOSE_HOW: [&str; 3] = ["connection_close", "goaway", "idle_close"];

pub struct Metrics {
    registry: Registry,
    /// `[code class][phase]`
    requests: Vec<[IntCounter; Phase::ALL.len()]>,
    pub request_duration: Histogram,
    inflight: IntGauge,
    connections_open: [IntGauge; 2],
    upstream_errors: Vec<IntCounter>,
    retry_hints: Vec<IntCounter>,
    phase: Vec<IntGauge>,
    /// By [`Trigger`] and [`Outcome`], each at 0 from the start: a pod drains once, at the
    /// end of its life, and `increase()` sees a counter's first step only from a scraped 0.
    drains: Vec<[IntCounter; Outcome::ALL.len()]>,
    pub drain_duration: Gauge,
    pub drain_requests: IntCounter,
    pub drain_last_request: Gauge,
    connections_closed: [IntCounter; 3],
    pub app_healthy: IntGauge,
    pub connect_resends: IntCounter,
    /// `[2xx, other status, no answer]`, see [`WARMUP_OUTCOMES`].
    pub warmup_requests: [IntCounter; 3],
    /// `[on_ready, on_drain][ok, failed]`.
    hook_calls: [[IntCounter; 2]; 2],
    /// `[ok, failed, timeout]`, see [`TLS_HANDSHAKE_OUTCOMES`].
    pub tls_handshakes: [IntCounter; 3],
    /// `[ok, failed]`.
    pub tls_reloads: [IntCounter; 2],
    pub tls_not_after: Gauge,
}

/// The `outcome` label of `drainproxy_tls_handshakes_total`.
pub const TLS_HANDSHAKE_OUTCOMES: [&str; 3] = ["ok", "failed", "timeout"];

/// The `outcome` label of `drainproxy_warmup_requests_total`.
pub const WARMUP_OUTCOMES: [&str; 3] = ["2xx", "other_status", "no_answer"];

impl Metrics {
    pub fn new() -> Self {
        Self::build().expect("metric definitions are static and valid")
    }

    fn build() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("drainproxy".into()), None)?;
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);

        let requests_vec = IntCounterVec::new(
            Opts::new("requests_total", "Requests answered, by status class and the phase they arrived in"),
            &["code_class", "phase"],
        )?;
        reg(Box::new(requests_vec.clone()))?;
        let requests = CODE_CLASSES
            .iter()
            .map(|class| Phase::ALL.map(|p| requests_vec.with_label_values(&[class, p.as_str()])))
            .collect();

        let request_duration = Histogram::with_opts(
            HistogramOpts::new("request_duration_seconds", "Time from request head to the end of the response body")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
        )?;
        reg(Box::new(request_duration.clone()))?;

        let inflight = IntGauge::new("requests_inflight", "Requests between head and end of response")?;
        reg(Box::new(inflight.clone()))?;

        let conns = IntGaugeVec::new(Opts::new("connections_open", "Open client connections"), &["protocol"])?;
        reg(Box::new(conns.clone()))?;
        let connections_open = PROTOCOLS.map(|p| conns.with_label_values(&[p]));

        let upstream_vec =
            IntCounterVec::new(Opts::new("upstream_errors_total", "Failures talking to the app, by kind"), &["kind"])?;
        reg(Box::new(upstream_vec.clone()))?;
        let upstream_errors =
            UpstreamErrorKind::ALL.iter().map(|k| upstream_vec.with_label_values(&[k.as_str()])).collect();

        let hints_vec = IntCounterVec::new(
            Opts::new("retry_hints_total", "Requests answered 503 with a retry hint (not forwarded), by reason"),
            &["reason"],
        )?;
        reg(Box::new(hints_vec.clone()))?;
        let retry_hints = RetryReason::ALL.iter().map(|r| hints_vec.with_label_values(&[r.as_str()])).collect();

        let phase_vec = IntGaugeVec::new(Opts::new("phase", "1 for the current phase, 0 for the others"), &["phase"])?;
        reg(Box::new(phase_vec.clone()))?;
        let phase = Phase::ALL.iter().map(|p| phase_vec.with_label_values(&[p.as_str()])).collect();

        let drains = IntCounterVec::new(
            Opts::new("drains_total", "Completed drains, by trigger and outcome"),
            &["trigger", "outcome"],
        )?;
        reg(Box::new(drains.clone()))?;
        let drains = Trigger::ALL
            .iter()
            .map(|t| Outcome::ALL.map(|o| drains.with_label_values(&[t.as_str(), o.as_str()])))
            .collect();

        let drain_duration = Gauge::new("drain_duration_seconds", "Duration of the last drain, start to release")?;
        reg(Box::new(drain_duration.clone()))?;
        let drain_requests = IntCounter::new("drain_requests_total", "Requests received after a drain started")?;
        reg(Box::new(drain_requests.clone()))?;
        let drain_last_request = Gauge::new(
            "drain_last_request_seconds",
            "Seconds from drain start to the last new request: the measured propagation delay",
        )?;
        reg(Box::new(drain_last_request.clone()))?;

        let closed_vec = IntCounterVec::new(
            Opts::new("drain_connections_closed_total", "Client connections told to leave by the drain, by how"),
            &["how"],
        )?;
        reg(Box::new(closed_vec.clone()))?;
        let connections_closed = CLOSE_HOW.map(|h| closed_vec.with_label_values(&[h]));

        let app_healthy = IntGauge::new("app_healthy", "1 when the app passes its health check")?;
        reg(Box::new(app_healthy.clone()))?;

        let connect_resends = IntCounter::new(
            "upstream_connect_resends_total",
            "Fresh connect attempts to the app after earlier ones went unanswered (its accept queue was full)",
        )?;
        reg(Box::new(connect_resends.clone()))?;

        let warmup_vec = IntCounterVec::new(
            Opts::new("warmup_requests_total", "Warm-up requests sent to the app before readiness, by outcome"),
            &["outcome"],
        )?;
        reg(Box::new(warmup_vec.clone()))?;
        let warmup_requests = WARMUP_OUTCOMES.map(|o| warmup_vec.with_label_values(&[o]));

        let hooks_vec = IntCounterVec::new(
            Opts::new("hook_calls_total", "Registry hook calls, by hook list and outcome (ok: answered 2xx)"),
            &["hook", "outcome"],
        )?;
        reg(Box::new(hooks_vec.clone()))?;
        let hook_calls =
            ["on_ready", "on_drain"].map(|h| ["ok", "failed"].map(|o| hooks_vec.with_label_values(&[h, o])));

        let handshakes_vec = IntCounterVec::new(
            Opts::new("tls_handshakes_total", "TLS handshakes on the proxy listener, by outcome"),
            &["outcome"],
        )?;
        reg(Box::new(handshakes_vec.clone()))?;
        let tls_handshakes = TLS_HANDSHAKE_OUTCOMES.map(|o| handshakes_vec.with_label_values(&[o]));
        let reloads_vec = IntCounterVec::new(
            Opts::new(
                "tls_certificate_reloads_total",
                "Changed certificate files read again: ok when served from then on, failed when the old pair stays",
            ),
            &["outcome"],
        )?;
        reg(Box::new(reloads_vec.clone()))?;
        let tls_reloads = ["ok", "failed"].map(|o| reloads_vec.with_label_values(&[o]));
        let tls_not_after = Gauge::new(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate the listener serves, as a Unix time (alert well before it)",
        )?;
        reg(Box::new(tls_not_after.clone()))?;

        let build = IntGaugeVec::new(Opts::new("build_info", "Build information"), &["version"])?;
        reg(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        Ok(Metrics {
            registry,
            requests,
            request_duration,
            inflight,
            connections_open,
            upstream_errors,
            retry_hints,
            phase,
            drains,
            drain_duration,
            drain_requests,
            drain_last_request,
            connections_closed,
            app_healthy,
            connect_resends,
            warmup_requests,
            hook_calls,
            tls_handshakes,
            tls_reloads,
            tls_not_after,
        })
    }

    pub fn hook_done(&self, when: crate::hooks::When, ok: bool) {
        self.hook_calls[when as usize][usize::from(!ok)].inc();
    }

    #[inline]
    pub fn request_done(&self, status: u16, phase: Phase, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class][phase as usize].inc();
        self.request_duration.observe(seconds);
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    pub fn retry_hint(&self, reason: RetryReason) {
        self.retry_hints[reason as usize].inc();
    }

    pub fn connection_closed(&self, how: CloseHow) {
        self.connections_closed[how as usize].inc();
    }

    pub fn set_phase(&self, current: Phase) {
        for p in Phase::ALL {
            self.phase[p as usize].set(i64::from(p == current));
        }
    }

    pub fn drain_finished(&self, trigger: Trigger, outcome: Outcome, duration: f64) {
        self.drains[trigger as usize][outcome as usize].inc();
        self.drain_duration.set(duration);
    }

    /// Renders the text exposition; `inflight` and `conns` are the live counters' values.
    pub fn render(&self, inflight: usize, conns: [usize; 2]) -> Vec<u8> {
        self.inflight.set(i64::try_from(inflight).unwrap_or(i64::MAX));
        for (gauge, n) in self.connections_open.iter().zip(conns) {
            gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
