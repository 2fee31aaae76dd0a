//! TLS termination on the proxy listener: ALPN picks HTTP/2 or HTTP/1.1, the drain tells
//! TLS connections to leave as it does plain ones, rotated certificates are served without a
//! restart, and bad input gets a clear answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drainproxy::app::Running;
use drainproxy::config::{Config, Dur, TlsConfig};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::support::*;

/// A self-signed certificate for `localhost`, written as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

pub fn pair(dir: &Path, name: &str) -> Pair {
    pair_until(dir, name, 2040)
}

/// Valid until January 1st of `year`.
fn pair_until(dir: &Path, name: &str, year: i32) -> Pair {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let signing_key = rcgen::KeyPair::generate().unwrap();
    let c = params.self_signed(&signing_key).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, c.pem()).unwrap();
    std::fs::write(&key, signing_key.serialize_pem()).unwrap();
    Pair { cert, key, der: c.der().clone() }
}

/// January 1st of `year`, 00:00 UTC, as a Unix time.
fn new_year(year: i32) -> f64 {
    let days: i64 = (1970..year).map(|y| if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 { 366 } else { 365 }).sum();
    (days * 86_400) as f64
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drainproxy-it-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn with_tls(c: &mut Config, p: &Pair) {
    c.tls = Some(TlsConfig { cert: p.cert.clone(), key: p.key.clone(), reload_interval: Dur::secs(10) });
}

/// A TLS client that trusts `trusted` and offers `alpn`.
pub async fn connect(addr: SocketAddr, trusted: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    connect_with(addr, &client_config(trusted, alpn)).await
}

fn client_config(trusted: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add((*c).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A TLS connection made with `cfg`, whose session cache lets later ones resume.
async fn connect_with(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(cfg.clone()).connect(name, tcp).await.expect("TLS handshake")
}

fn served_cert(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

/// The test app, a certificate pair in a directory of its own, and a ready proxy serving it.
async fn tls_proxy(name: &str, tweak: impl FnOnce(&mut Config)) -> (App, Pair, Running) {
    let app = app().await;
    let a = pair(&tempdir(name), "a");
    let p = ready_proxy(app.addr, |c| {
        with_tls(c, &a);
        tweak(c);
    })
    .await;
    (app, a, p)
}

#[tokio::test]
async fn alpn_picks_http2_or_http1_and_both_reach_the_app() {
    let (app, a, p) = tls_proxy("alpn", |_| {}).await;

    let s = connect(p.proxy_addr, &[&a.der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 is preferred");
    // The client lists AES-256-GCM first; the proxy's order wins (`tls::server_provider`).
    let suite = s.get_ref().1.negotiated_cipher_suite().map(|c| c.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    let (mut h2c, _conn) = h2_on(s).await;
    let r = read(h2c.send_request(h2_get(p.proxy_addr, "/")).await.unwrap()).await;
    assert_eq!(r.status, 200);
    // The app learns that its client spoke TLS, on either protocol.
    let proto = || app.state.last_headers.lock().unwrap()["x-forwarded-proto"].clone();
    assert_eq!(proto(), "https");

    let s = connect(p.proxy_addr, &[&a.der], &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut c = h1_on(s).await;
    app.state.last_headers.lock().unwrap().clear();
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(proto(), "https");
    assert_eq!(c.get("/").await.status, 200, "keep-alive over TLS");

    // No ALPN at all: the first bytes still tell the protocol.
    let mut c = h1_on(connect(p.proxy_addr, &[&a.der], &[]).await).await;
    assert_eq!(c.get("/").await.status, 200);

    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_tls_handshakes_total", &[("outcome", "ok")]), 3.0);
    assert_eq!(metric(&m, "drainproxy_connections_open", &[("protocol", "http2")]), 1.0);
}

/// A client that comes back resumes its session without a full handshake, however many
/// other clients came in between: sessions live in tickets the clients hold, not in a
/// server-side cache (rustls' default remembers 256).
#[tokio::test]
async fn a_returning_client_resumes_its_session_after_many_others() {
    let (_app, a, p) = tls_proxy("resume", |_| {}).await;
    let session = |cfg: Arc<rustls::ClientConfig>| async move {
        let s = connect_with(p.proxy_addr, &cfg).await;
        let kind = s.get_ref().1.handshake_kind();
        // The ticket comes after the handshake: one exchange makes sure the client read it.
        assert_eq!(h1_on(s).await.get("/").await.status, 200);
        kind
    };
    let first = client_config(&[&a.der], &[b"http/1.1"]);
    assert_eq!(session(first.clone()).await, Some(rustls::HandshakeKind::Full));
    for _ in 0..300 {
        session(client_config(&[&a.der], &[b"http/1.1"])).await;
    }
    assert_eq!(session(first).await, Some(rustls::HandshakeKind::Resumed));
}

#[tokio::test]
async fn the_drain_closes_tls_http1_and_sends_goaway_on_tls_http2() {
    let (app, a, p) = tls_proxy("drain", |c| c.drain.min_delay = Dur::secs(2)).await;

    let mut c = h1_on(connect(p.proxy_addr, &[&a.der], &[b"http/1.1"]).await).await;
    assert!(c.get("/").await.headers.get("connection").is_none());
    let (mut h2c, h2conn) = h2_on(connect(p.proxy_addr, &[&a.der], &[b"h2"]).await).await;
    let fut = h2c.send_request(h2_get(p.proxy_addr, "/hold"));
    let held = tokio::spawn(async move { read(fut.await.unwrap()).await });
    app.state.hold.started.notified().await;

    p.events.send(drainproxy::lifecycle::Event::Drain(drainproxy::lifecycle::Trigger::Http)).await.unwrap();
    wait_phase(&p, drainproxy::lifecycle::Phase::Draining).await;

    let r = c.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["connection"], "close");
    tokio::time::timeout(Duration::from_secs(2), &mut c.conn)
        .await
        .expect("TLS connection closed after the response")
        .ok();

    app.state.hold.release.notify_one();
    let r = held.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "held"), "the stream open at GOAWAY completes");
    // A client connection ends by itself only once the server's GOAWAY left no stream open.
    tokio::time::timeout(Duration::from_secs(5), h2conn).await.expect("HTTP/2 connection ends after GOAWAY").ok();
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "connection_close")]), 1.0);
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "goaway")]), 1.0);
}

