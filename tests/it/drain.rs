//! The drain contract (DESIGN §3–§4), each bullet a test. Requests are held in flight with
//! explicit signals; timings are milliseconds and only ever bounded from one side.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use drainproxy::config::Dur;
use drainproxy::lifecycle::Phase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Starts `/hold` on its own connection and returns once the app has it.
async fn hold(app: &App, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<Reply> {
    let h = tokio::spawn(async move { get(addr, "/hold").await });
    app.state.hold.started.notified().await;
    h
}

#[tokio::test]
async fn drain_waits_for_the_request_in_flight_and_answers_with_a_summary() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let held = hold(&app, p.proxy_addr).await;
    let admin = p.admin_addr;
    let drain = tokio::spawn(async move { get(admin, "/drain").await });
    wait_phase(&p, Phase::Draining).await;
    // Past min_delay, the held request still keeps the drain open.
    let mut rx = p.state.clone();
    rx.wait_for(|s| s.close_idle).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!drain.is_finished(), "/drain returned while a request was in flight");
    app.state.hold.release.notify_one();
    let r = held.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "held");
    let d = tokio::time::timeout(Duration::from_secs(5), drain).await.unwrap().unwrap();
    assert_eq!(d.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(v["phase"], "drained");
    assert_eq!(v["drain"]["outcome"], "idle");
    assert_eq!(v["drain"]["trigger"], "http");
    assert_eq!(v["drain"]["inflight_at_release"], 0);
}

#[tokio::test]
async fn idle_release_follows_the_last_request_within_milliseconds() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.quiet_period = Dur::millis(50)).await;
    let held = hold(&app, p.proxy_addr).await;
    let admin = p.admin_addr;
    let drain = tokio::spawn(async move {
        let r = get(admin, "/drain").await;
        (r, Instant::now())
    });
    let mut rx = p.state.clone();
    rx.wait_for(|s| s.close_idle).await.unwrap();
    // The held request arrived long before: once it ends, every release condition holds.
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.state.hold.release.notify_one();
    held.await.unwrap();
    let ended = Instant::now();
    let (r, returned) = drain.await.unwrap();
    assert_eq!(r.status, 200);
    let gap = returned.saturating_duration_since(ended);
    eprintln!("idle-to-release gap: {gap:?}");
    assert!(gap < Duration::from_millis(50), "release lagged idleness by {gap:?}");
}

#[tokio::test]
async fn requests_arriving_during_the_drain_are_forwarded_with_connection_close() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = Dur::secs(2)).await;
    start_drain(&p).await;
    let before = app.state.requests.load(Ordering::SeqCst);
    let r = get(p.proxy_addr, "/").await;
    assert_eq!(r.status, 200, "a request at t < min_delay must be forwarded");
    assert_eq!(r.text(), "ok");
    assert_eq!(r.headers["connection"], "close");
    assert!(app.state.requests.load(Ordering::SeqCst) > before);
    let m = metrics(&p).await;
    assert!(metric(&m, "drainproxy_drain_requests_total", &[]) >= 1.0);
    assert_eq!(metric(&m, "drainproxy_requests_total", &[("code_class", "2xx"), ("phase", "draining")]), 1.0);
}

#[tokio::test]
async fn keep_alive_client_sees_connection_close_on_its_first_response_after_drain_start() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = Dur::secs(2)).await;
    let mut c = h1(p.proxy_addr).await;
    let r = c.get("/").await;
    assert!(r.headers.get("connection").is_none());
    start_drain(&p).await;
    let r = c.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["connection"], "close");
    tokio::time::timeout(Duration::from_secs(2), &mut c.conn).await.expect("connection closed after the response").ok();
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "connection_close")]), 1.0);
}

