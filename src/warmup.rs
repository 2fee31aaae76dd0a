//! The app warm-up of DESIGN §5: the configured requests, sent to the app once it is healthy
//! and before `/ready` turns 200, so that its first real traffic does not pay for its cold
//! start (JIT compilation, caches, connection pools).
//!
//! Best effort and bounded: a request that fails is counted and logged and the next one goes
//! out; the whole warm-up ends at `warmup.timeout` whatever is left. Requests go one at a time
//! over one connection (reopened when the app closes it), in the app's protocol, and each
//! answer is read to its end. Like health probes, they never use the proxy's pool.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, info, warn};

use crate::config::{UpstreamProtocol, WarmupConfig, WarmupRequest};
use crate::metrics::Metrics;
use crate::upstream::connect_resending;

/// What one warm-up did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Answered with a 2xx.
    pub ok: u64,
    /// Answered with any other status.
    pub other_status: u64,
    /// No answer: the connection or the request failed.
    pub no_answer: u64,
    /// `warmup.timeout` ended it before every request was sent.
    pub timed_out: bool,
    /// The first request that was not answered 2xx, and what happened, for the log.
    pub first_problem: Option<String>,
}

/// Where and how the warm-up talks to the app.
#[derive(Debug, Clone)]
pub struct Target {
    pub app: SocketAddr,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_usable(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// Runs the whole warm-up, logs what it did and counts every request in `metrics`.
pub async fn run(cfg: &WarmupConfig, target: &Target, metrics: &Metrics) -> Summary {
    let total: u64 = cfg.requests.iter().map(|r| u64::from(r.count)).sum();
    info!(requests = total, timeout = %cfg.timeout, "warming up the app before readiness");
    let started = Instant::now();
    let mut summary = Summary::default();
    let all = send_all(cfg, target, metrics, &mut summary);
    summary.timed_out = tokio::time::timeout(cfg.timeout.0, all).await.is_err();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let Summary { ok, other_status, no_answer, timed_out, first_problem } = &summary;
    let first_problem = first_problem.as_deref().unwrap_or("none");
    if *timed_out {
        let sent = ok + other_status + no_answer;
        warn!(
            sent,
            of = total,
            ok,
            other_status,
            no_answer,
            first_problem,
            elapsed_ms,
            "warm-up cut at warmup.timeout"
        );
    } else if other_status + no_answer > 0 {
        warn!(
            ok,
            other_status, no_answer, first_problem, elapsed_ms, "warm-up done; some requests were not answered 2xx"
        );
    } else {
        info!(ok, elapsed_ms, "warm-up done");
    }
    summary
}

async fn send_all(cfg: &WarmupConfig, target: &Target, metrics: &Metrics, summary: &mut Summary) {
    let mut sender: Option<Sender> = None;
    for spec in &cfg.requests {
        for _ in 0..spec.count {
            let outcome = send_one(&mut sender, spec, target, metrics).await;
            let (slot, problem) = match outcome {
                Ok(status) if status.is_success() => {
                    summary.ok += 1;
                    (0, None)
                }
                Ok(status) => {
                    summary.other_status += 1;
                    (1, Some(status.to_string()))
                }
                Err(reason) => {
                    // The connection is suspect; the next request opens a fresh one.
                    sender = None;
                    summary.no_answer += 1;
                    (2, Some(reason))
                }
            };
            if let Some(problem) = problem {
                debug!(method = spec.method, path = spec.path, problem, "warm-up request not answered 2xx");
                summary.first_problem.get_or_insert_with(|| format!("{} {}: {problem}", spec.method, spec.path));
            }
            metrics.warmup_requests[slot].inc();
        }
    }
}

/// Sends one request and reads its answer to the end.
async fn send_one(
    sender: &mut Option<Sender>,
    spec: &WarmupRequest,
    target: &Target,
    metrics: &Metrics,
) -> Result<http::StatusCode, String> {
    if !sender.as_ref().is_some_and(Sender::is_usable) {
        *sender = Some(connect(target, metrics).await?);
    }
    let s = sender.as_mut().ok_or("no connection")?;
    let res = s.send(request(spec, target)?).await.map_err(|e| format!("request failed: {e}"))?;
    let status = res.status();
    res.into_body().collect().await.map_err(|e| format!("reading the answer failed: {e}"))?;
    Ok(status)
}

async fn connect(target: &Target, metrics: &Metrics) -> Result<Sender, String> {
    let stream = connect_resending(target.app, target.connect_timeout, &metrics.connect_resends)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    Ok(match target.protocol {
        UpstreamProtocol::Http1 => {
            let (s, conn) = http1::handshake(io).await.map_err(|e| format!("handshake failed: {e}"))?;
            tokio::spawn(conn);
            Sender::H1(s)
        }
        UpstreamProtocol::H2c => {
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| format!("handshake failed: {e}"))?;
            tokio::spawn(conn);
            Sender::H2(s)
        }
    })
}

/// The request `spec` describes. HTTP/2 needs the absolute form; HTTP/1.1 gets a `Host`.
fn request(spec: &WarmupRequest, target: &Target) -> Result<Request<Full<Bytes>>, String> {
    let method = Method::from_bytes(spec.method.as_bytes()).map_err(|e| e.to_string())?;
    let uri = match target.protocol {
        UpstreamProtocol::Http1 => spec.path.clone(),
        UpstreamProtocol::H2c => format!("http://{}{}", target.app, spec.path),
    };
    let mut req = Request::builder().method(method).uri(uri);
    let configured = |name: &HeaderName| spec.headers.keys().any(|k| k.eq_ignore_ascii_case(name.as_str()));
    if target.protocol == UpstreamProtocol::Http1 && !configured(&header::HOST) {
        req = req.header(header::HOST, target.app.to_string());
    }
    if !configured(&header::USER_AGENT) {
        req = req.header(header::USER_AGENT, concat!("drainproxy-warmup/", env!("CARGO_PKG_VERSION")));
    }
    for (name, value) in &spec.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        req = req.header(name, HeaderValue::from_str(value).map_err(|e| e.to_string())?);
    }
    req.body(Full::new(Bytes::from(spec.body.clone()))).map_err(|e| e.to_string())
}