/// An idle TLS keep-alive (never parked) is closed at `min_delay`, as a cleartext one is.
#[tokio::test]
async fn an_idle_tls_keep_alive_is_closed_at_min_delay_and_not_before() {
    let min_delay = Duration::from_millis(400);
    let (_app, a, p) = tls_proxy("idle", |c| c.drain.min_delay = Dur(min_delay)).await;
    let mut c = h1_on(connect(p.proxy_addr, &[&a.der], &[b"http/1.1"]).await).await;
    assert_eq!(c.get("/").await.status, 200);
    let t0 = Instant::now();
    p.events.send(drainproxy::lifecycle::Event::Drain(drainproxy::lifecycle::Trigger::Http)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut c.conn).await.expect("idle TLS keep-alive closed").ok();
    let closed_after = t0.elapsed();
    assert!(closed_after >= min_delay - Duration::from_millis(20), "closed at {closed_after:?}, before min_delay");
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_drain_connections_closed_total", &[("how", "idle_close")]), 1.0);
}

/// Replaces a file in one step, as a Secret volume's symlink swap does.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

async fn wait_reloads(p: &Running, outcome: &str, n: f64) {
    wait_metric(p, "drainproxy_tls_certificate_reloads_total", &[("outcome", outcome)], n).await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_from_the_next_handshake_and_a_half_rotation_is_not() {
    let app = app().await;
    let dir = tempdir("rotate");
    let (a, b) = (pair_until(&dir, "a", 2035), pair_until(&dir, "b", 2045));
    let served = Pair { cert: dir.join("tls.crt"), key: dir.join("tls.key"), der: a.der.clone() };
    replace(&a.cert, &served.cert);
    replace(&a.key, &served.key);
    let p = ready_proxy(app.addr, |c| {
        c.tls = Some(TlsConfig { cert: served.cert.clone(), key: served.key.clone(), reload_interval: Dur::secs(1) });
    })
    .await;
    let both = [&a.der, &b.der];
    let old = connect(p.proxy_addr, &both, &[b"http/1.1"]).await;
    assert_eq!(served_cert(&old), a.der);
    let mut old = h1_on(old).await;
    let expiry = |m: &str| metric(m, "drainproxy_tls_certificate_expiry_timestamp_seconds", &[]);
    assert_eq!(expiry(&metrics(&p).await), new_year(2035));

    // Halfway: the new certificate, the old key. The old pair stays in service.
    replace(&b.cert, &served.cert);
    wait_reloads(&p, "failed", 1.0).await;
    assert_eq!(served_cert(&connect(p.proxy_addr, &both, &[]).await), a.der);

    replace(&b.key, &served.key);
    wait_reloads(&p, "ok", 1.0).await;
    assert_eq!(served_cert(&connect(p.proxy_addr, &both, &[]).await), b.der);
    assert_eq!(old.get("/").await.status, 200, "a connection made before the rotation goes on");
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_tls_certificate_reloads_total", &[("outcome", "failed")]), 1.0, "logged once");
    assert_eq!(expiry(&m), new_year(2045), "the expiry follows the served certificate");
    let status: serde_json::Value = serde_json::from_slice(&get(p.admin_addr, "/status").await.body).unwrap();
    assert_eq!(status["tls"]["certificate_not_after"].as_f64(), Some(new_year(2045)));
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_400_that_says_so() {
    let (app, _a, p) = tls_proxy("plain", |_| {}).await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut got))
        .await
        .expect("answered and closed")
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
    assert!(got.contains("expects TLS"), "{got}");
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "never forwarded");
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_tls_handshakes_total", &[("outcome", "failed")]), 1.0);
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_handshake_is_closed_at_header_read_timeout() {
    let (_app, _a, p) = tls_proxy("silent", |c| c.limits.header_read_timeout = Dur::millis(300)).await;
    let mut silent = TcpStream::connect(p.proxy_addr).await.unwrap();
    // A handshake record's first byte, then nothing.
    silent.write_all(&[0x16]).await.unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await.expect("closed by the proxy");
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered: {n:?}");
    assert!(t0.elapsed() >= Duration::from_millis(250), "closed after {:?}", t0.elapsed());
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_tls_handshakes_total", &[("outcome", "timeout")]), 1.0);
}

