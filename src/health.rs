//! App health probing: an HTTP GET of `health.path` (2xx = healthy) or, without a path, a
//! TCP connect. Applies the thresholds and reports every probe to the lifecycle, which owns
//! what a verdict means for the phase.
//!
//! Probes use their own short-lived connection, never the proxy's pool, so a probe cannot
//! take or poison a connection that carries traffic.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::config::HealthConfig;
use crate::lifecycle::{Event, HealthReport};
use crate::metrics::Metrics;
use crate::upstream::connect_resending;

/// Applies `healthy_threshold` and `unhealthy_threshold` to a run of probe results.
#[derive(Debug, Default)]
pub struct Verdict {
    passes: u32,
    failures: u32,
    current: Option<bool>,
}

impl Verdict {
    /// Records one probe and returns the verdict, which changes only after the threshold of
    /// consecutive results. Before any verdict, a failure is reported at once: an app that is
    /// not up yet is not healthy.
    pub fn record(&mut self, ok: bool, healthy_threshold: u32, unhealthy_threshold: u32) -> Option<bool> {
        if ok {
            self.passes += 1;
            self.failures = 0;
            if self.passes >= healthy_threshold {
                self.current = Some(true);
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            if self.failures >= unhealthy_threshold || self.current.is_none() {
                self.current = Some(false);
            }
        }
        self.current
    }
}

pub async fn run(cfg: HealthConfig, app: SocketAddr, events: mpsc::Sender<Event>, metrics: Arc<Metrics>) {
    match &cfg.path {
        Some(path) => info!(%app, path, interval_ms = cfg.interval.0.as_millis() as u64, "health checks: HTTP GET"),
        None => {
            warn!(%app, "health.path is not set: checking the app with a TCP connect, which proves only that something listens")
        }
    }
    let mut verdict = Verdict::default();
    let mut last: Option<bool> = None;
    let mut tick = tokio::time::interval(cfg.interval.0);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(&cfg, app, &metrics.connect_resends).await;
        let ok = result.is_ok();
        let v = verdict.record(ok, cfg.healthy_threshold, cfg.unhealthy_threshold);
        if v != last {
            match (v, &result) {
                (Some(true), _) => info!(%app, "app is healthy"),
                (_, Err(reason)) => warn!(%app, reason = %reason, "app is unhealthy"),
                _ => {}
            }
            metrics.app_healthy.set(i64::from(v == Some(true)));
            last = v;
        }
        if events.send(Event::Health(HealthReport { ok, verdict: v })).await.is_err() {
            return;
        }
    }
}

/// One probe, bounded by `health.timeout`. Its connect resends like the proxy's, so a burst
/// that fills the app's accept queue for a moment does not fail the probe.
pub async fn probe(cfg: &HealthConfig, app: SocketAddr, resends: &IntCounter) -> Result<(), String> {
    let probe = probe_once(cfg.path.as_deref(), app, cfg.timeout.0, resends);
    match tokio::time::timeout(cfg.timeout.0, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within health.timeout ({})", cfg.timeout)),
    }
}

async fn probe_once(
    path: Option<&str>,
    app: SocketAddr,
    timeout: Duration,
    resends: &IntCounter,
) -> Result<(), String> {
    let stream = connect_resending(app, timeout, resends).await.map_err(|e| match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    })?;
    let Some(path) = path else { return Ok(()) };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, app.to_string())
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, concat!("drainproxy-health/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let res = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"));
    conn.abort();
    let status = res?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_changes_only_after_thresholds() {
        let mut v = Verdict::default();
        assert_eq!(v.record(false, 2, 3), Some(false), "unknown becomes unhealthy at once");
        assert_eq!(v.record(true, 2, 3), Some(false));
        assert_eq!(v.record(true, 2, 3), Some(true));
        assert_eq!(v.record(false, 2, 3), Some(true));
        assert_eq!(v.record(false, 2, 3), Some(true));
        assert_eq!(v.record(false, 2, 3), Some(false));
    }

    /// The app's accept queue (backlog 0: one connection) is full, so it drops the probe's
    /// SYN; the kernel would resend it only after 1 s, past this probe's 900 ms timeout.
    #[tokio::test]
    async fn a_probe_resends_a_connect_a_full_accept_queue_dropped() {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(0).unwrap();
        let app = listener.local_addr().unwrap();
        let _filler = tokio::net::TcpStream::connect(app).await.unwrap();
        let cfg = HealthConfig { path: None, timeout: crate::config::Dur::millis(900), ..HealthConfig::default() };
        let resends = IntCounter::new("resends", "resends").unwrap();
        let probing = tokio::spawn({
            let resends = resends.clone();
            async move { probe(&cfg, app, &resends).await }
        });
        let resent = async {
            while resends.get() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_millis(900), resent).await.expect("the probe resends its connect");
        // The app takes the queued connection; the next resent SYN fits.
        let _accepted = listener.accept().await.unwrap();
        assert_eq!(probing.await.unwrap(), Ok(()));
    }
}