/// An idle keep-alive (parked or not yet) is closed at `min_delay`, not before.
async fn idle_keep_alive_closes_at_min_delay(parked: bool) {
    let app = app().await;
    let min_delay = Duration::from_millis(400);
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = Dur(min_delay)).await;
    let mut c = h1(p.proxy_addr).await;
    assert_eq!(c.get("/").await.status, 200);
    if parked {
        tokio::time::timeout(Duration::from_secs(5), p.activity.wait_parked(1)).await.expect("connection parked");
    }
    let t0 = Instant::now();
    start_drain(&p).await;
    tokio::time::timeout(Duration::from_secs(5), &mut c.conn).await.expect("idle keep-alive closed").ok();
    let closed_after = t0.elapsed();
    assert!(closed_after >= min_delay - Duration::from_millis(20), "closed at {closed_after:?}, before min_delay");
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "idle_close")]), 1.0);
    assert_eq!(p.activity.parked(), 0);
}

#[tokio::test]
async fn idle_keep_alive_is_closed_at_min_delay_and_not_before() {
    idle_keep_alive_closes_at_min_delay(false).await;
}

#[tokio::test]
async fn a_parked_keep_alive_is_closed_at_min_delay_and_not_before() {
    idle_keep_alive_closes_at_min_delay(true).await;
}

#[tokio::test]
async fn http2_client_gets_goaway_and_its_open_stream_completes() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let (mut s, conn) = h2(p.proxy_addr).await;
    let fut = s.send_request(h2_get(p.proxy_addr, "/hold"));
    let held = tokio::spawn(async move { read(fut.await.unwrap()).await });
    app.state.hold.started.notified().await;
    start_drain(&p).await;
    // After GOAWAY the client refuses to open new streams on this connection.
    let deadline = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        let mut probe = s.clone();
        let attempt = tokio::time::timeout(Duration::from_millis(200), async {
            probe.ready().await?;
            probe.send_request(h2_get(p.proxy_addr, "/")).await.map(|_| ())
        })
        .await;
        if matches!(attempt, Ok(Err(_))) || Instant::now() > deadline {
            break matches!(attempt, Ok(Err(_)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(refused, "the client never saw GOAWAY");
    app.state.hold.release.notify_one();
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "the stream open at GOAWAY completes");
    assert_eq!(r.text(), "held");
    tokio::time::timeout(Duration::from_secs(5), conn).await.expect("connection ends after its last stream").ok();
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "goaway")]), 1.0);
}

#[tokio::test]
async fn release_is_forced_at_max_duration_with_a_stuck_request() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.max_duration = Dur::millis(700)).await;
    let _held = hold(&app, p.proxy_addr).await;
    let t0 = Instant::now();
    let d = get(p.admin_addr, "/drain").await;
    let took = t0.elapsed();
    assert_eq!(d.status, 200);
    assert!(took >= Duration::from_millis(650), "released after {took:?}, before max_duration");
    let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(v["drain"]["outcome"], "forced");
    assert_eq!(v["drain"]["inflight_at_release"], 1);
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drains_total", &[("trigger", "http"), ("outcome", "forced")]), 1.0);
    app.state.hold.release.notify_one();
}

#[tokio::test]
async fn upgraded_connections_still_open_at_max_duration_are_closed() {
    use futures_util::StreamExt;
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.max_duration = Dur::millis(600)).await;
    let stream = TcpStream::connect(p.proxy_addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", p.proxy_addr), stream).await.unwrap();
    let d = get(p.admin_addr, "/drain").await;
    let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(v["drain"]["outcome"], "forced", "an open WebSocket counts as in flight");
    let end = tokio::time::timeout(Duration::from_secs(3), ws.next()).await.expect("websocket closed by the proxy");
    assert!(matches!(end, None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))));
}

#[tokio::test]
async fn after_release_new_connections_are_refused() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    assert_eq!(get(p.admin_addr, "/drain").await.status, 200);
    let err = TcpStream::connect(p.proxy_addr).await.expect_err("connect after release must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The admin port still answers (probes, metrics, a repeated preStop).
    assert_eq!(get(p.admin_addr, "/ready").await.status, 503);
    assert_eq!(get(p.admin_addr, "/drain").await.status, 200, "/drain is idempotent");
}

