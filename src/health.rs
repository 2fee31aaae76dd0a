//! App health probing: an HTTP GET of `health.path` (2xx = healthy) or, without a path, a
//! TCP connect. Applies the thresholds and reports every probe to the lifecycle, which owns
//! what a verdict means for the phase.
//!
//! Probes use their own short-lived connection, never the proxy's pool, so a probe cannot
//! take or poison a connection that carries traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::config::HealthConfig;
use crate::lifecycle::{Event, HealthReport};
use crate::metrics::Metrics;

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
        let result = probe(&cfg, app).await;
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

/// One probe, bounded by `health.timeout`.
pub async fn probe(cfg: &HealthConfig, app: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(cfg.timeout.0, probe_once(cfg.path.as_deref(), app)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within health.timeout ({})", cfg.timeout)),
    }
}

async fn probe_once(path: Option<&str>, app: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(app).await.map_err(|e| format!("connect failed: {e}"))?;
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
}