#[test]
fn check_names_the_tls_field_and_file_it_cannot_use() {
    let dir = tempdir("check");
    let a = pair(&dir, "a");
    let b = pair(&dir, "b");
    let cfg = dir.join("drainproxy.yaml");
    let write = |cert: &Path, key: &Path| {
        std::fs::write(
            &cfg,
            format!("listen: 127.0.0.1:0\ntls:\n  cert: {}\n  key: {}\n", cert.display(), key.display()),
        )
        .unwrap();
    };
    let check = || std::process::Command::new(bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();

    write(&a.cert, &a.key);
    let out = check();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    write(&a.cert, &b.key);
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.key") && err.contains(&*b.key.to_string_lossy()) && err.contains("does not match"),
        "{err}"
    );

    write(&dir.join("missing.crt"), &a.key);
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert") && err.contains("missing.crt"), "{err}");
}

/// A WebSocket over TLS (wss) is tunnelled like a plain one: frames both ways, and the app's
/// end of the tunnel reaches the client through the TLS layer.
#[tokio::test]
async fn a_websocket_over_tls_echoes_and_its_end_reaches_the_client() {
    use futures_util::{SinkExt, StreamExt};
    let (_app, a, p) = tls_proxy("wss", |_| {}).await;
    let s = connect(p.proxy_addr, &[&a.der], &[b"http/1.1"]).await;
    let (mut ws, res) = tokio_tungstenite::client_async("wss://localhost/ws", s).await.unwrap();
    assert_eq!(res.status(), 101);
    for i in 0..5 {
        ws.send(format!("hello {i}").into()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), format!("hello {i}"));
    }
    assert_eq!(p.activity.inflight(), 1, "an open WebSocket is in flight");
    ws.close(None).await.unwrap();
    let ended =
        tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(ended.is_ok(), "the client never saw the tunnel end");
}

/// Large bodies stream both ways over TLS on both protocols (flow control, write coalescing
/// and the TLS layer together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_over_tls_on_both_protocols() {
    const N: u64 = 24 << 20;
    let (_app, a, p) = tls_proxy("large", |_| {}).await;
    let upload = || {
        let chunk = bytes::Bytes::from(vec![b'u'; 256 * 1024]);
        let frames = (0..N / chunk.len() as u64).map(move |_| Ok(hyper::body::Frame::data(chunk.clone())));
        http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
    };

    let mut c = h1_on(connect(p.proxy_addr, &[&a.der], &[b"http/1.1"]).await).await;
    assert_eq!(c.get(&format!("/bytes?n={N}")).await.body.len() as u64, N);
    let r = c.send(http::Request::post("/count").header("host", "x").body(upload()).unwrap()).await;
    assert_eq!(r.text(), N.to_string());

    let (mut h2c, _conn) = h2_on(connect(p.proxy_addr, &[&a.der], &[b"h2"]).await).await;
    let r = read(h2c.send_request(h2_get(p.proxy_addr, &format!("/bytes?n={N}"))).await.unwrap()).await;
    assert_eq!(r.body.len() as u64, N);
    let req = http::Request::post("https://localhost/count").body(upload()).unwrap();
    let r = read(h2c.send_request(req).await.unwrap()).await;
    assert_eq!(r.text(), N.to_string());
}
