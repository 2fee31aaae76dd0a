//! The admin listener (DESIGN §6). Endpoints:
//!
//! | path | answer |
//! |---|---|
//! | `GET /live` | 200 while the process serves; never asks the app |
//! | `GET /ready` | 200 in `ready`, else 503; the body names the phase |
//! | `GET`/`POST /drain` | starts or joins the drain, blocks until release, 200 + JSON; `?wait=false` answers 202 as soon as the drain has begun; with `drain.token` set, a request without `Authorization: Bearer <token>` (or `X-Drainproxy-Token: <token>`) gets 401 and changes nothing |
//! | `GET /status` | JSON: phase, in flight, connections, app health, the current or last drain, the served TLS certificate's expiry |
//! | `GET /metrics` | Prometheus text format |
//!
//! It reads the published state and sends events; it decides nothing itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::accepted::Listener;
use crate::body::Accounting;
use crate::lifecycle::{Event, Phase, State, Trigger};
use crate::upstream::Upstream;

/// How long `/drain?wait=false` waits for the lifecycle to begin the drain before it answers
/// with the phase it sees. The lifecycle takes an event within microseconds; this bounds an
/// answer while it is stopping.
const DRAIN_BEGIN: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Admin {
    pub state: watch::Receiver<State>,
    pub events: mpsc::Sender<Event>,
    pub acct: Arc<Accounting>,
    pub upstream: Arc<Upstream>,
    /// `drain.token`; empty means `/drain` is open (the kubelet reaches it from the node).
    pub token: String,
    pub header_read_timeout: std::time::Duration,
    /// The listener terminates TLS: `/status` reports the served certificate.
    pub tls: bool,
}

type Res = Response<Full<Bytes>>;

/// Serves the admin API until `stop` resolves.
pub async fn serve(listener: Listener, admin: Arc<Admin>, stop: impl std::future::Future) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(admin.header_read_timeout);
    // Admin connections are few (probes, the preStop hook, Prometheus); a small cap keeps a
    // misbehaving client from exhausting file descriptors the proxy needs.
    let limit = Arc::new(Semaphore::new(256));
    crate::server::accept_loop(listener, limit, stop, move |stream, peer, permit| {
        let admin = admin.clone();
        let builder = builder.clone();
        let span = tracing::debug_span!("admin", %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(req, peer).await) }
                });
                if let Err(error) = builder.serve_connection(TokioIo::new(stream), svc).await {
                    debug!(%error, "admin connection ended with an error");
                }
            }
            .instrument(span),
        );
    })
    .await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Res {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

fn json_res(status: StatusCode, value: &serde_json::Value) -> Res {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

impl Admin {
    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Res {
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        match req.uri().path() {
            "/live" if get => text(StatusCode::OK, "live\n"),
            "/ready" if get => {
                let phase = self.state.borrow().phase;
                let status = if phase == Phase::Ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                text(status, format!("{}\n", phase.as_str()))
            }
            "/drain" if get || req.method() == Method::POST => self.drain(&req, peer).await,
            "/status" if get => json_res(StatusCode::OK, &self.status()),
            "/metrics" if get => {
                let a = &self.acct;
                let body = a.metrics.render(a.activity.inflight(), a.activity.connections());
                let mut res = text(StatusCode::OK, body);
                res.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                res
            }
            "/live" | "/ready" | "/drain" | "/status" | "/metrics" => {
                let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                let allow = if req.uri().path() == "/drain" { "GET, POST" } else { "GET, HEAD" };
                res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                res
            }
            _ => text(StatusCode::NOT_FOUND, "not found; try /live, /ready, /drain, /status or /metrics\n"),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        if self.token.is_empty() {
            return true;
        }
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let plain = req.headers().get("x-drainproxy-token").and_then(|v| v.to_str().ok()).map(str::trim);
        [bearer, plain].into_iter().flatten().any(|t| constant_time_eq(t.as_bytes(), self.token.as_bytes()))
    }

    async fn drain(&self, req: &Request<Incoming>, peer: SocketAddr) -> Res {
        if !self.authorized(req) {
            warn!(%peer, "drain refused: missing or wrong token");
            let mut res = text(StatusCode::UNAUTHORIZED, "a valid drain token is required\n");
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return res;
        }
        let wait = !req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "wait=false"));
        info!(%peer, wait, "drain requested");
        if self.events.send(Event::Drain(Trigger::Http)).await.is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
        }
        let mut rx = self.state.clone();
        if !wait {
            // Answered once the lifecycle has taken the event (microseconds), so that 202
            // means the drain has begun and readiness is already 503.
            let begun = tokio::time::timeout(DRAIN_BEGIN, rx.wait_for(|s| s.phase.is_draining()))
                .await
                .map(|r| r.map(|s| s.phase));
            let phase = match begun {
                Ok(Ok(phase)) => phase,
                _ => self.state.borrow().phase,
            };
            return json_res(StatusCode::ACCEPTED, &json!({ "accepted": true, "phase": phase }));
        }
        let released = rx.wait_for(|s| s.phase == Phase::Drained).await.map(|s| s.drain.clone());
        match released {
            Ok(report) => json_res(StatusCode::OK, &json!({ "phase": Phase::Drained, "drain": report })),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        }
    }

    fn status(&self) -> serde_json::Value {
        let s = self.state.borrow().clone();
        let a = &self.acct.activity;
        let [h1, h2] = a.connections();
        json!({
            "phase": s.phase,
            "reason": s.reason,
            "app_healthy": s.app_healthy,
            "inflight": a.inflight(),
            "connections": { "http1": h1, "http2": h2, "http1_parked": a.parked() },
            "upstream": {
                "address": self.upstream.addr().to_string(),
                "protocol": self.upstream.protocol(),
                "idle_pooled": self.upstream.idle_connections(),
            },
            "drain": s.drain,
            // The served certificate's notAfter (Unix seconds; 0 if it could not be read).
            "tls": self.tls.then(|| json!({ "certificate_not_after": self.acct.metrics.tls_not_after.get() as i64 })),
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// Compares secrets without an early exit that would leak the matching prefix length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