#[tokio::test]
async fn concurrent_drain_callers_are_released_together() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let admin = p.admin_addr;
            tokio::spawn(async move { get(admin, "/drain").await })
        })
        .collect();
    let mut started = Vec::new();
    for c in callers {
        let r = tokio::time::timeout(Duration::from_secs(5), c).await.unwrap().unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        started.push(v["drain"]["started_at"].as_f64().unwrap());
    }
    assert!(started.windows(2).all(|w| w[0] == w[1]), "callers joined different drains: {started:?}");
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drains_total", &[]), 1.0);
}

#[tokio::test]
async fn drain_without_the_right_token_is_refused_and_changes_nothing() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.token = "s3cret".into()).await;
    let mut c = h1(p.admin_addr).await;
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = http::Request::post("/drain").header("host", "a");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = c.send(req.body(empty()).unwrap()).await;
        assert_eq!(r.status, 401, "auth {auth:?}");
    }
    assert_eq!(p.state.borrow().phase, Phase::Ready);
    assert_eq!(get(p.admin_addr, "/ready").await.status, 200);
    let r = c
        .send(
            http::Request::post("/drain?wait=false")
                .header("host", "a")
                .header("authorization", "Bearer s3cret")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 202);
    // 202 means the drain has begun: no wait for readiness to turn.
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["phase"], "draining");
    assert_eq!(get(p.admin_addr, "/ready").await.status, 503);
}

#[tokio::test]
async fn readiness_follows_starting_ready_unhealthy_and_draining() {
    let app = app().await;
    app.state.unhealthy.store(true, Ordering::SeqCst);
    let p = proxy(app.addr, |c| c.health.unhealthy_threshold = 2).await;
    let r = get(p.admin_addr, "/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "starting\n"));
    // Requests are forwarded while starting: the app may answer.
    assert_eq!(get(p.proxy_addr, "/").await.status, 200);
    app.state.unhealthy.store(false, Ordering::SeqCst);
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(get(p.admin_addr, "/ready").await.status, 200);
    app.state.unhealthy.store(true, Ordering::SeqCst);
    wait_phase(&p, Phase::Unhealthy).await;
    let r = get(p.admin_addr, "/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "unhealthy\n"));
    assert_eq!(get(p.proxy_addr, "/").await.status, 200, "still forwarded while unhealthy");
    app.state.unhealthy.store(false, Ordering::SeqCst);
    wait_phase(&p, Phase::Ready).await;
    start_drain(&p).await;
    let r = get(p.admin_addr, "/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "draining\n"));
    assert_eq!(get(p.admin_addr, "/live").await.status, 200, "/live never depends on the app");
}

#[tokio::test]
async fn drain_resumes_when_the_app_restarts_without_sigterm() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    assert_eq!(get(p.admin_addr, "/drain").await.status, 200);
    assert!(TcpStream::connect(p.proxy_addr).await.is_err());
    let _app = restart_app(&p, app).await;
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(get(p.admin_addr, "/ready").await.status, 200);
    let r = get(p.proxy_addr, "/").await;
    assert_eq!(r.status, 200, "listener reopened");
    assert!(r.headers.get("connection").is_none(), "no longer draining");
}

#[tokio::test]
async fn drain_metrics_measure_the_propagation_delay() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = Dur::millis(400)).await;
    start_drain(&p).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(get(p.proxy_addr, "/").await.status, 200);
    let mut rx = p.state.clone();
    rx.wait_for(|s| s.phase == Phase::Drained).await.unwrap();
    let m = metrics(&p).await;
    let last = metric(&m, "drainproxy_drain_last_request_seconds", &[]);
    assert!((0.14..1.0).contains(&last), "last request at {last}s after drain start");
    assert_eq!(metric(&m, "drainproxy_drain_requests_total", &[]), 1.0);
    assert_eq!(metric(&m, "drainproxy_drains_total", &[("outcome", "idle")]), 1.0);
    assert!(metric(&m, "drainproxy_drain_duration_seconds", &[]) >= 0.4);
    assert_eq!(metric(&m, "drainproxy_phase", &[("phase", "drained")]), 1.0);
    let status: serde_json::Value = serde_json::from_slice(&get(p.admin_addr, "/status").await.body).unwrap();
    assert_eq!(status["phase"], "drained");
    assert_eq!(status["drain"]["requests_after_start"], 1);
}

#[tokio::test]
async fn http2_connection_opened_during_the_drain_is_served_then_told_to_leave() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = Dur::secs(2)).await;
    start_drain(&p).await;
    let (mut s, conn) = h2(p.proxy_addr).await;
    let r = read(s.send_request(h2_get(p.proxy_addr, "/")).await.unwrap()).await;
    assert_eq!(r.status, 200, "forwarded during the drain");
    // With no stream left open, the GOAWAY ends the connection.
    tokio::time::timeout(Duration::from_secs(5), conn).await.expect("connection told to leave").ok();
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "goaway")]), 1.0);
}

#[tokio::test]
async fn a_connection_opened_after_min_delay_still_gets_its_request_forwarded() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    // A held request keeps the drain from releasing past min_delay.
    let held = hold(&app, p.proxy_addr).await;
    start_drain(&p).await;
    let mut rx = p.state.clone();
    rx.wait_for(|s| s.close_idle).await.unwrap();
    for _ in 0..20 {
        let r = get(p.proxy_addr, "/").await;
        assert_eq!(r.status, 200, "a caller that has not converged yet is still served");
        assert_eq!(r.headers["connection"], "close");
    }
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "idle_close")]), 0.0);
    app.state.hold.release.notify_one();
    held.await.unwrap();
}

/// A bare HTTP/2 client, frame by frame, to be the client that races a GOAWAY.
struct RawH2 {
    s: TcpStream,
    buf: Vec<u8>,
}

/// One frame: type, flags, stream id, payload.
struct Frame(u8, u8, u32, Vec<u8>);

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;

impl RawH2 {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut c = RawH2 { s, buf: Vec::new() };
        c.send(SETTINGS, 0, 0, &[]).await;
        c
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = (payload.len() as u32).to_be_bytes();
        let frame = [&[len[1], len[2], len[3], kind, flags][..], &stream.to_be_bytes(), payload].concat();
        self.s.write_all(&frame).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Frame(f[3], f[4], stream, f[9..].to_vec());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut chunk))
                .await
                .expect("a frame within 5 s")
                .unwrap();
            assert!(n > 0, "the proxy closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A client that opens a stream right after it acknowledged the GOAWAY's PING (a stream it
/// queued before reading the GOAWAY) has it served, not refused: the final GOAWAY waits
/// `GOAWAY_GRACE`, not one round trip, and names that stream.
#[tokio::test]
async fn a_stream_opened_just_after_the_goaway_ping_is_served() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = Dur::secs(2)).await;
    let mut c = RawH2::connect(p.proxy_addr).await;
    loop {
        let Frame(kind, flags, ..) = c.next().await;
        if kind == SETTINGS && flags & 1 == 0 {
            c.send(SETTINGS, 1, 0, &[]).await;
            break;
        }
    }
    start_drain(&p).await;
    let ping = loop {
        let Frame(kind, flags, _, payload) = c.next().await;
        if kind == PING && flags & 1 == 0 {
            break payload;
        }
    };
    c.send(PING, 1, 0, &ping).await;
    // GET / with :authority a, from HPACK's static table; END_STREAM | END_HEADERS.
    c.send(HEADERS, 0x5, 1, &[0x82, 0x86, 0x84, 0x01, 0x01, b'a']).await;
    let (mut answered, mut last) = (false, None);
    while !answered || last.is_none() {
        let Frame(kind, _, stream, payload) = c.next().await;
        match kind {
            HEADERS if stream == 1 => answered = true,
            RST_STREAM if stream == 1 => panic!("stream 1 was reset: {payload:?}"),
            GOAWAY => {
                let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                if id != 0x7fff_ffff {
                    last = Some(id);
                }
            }
            _ => {}
        }
    }
    assert_eq!(last, Some(1), "the final GOAWAY names the stream opened after the PING");
}
