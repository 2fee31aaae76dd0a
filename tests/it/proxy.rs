//! The forwarding contract: headers, protocols, streaming, upgrades, limits and the error
//! mapping of DESIGN §4.4.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::support::*;

#[tokio::test]
async fn forwards_keeping_host_and_a_front_ends_scheme_appending_the_client_address() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut c = h1(p.proxy_addr).await;
    let req = Request::get("/x?y=1")
        .header("host", "shop.example")
        .header("x-forwarded-for", "10.1.2.3")
        .body(full(Bytes::new()))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 200);
    let h = app.state.last_headers.lock().unwrap().clone();
    assert_eq!(h["host"], "shop.example");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example");

    // Behind a front end that terminated TLS, its scheme and host reach the app as it set
    // them: `https, http` would make Tomcat's RemoteIpValve call the request insecure.
    let req = Request::get("/x")
        .header("host", "orders.default.svc")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "shop.example")
        .body(full(Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.status, 200);
    let h = app.state.last_headers.lock().unwrap().clone();
    assert_eq!(h["host"], "orders.default.svc");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), ["https"]);
    assert_eq!(h.get_all("x-forwarded-host").iter().collect::<Vec<_>>(), ["shop.example"]);
}

/// A dual-stack listener (`[::]`, what a pod with IPv6 wants) sees an IPv4 client as
/// `::ffff:a.b.c.d`; the app is told the IPv4 address the client has.
#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_forwarded_as_ipv4() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.listen = "[::]:0".parse().unwrap()).await;
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], p.proxy_addr.port()));
    assert_eq!(get(v4, "/").await.status, 200);
    assert_eq!(app.state.last_headers.lock().unwrap()["x-forwarded-for"], "127.0.0.1");
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p.proxy_addr.port()));
    assert_eq!(get(v6, "/").await.status, 200);
    assert_eq!(app.state.last_headers.lock().unwrap()["x-forwarded-for"], "::1");
}

/// Java's HttpClient (by default) and `curl --http2` ask to upgrade cleartext HTTP/1.1 to
/// HTTP/2. The proxy ignores it, as RFC 9113 §3.1 lets a server: the request goes on as
/// HTTP/1.1, and the app never sees the upgrade, which it could accept and turn into an HTTP/2
/// tunnel that the drain cannot tell to leave.
#[tokio::test]
async fn an_upgrade_to_h2c_is_ignored_and_never_reaches_the_app() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut c = h1(p.proxy_addr).await;
    let req = Request::get("/x")
        .header("host", "a")
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA")
        .body(full(Bytes::new()))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    let h = app.state.last_headers.lock().unwrap().clone();
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(!h.contains_key(name), "the app got {name}: {h:?}");
    }
    assert_eq!(c.get("/x").await.status, 200, "the connection goes on as HTTP/1.1");
}

/// CONNECT asks a forward proxy for a tunnel; drainproxy is a reverse proxy for one app. It is
/// answered 501 at once, without a retry hint (another pod would say the same), and never
/// reaches the app; the connection serves the next request.
#[tokio::test]
async fn connect_is_answered_501_and_never_reaches_the_app() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let request = b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n";
    let got = exchange(p.proxy_addr, request, b"\r\n\r\nok").await;
    assert!(got.starts_with("HTTP/1.1 501 ") && got.ends_with("ok"), "{got}");
    assert!(!got.to_ascii_lowercase().contains("retry-after"), "{got}");
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 1, "only the GET reached the app");
}

/// Sends raw HTTP/1.x bytes and reads until the proxy closes the connection or `until` ends
/// what arrived.
async fn exchange(addr: std::net::SocketAddr, request: &[u8], until: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(until) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with two, is a 400 and never reaches
/// the app (it would see a host the client never named). HTTP/1.0 may omit it; the app then
/// gets a `Host` (its own address) but no `X-Forwarded-Host`. An absolute-form target names
/// the host, and wins over a `Host` that says otherwise (§3.2.2).
#[tokio::test]
async fn the_host_the_app_sees_is_the_one_the_client_named() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let served = || app.state.requests.load(std::sync::atomic::Ordering::SeqCst);
    for bad in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"] {
        let got = exchange(p.proxy_addr, bad, b"<never>").await;
        assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
        assert!(got.contains("connection: close"), "{got}");
        assert!(!got.contains("x-drainproxy-not-forwarded"), "a malformed request is not worth a retry: {got}");
    }
    assert_eq!(served(), 0);

    let got = exchange(p.proxy_addr, b"GET / HTTP/1.0\r\n\r\n", b"<never>").await;
    assert!(got.starts_with("HTTP/1.0 200 "), "{got}");
    let h = app.state.last_headers.lock().unwrap().clone();
    assert_eq!(h["host"], app.addr.to_string());
    assert!(h.get("x-forwarded-host").is_none(), "the client named no host: {h:?}");

    let got = exchange(p.proxy_addr, b"GET http://shop.example/x HTTP/1.1\r\nhost: other\r\n\r\n", b"ok").await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    let h = app.state.last_headers.lock().unwrap().clone();
    assert_eq!(h["host"], "shop.example");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(served(), 2);
}

#[tokio::test]
async fn headers_named_in_connection_do_not_reach_the_app() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut c = h1(p.proxy_addr).await;
    let req = Request::get("/")
        .header("host", "a")
        .header("connection", "x-secret")
        .header("x-secret", "hunter2")
        .header("keep-alive", "timeout=5")
        .header("x-visible", "yes")
        .body(full(Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.status, 200);
    let h = app.state.last_headers.lock().unwrap().clone();
    assert!(h.get("x-secret").is_none(), "{h:?}");
    assert!(h.get("keep-alive").is_none(), "{h:?}");
    assert_eq!(h["x-visible"], "yes");
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut c = h1(p.proxy_addr).await;
    for _ in 0..50 {
        let r = c.get("/").await;
        assert_eq!(r.status, 200);
        assert!(r.headers.get("connection").is_none());
    }
    assert!(!c.conn.is_finished());
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let (mut s, _conn) = h2(p.proxy_addr).await;
    let mut handles = Vec::new();
    for _ in 0..20 {
        let fut = s.send_request(h2_get(p.proxy_addr, "/"));
        handles.push(tokio::spawn(async move { read(fut.await.unwrap()).await }));
    }
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "ok");
    }
    // The app saw HTTP/1.1 with a Host taken from :authority.
    let h = app.state.last_headers.lock().unwrap().clone();
    assert_eq!(h["host"], p.proxy_addr.to_string());

    // Browsers send each cookie as a field of its own over HTTP/2; an HTTP/1.1 app gets them
    // on one line (RFC 9113 §8.2.3), as many read only the first.
    let mut req = h2_get(p.proxy_addr, "/");
    for c in ["session=s1", "theme=dark", "cart=3"] {
        req.headers_mut().append("cookie", c.parse().unwrap());
    }
    assert_eq!(read(s.send_request(req).await.unwrap()).await.status, 200);
    let h = app.state.last_headers.lock().unwrap().clone();
    assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["session=s1; theme=dark; cart=3"]);
}

#[tokio::test]
async fn h2c_upstream_passes_trailers_end_to_end() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.upstream.protocol = drainproxy::config::UpstreamProtocol::H2c).await;
    let (mut s, _conn) = h2(p.proxy_addr).await;
    let res = s.send_request(h2_get(p.proxy_addr, "/trailers")).await.unwrap();
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(collected.to_bytes(), "payload");
}

/// A WebSocket to the test app's echo, opened through a ready proxy.
async fn websocket_through_proxy() -> (App, drainproxy::app::Running, tokio_tungstenite::WebSocketStream<TcpStream>) {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let stream = TcpStream::connect(p.proxy_addr).await.unwrap();
    let (ws, res) = tokio_tungstenite::client_async(format!("ws://{}/ws", p.proxy_addr), stream).await.unwrap();
    assert_eq!(res.status(), 101);
    (app, p, ws)
}

#[tokio::test]
async fn websocket_upgrade_echoes_both_ways() {
    let (_app, p, mut ws) = websocket_through_proxy().await;
    for i in 0..10 {
        ws.send(format!("hello {i}").into()).await.unwrap();
        let msg = ws.next().await.unwrap().unwrap();
        assert_eq!(msg.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    // The open WebSocket counts as in flight until it closes.
    assert_eq!(p.activity.inflight(), 1);
    ws.close(None).await.unwrap();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.activity.inflight() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(p.activity.inflight(), 0);
}

#[tokio::test]
async fn a_tunnel_the_app_closes_is_closed_to_the_client() {
    // The app ends the WebSocket (it answers the close and drops its socket); the client keeps
    // its own side open and must see the end, which only a real half-close relays.
    let (_app, _p, mut ws) = websocket_through_proxy().await;
    ws.send("hello".into()).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "hello");
    ws.close(None).await.unwrap();
    let ended =
        tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(ended.is_ok(), "the client never saw the tunnel end");
}

#[tokio::test]
async fn app_refusing_connections_gets_503_with_retry_hint() {
    // A port with nothing listening.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let p = proxy(dead, |c| c.health.path = None).await;
    let r = get(p.proxy_addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["connection"], "close");
    assert_eq!(r.headers["x-drainproxy-not-forwarded"], "connect_refused");
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_retry_hints_total", &[("reason", "connect_refused")]), 1.0);
    assert_eq!(metric(&m, "drainproxy_upstream_errors_total", &[("kind", "connect_refused")]), 1.0);
}

/// A listener (backlog 0) whose accept queue is full: it drops further SYNs, so connects to
/// it hang. Filled until one connect goes unanswered, with the connections that filled it.
async fn full_accept_queue() -> (TcpListener, Vec<TcpStream>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => return (listener, fillers),
        }
    }
    panic!("the accept queue of a backlog-0 listener took {} connections", fillers.len());
}

/// A proxy to `app` with a TCP health check and `upstream.connect_timeout` of `ms`.
async fn proxy_with_connect_timeout(app: std::net::SocketAddr, ms: u64) -> drainproxy::app::Running {
    proxy(app, |c| {
        c.health.path = None;
        c.upstream.connect_timeout = drainproxy::config::Dur::millis(ms);
    })
    .await
}

#[tokio::test]
async fn connect_timeout_gets_503_with_retry_hint() {
    let (stuck, _fillers) = full_accept_queue().await;
    let p = proxy_with_connect_timeout(stuck.local_addr().unwrap(), 150).await;
    let r = get(p.proxy_addr, "/").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.headers["x-drainproxy-not-forwarded"], "connect_timeout");
}

#[tokio::test]
async fn a_connect_a_full_accept_queue_drops_is_resent_before_the_connect_timeout() {
    // The app's accept queue is full, so it drops the proxy's SYN; the kernel would send it
    // again only after 1 s, past this 900 ms connect timeout.
    let (listener, fillers) = full_accept_queue().await;
    let p = proxy_with_connect_timeout(listener.local_addr().unwrap(), 900).await;
    let started = Instant::now();
    let request = tokio::spawn(get(p.proxy_addr, "/hello"));
    // Once the proxy has resent (its first SYN went unanswered), the app empties its queue.
    let resent = async {
        while p.metrics.connect_resends.get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_millis(900), resent).await.expect("the proxy resends its connect");
    let _app = serve_app(listener, std::sync::Arc::default());
    drop(fillers);
    let r = request.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(started.elapsed() < Duration::from_millis(900), "answered after {:?}", started.elapsed());
    let m = metrics(&p).await;
    assert!(metric(&m, "drainproxy_upstream_connect_resends_total", &[]) >= 1.0);
}

/// An HTTP/2 POST to `path`, which the app answers (`status`, `answer`) before it has the whole
/// body, whose body has sent one chunk and stays open: the sender for the rest, and the
/// response body after its first frame (checked to be the app's answer; none if it is empty).
async fn early_answer_while_uploading(
    p: &drainproxy::app::Running,
    path: &str,
    status: u16,
    answer: &[u8],
) -> (tokio::sync::mpsc::Sender<Bytes>, hyper::body::Incoming, tokio::task::JoinHandle<hyper::Result<()>>) {
    let (mut sender, conn) = h2(p.proxy_addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, hyper::Error>(hyper::body::Frame::data(b)), rx))
    });
    let body = BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    tx.send(Bytes::from(vec![b'a'; 16 * 1024])).await.unwrap();
    let req = Request::post(format!("http://{}{path}", p.proxy_addr)).body(body).unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), status);
    let mut res = res.into_body();
    if !answer.is_empty() {
        let first = res.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], answer);
    }
    (tx, res, conn)
}

/// An HTTP/2 client goes on uploading after the app's complete answer: the response does not
/// end (END_STREAM) while the client still sends, and ends cleanly after its last frame, so
/// the client learns from a frame that arrives after it that the exchange is over (curl 7.88
/// needs one).
async fn assert_the_response_ends_after_the_upload(
    p: &drainproxy::app::Running,
    path: &str,
    status: u16,
    answer: &[u8],
) {
    let (tx, mut res, _conn) = early_answer_while_uploading(p, path, status, answer).await;
    tx.send(Bytes::from(vec![b'b'; 16 * 1024])).await.unwrap();
    let end = tokio::time::timeout(Duration::from_millis(300), res.frame()).await;
    assert!(end.is_err(), "the response ended while the request body was still arriving: {end:?}");
    tx.send(Bytes::from(vec![b'c'; 16 * 1024])).await.unwrap();
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(2), res.collect()).await.expect("the response ends");
    assert!(rest.expect("the response ends without a reset").to_bytes().is_empty());
}

/// The app answers in full and goes on reading the body, as nginx does.
#[tokio::test]
async fn an_http2_response_ends_only_after_the_request_body_the_app_still_reads() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    assert_the_response_ends_after_the_upload(&p, "/early", 200, b"early").await;
}

/// The app answers 200 and closes without reading the body: the proxy reads the rest of the
/// upload itself (and discards it) before the response ends, where dropping it would reset
/// the client's stream.
#[tokio::test]
async fn an_http2_upload_the_app_answered_and_closed_on_is_read_to_its_end() {
    let p = refusing_proxy(200, REFUSAL_BODY).await;
    assert_the_response_ends_after_the_upload(&p, "/upload", 200, REFUSAL_BODY).await;
}

/// An HTTP/2 client still uploading gets a complete non-2xx answer at once (curl stops
/// uploading on one and ends its stream early, which must not overtake the answer), and what
/// it goes on sending is read, not reset.
async fn assert_the_response_ends_at_once_and_the_upload_is_read(
    p: &drainproxy::app::Running,
    path: &str,
    status: u16,
    answer: &[u8],
) {
    let (tx, res, _conn) = early_answer_while_uploading(p, path, status, answer).await;
    let rest = tokio::time::timeout(Duration::from_secs(2), res.collect()).await.expect("the response ends at once");
    assert!(rest.expect("the response ends without a reset").to_bytes().is_empty());
    // A reset stream would drop the client's body, and a send would fail once the channel's
    // four places are full.
    for i in 0..12 {
        let sent = tokio::time::timeout(Duration::from_secs(2), tx.send(Bytes::from(vec![b'c'; 16 * 1024]))).await;
        assert!(matches!(sent, Ok(Ok(()))), "chunk {i} after the answer: {sent:?}");
    }
}

/// The app answers 413 at once and reads the body afterwards.
#[tokio::test]
async fn an_http2_error_answer_while_uploading_ends_at_once_and_the_app_reads_the_rest() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    assert_the_response_ends_at_once_and_the_upload_is_read(&p, "/early?status=413", 413, b"early").await;
}

/// The app answers 413 and closes without reading the body: the proxy reads the rest.
#[tokio::test]
async fn an_http2_error_answer_while_uploading_ends_at_once_and_the_proxy_reads_the_rest() {
    let p = refusing_proxy(413, REFUSAL_BODY).await;
    assert_the_response_ends_at_once_and_the_upload_is_read(&p, "/upload", 413, REFUSAL_BODY).await;
}

/// The same with an answer without a body, which hyper sends whole with its headers.
#[tokio::test]
async fn an_http2_error_answer_without_a_body_while_uploading_ends_at_once_and_the_proxy_reads_the_rest() {
    let p = refusing_proxy(413, b"").await;
    assert_the_response_ends_at_once_and_the_upload_is_read(&p, "/upload", 413, b"").await;
}

/// A ready proxy in front of [`refusing_app`] (checked with a TCP connect: it answers every
/// request the same way).
async fn refusing_proxy(status: u16, body: &'static [u8]) -> drainproxy::app::Running {
    ready_proxy(refusing_app(status, body).await, |c| c.health.path = None).await
}

/// An app that answers every upload with `status` and `body` as soon as it has the request
/// head, and closes without reading the body, so its kernel resets the connection.
async fn refusing_app(status: u16, body: &'static [u8]) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                if read_head(&mut s).await {
                    let head =
                        format!("HTTP/1.1 {status} X\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", body.len());
                    let _ = s.write_all(&[head.as_bytes(), body].concat()).await;
                    let _ = s.set_zero_linger();
                }
            });
        }
    });
    addr
}

const REFUSAL_BODY: &[u8] = b"too big!";

/// Reads from `s` until the end of a request head; false if the connection ends first.
async fn read_head(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// The app's answer reaches an HTTP/1.1 client whichever comes first in the proxy: its next
/// write of the body, which the app's reset fails, or its read of the answer waiting before
/// that reset. hyper's client alone gives up on the failed write (a 502).
#[tokio::test]
async fn an_answer_the_app_sent_before_resetting_an_upload_reaches_the_client() {
    let p = refusing_proxy(413, REFUSAL_BODY).await;
    for i in 0..20 {
        let (mut rd, mut wr) = TcpStream::connect(p.proxy_addr).await.unwrap().into_split();
        let upload = tokio::spawn(async move {
            let head = b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 4194304\r\n\r\n";
            let _ = wr.write_all(head).await;
            // Refused part-way: the proxy may close before all of it is sent.
            let _ = wr.write_all(&vec![b'x'; 4 << 20]).await;
            wr
        });
        let got = read_refusal(&mut rd).await;
        assert!(got.starts_with("HTTP/1.1 413 ") && got.ends_with("too big!"), "upload {i}: {got}");
        upload.abort();
    }
}

/// The same for a body the fast path reads whole (up to `BODY_MAX`) and writes behind its
/// head in one write: the answer waiting before the reset reaches the client, whether that
/// write went whole into the kernel's buffers or the reset cut it (`lean::Conn::exchange`
/// then reads the answer, as `sock.rs` does for hyper's client).
#[tokio::test]
async fn an_answer_the_app_sent_before_resetting_a_whole_body_reaches_the_client() {
    let p = refusing_proxy(413, REFUSAL_BODY).await;
    let n = drainproxy::fast::BODY_MAX;
    let mut req = format!("POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: {n}\r\n\r\n").into_bytes();
    req.resize(req.len() + n, b'x');
    for i in 0..20 {
        let (mut rd, mut wr) = TcpStream::connect(p.proxy_addr).await.unwrap().into_split();
        wr.write_all(&req).await.unwrap();
        let got = read_refusal(&mut rd).await;
        assert!(got.starts_with("HTTP/1.1 413 ") && got.ends_with("too big!"), "upload {i}: {got}");
    }
}

/// Reads one answer from the refusing app (up to its body) from `rd`.
async fn read_refusal(rd: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(REFUSAL_BODY) {
        match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await.expect("an answer within 5 s") {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An HTTP/1.1 client that goes on uploading after the app answered and closed is not reset:
/// the proxy reads the rest of the upload and discards it, so the client sends it all, has
/// the answer, and can use the connection again (Java's HttpClient, sending after `100
/// Continue`, failed every time with "header parser received no bytes" when it was reset).
#[tokio::test]
async fn an_upload_the_app_answered_and_closed_on_is_read_out_and_the_connection_goes_on() {
    let p = refusing_proxy(413, REFUSAL_BODY).await;
    let (mut rd, mut wr) = TcpStream::connect(p.proxy_addr).await.unwrap().into_split();
    let upload = tokio::spawn(async move {
        wr.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 4194304\r\n\r\n").await?;
        wr.write_all(&vec![b'x'; 4 << 20]).await?;
        Ok::<_, std::io::Error>(wr)
    });
    let first = read_refusal(&mut rd).await;
    assert!(first.starts_with("HTTP/1.1 413 "), "{first}");
    let mut wr = tokio::time::timeout(Duration::from_secs(5), upload)
        .await
        .expect("the upload is read within 5 s")
        .unwrap()
        .expect("the whole upload is accepted");
    wr.write_all(b"GET /again HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let second = read_refusal(&mut rd).await;
    assert!(second.starts_with("HTTP/1.1 413 "), "the connection went on: {second}");
}

/// The hold is bounded: an upload that never ends does not keep the response open past
/// `HOLD_END_MAX`.
#[tokio::test]
async fn a_held_http2_response_ends_at_its_bound_when_the_upload_does_not() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let (_tx, res, _conn) = early_answer_while_uploading(&p, "/early", 200, b"early").await;
    let started = Instant::now();
    let bound = drainproxy::body::HOLD_END_MAX;
    let rest = tokio::time::timeout(bound + Duration::from_secs(3), res.collect()).await.expect("the hold ends");
    assert!(rest.unwrap().to_bytes().is_empty());
    assert!(started.elapsed() >= bound - Duration::from_millis(500), "ended after {:?}", started.elapsed());
}

/// An app that reads the request, then closes without answering.
async fn rude_app() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    addr
}

#[tokio::test]
async fn failure_after_the_request_was_sent_is_502_without_retry_hint() {
    let addr = rude_app().await;
    let p = proxy(addr, |c| c.health.path = None).await;
    let r = get(p.proxy_addr, "/").await;
    assert_eq!(r.status, 502);
    assert!(r.headers.get("retry-after").is_none());
    assert!(r.headers.get("x-drainproxy-not-forwarded").is_none());
}

#[tokio::test]
async fn slow_app_gets_504_at_request_timeout() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.upstream.request_timeout = Some(drainproxy::config::Dur::millis(100))).await;
    let r = get(p.proxy_addr, "/slow?ms=2000").await;
    assert_eq!(r.status, 504);
    assert!(r.headers.get("retry-after").is_none());
    assert_eq!(get(p.proxy_addr, "/slow?ms=1").await.status, 200);
}

/// An app that answers one request per connection and then closes it without saying so:
/// the pooled connection is dead when the proxy next picks it.
async fn closing_app() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                if !read_head(&mut s).await {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn app_closing_pooled_connections_causes_no_errors() {
    let addr = closing_app().await;
    let p = proxy(addr, |c| c.health.path = None).await;
    let mut c = h1(p.proxy_addr).await;
    for i in 0..200 {
        let r = c.get("/").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
}

/// Reads one response to `GET /` from the test app (its body is `ok`).
async fn read_ok_response(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the response: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A proxy with the given header read timeout (and a long idle timeout), and a client
/// connection to it that has been answered once and is kept alive.
async fn keep_alive_that_served_one(header_read_ms: u64) -> (App, drainproxy::app::Running, TcpStream) {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| {
        c.limits.header_read_timeout = drainproxy::config::Dur::millis(header_read_ms);
        c.limits.idle_timeout = drainproxy::config::Dur::secs(60);
    })
    .await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    read_ok_response(&mut s).await;
    (app, p, s)
}

#[tokio::test]
async fn a_slow_head_on_a_keep_alive_connection_is_cut_at_the_header_read_timeout() {
    // The second request's head dribbles in and never ends. Longer than the 1 s after which
    // idle keep-alives are parked, so parking must not restart its clock.
    let (app, _p, mut s) = keep_alive_that_served_one(1500).await;
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut closed_after = None;
    for _ in 0..50 {
        tick.tick().await;
        if s.write_all(b"x").await.is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        let mut byte = [0u8; 1];
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut byte)).await {
            assert!(matches!(read, Ok(0) | Err(_)), "unexpected bytes");
            closed_after = Some(start.elapsed());
            break;
        }
    }
    let took = closed_after.expect("slow head never cut");
    assert!(took >= Duration::from_millis(1400), "cut too early: {took:?}");
    // Bound: the timeout, plus one check interval (min(timeout, 1 s)), plus slack.
    assert!(took < Duration::from_millis(3500), "cut too late: {took:?}");
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 1, "the slow head was not forwarded");
}

#[tokio::test]
async fn an_idle_keep_alive_is_not_cut_by_the_header_read_timeout() {
    // Between requests, with no byte of a new head, idle_timeout governs, not the header's.
    let (app, _p, mut s) = keep_alive_that_served_one(200).await;
    // Idle for several header timeouts (and across parking, at 1 s).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    read_ok_response(&mut s).await;
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_client_that_shuts_its_write_side_after_the_request_still_gets_the_response() {
    // `printf 'GET ...' | nc -N` and similar scripted clients send FIN right after the request.
    // The app takes a while, so the FIN reaches the proxy before the response exists.
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"GET /slow?ms=200 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection not closed after the response");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "no response: {text:?}");
    assert!(text.ends_with("slow"), "{text:?}");
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn slowloris_is_cut_at_the_header_read_timeout() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.limits.header_read_timeout = drainproxy::config::Dur::millis(300)).await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.unwrap();
    let mut buf = Vec::new();
    // The proxy must close the connection by itself; the bound only keeps a broken build
    // from hanging the suite.
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection not closed");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(250), "closed too early: {took:?}");
    assert!(took < Duration::from_secs(5), "closed too late: {took:?}");
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing forwarded");
}

#[tokio::test]
async fn oversized_request_head_is_refused_with_431() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.limits.max_header_bytes = 8192).await;
    let mut c = h1(p.proxy_addr).await;
    let big = "a".repeat(16 * 1024);
    let req = Request::get("/").header("host", "a").header("x-big", big).body(full(Bytes::new())).unwrap();
    c.sender.ready().await.unwrap();
    match c.sender.send_request(req).await {
        Ok(res) => assert_eq!(res.status(), 431),
        Err(e) => panic!("expected a 431 response, got {e}"),
    }
}

#[tokio::test]
async fn idle_client_connections_are_closed_at_idle_timeout() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.limits.idle_timeout = drainproxy::config::Dur::millis(200)).await;
    let mut c = h1(p.proxy_addr).await;
    assert_eq!(c.get("/").await.status, 200);
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), &mut c.conn).await.expect("idle connection closed").unwrap().unwrap();
    assert!(start.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn max_connections_holds_extra_connections_in_the_backlog() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.limits.max_connections = 2).await;
    let mut a = h1(p.proxy_addr).await;
    let mut b = h1(p.proxy_addr).await;
    assert_eq!(a.get("/").await.status, 200);
    assert_eq!(b.get("/").await.status, 200);
    // The third connects (kernel backlog) but is not served while two are open.
    let addr = p.proxy_addr;
    let third = tokio::spawn(async move { get(addr, "/").await.status });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!third.is_finished(), "third connection was served beyond max_connections");
    drop(a);
    let status = tokio::time::timeout(Duration::from_secs(5), third).await.expect("served once a slot frees").unwrap();
    assert_eq!(status, 200);
    assert_eq!(b.get("/").await.status, 200);
}

#[tokio::test]
async fn live_and_metrics_answer_with_the_contract_names() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    assert_eq!(get(p.admin_addr, "/live").await.status, 200);
    assert_eq!(get(p.proxy_addr, "/").await.status, 200);
    let m = metrics(&p).await;
    for name in [
        "drainproxy_requests_total",
        "drainproxy_request_duration_seconds_bucket",
        "drainproxy_requests_inflight",
        "drainproxy_connections_open",
        "drainproxy_upstream_errors_total",
        "drainproxy_build_info",
        "drainproxy_phase",
        "drainproxy_app_healthy",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert_eq!(metric(&m, "drainproxy_requests_total", &[("code_class", "2xx"), ("phase", "ready")]), 1.0);
    assert_eq!(metric(&m, "drainproxy_phase", &[("phase", "ready")]), 1.0);
    // Counters that step once in a pod's life are scraped at 0 before they do, or
    // `increase()` never sees the step.
    for trigger in ["http", "sigterm", "sigint"] {
        for outcome in ["idle", "forced"] {
            let series = format!("drainproxy_drains_total{{outcome=\"{outcome}\",trigger=\"{trigger}\"}} 0");
            assert!(m.lines().any(|l| l == series), "{series} missing from /metrics:\n{m}");
        }
    }
}

/// A proxy with a short pool idle timeout and one health probe at start, then none during
/// the test: only proxied requests connect to the app.
async fn proxy_with_pool_idle_timeout(app: std::net::SocketAddr, ms: u64) -> drainproxy::app::Running {
    ready_proxy(app, |c| {
        c.health.interval = drainproxy::config::Dur::secs(30);
        c.upstream.pool_idle_timeout = drainproxy::config::Dur::millis(ms);
    })
    .await
}

#[tokio::test]
async fn pooled_app_connections_are_reused_but_not_past_the_pool_idle_timeout() {
    let app = app().await;
    let p = proxy_with_pool_idle_timeout(app.addr, 150).await;
    let conns = || app.state.connections.load(std::sync::atomic::Ordering::SeqCst);
    let mut c = h1(p.proxy_addr).await;
    assert_eq!(c.get("/").await.status, 200);
    let after_first = conns();
    for _ in 0..20 {
        assert_eq!(c.get("/").await.status, 200);
    }
    assert_eq!(conns(), after_first, "back-to-back requests reuse the pooled connection");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(conns(), after_first + 1, "a connection idle past pool_idle_timeout is not reused");
}

#[tokio::test]
async fn pooled_app_connections_are_closed_once_idle_past_the_pool_idle_timeout() {
    let app = app().await;
    let p = proxy_with_pool_idle_timeout(app.addr, 200).await;
    let mut c = h1(p.proxy_addr).await;
    assert_eq!(c.get("/").await.status, 200);
    // No further request: the reaper, not a checkout, must close the pooled connection, so
    // that a burst's connections and buffers do not outlive it.
    assert!(
        app.state.all_connections_closed(std::time::Duration::from_secs(5)).await,
        "the idle pooled connection was never closed"
    );
}

/// Waits (bounded) until `n` connections are parked.
async fn parked(p: &drainproxy::app::Running, n: usize) {
    tokio::time::timeout(std::time::Duration::from_secs(5), p.activity.wait_parked(n))
        .await
        .unwrap_or_else(|_| panic!("{n} connection(s) never parked (parked now: {})", p.activity.parked()));
}

#[tokio::test]
async fn an_idle_keep_alive_is_parked_and_serves_its_next_requests_on_the_same_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy_addr).await.unwrap();
    let reply = async |s: &mut tokio::net::TcpStream| {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(2).any(|w| w == b"ok") {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "connection closed; got {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    };
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(reply(&mut s).await.starts_with("HTTP/1.1 200"));
    parked(&p, 1).await;
    // The next request arrives in two parts while parked: both are read, in order.
    s.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(b"Host: x\r\n\r\n").await.unwrap();
    let r = reply(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200") && !r.to_ascii_lowercase().contains("connection: close"), "{r}");
    assert_eq!(p.activity.parked(), 0, "a connection with a request is no longer parked");
    // Parked again once idle, and a pipelined pair is answered in order.
    parked(&p, 1).await;
    s.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut both = reply(&mut s).await;
    while both.matches("HTTP/1.1 200").count() < 2 {
        both.push_str(&reply(&mut s).await);
    }
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert_eq!(p.activity.connections(), [1, 0], "one client connection throughout");
}

#[tokio::test]
async fn a_connection_whose_request_body_is_unfinished_is_not_parked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An app that answers before reading the body, then holds its connection until told to
    // close it: the client connection stays idle for longer than the park delay in the
    // middle of a request body, and then the body is abandoned.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let close_app = std::sync::Arc::new(tokio::sync::Notify::new());
    let close = close_app.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = app.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            if buf[..n].starts_with(b"POST") {
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
                close.notified().await;
                return;
            }
            // Health probes.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        }
    });
    let p = ready_proxy(app_addr, |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    // Past the park delay, mid-body: the connection must not be set up to be parked ...
    let waited = tokio::time::timeout(std::time::Duration::from_millis(1500), p.activity.wait_parked(1)).await;
    assert!(waited.is_err(), "a connection in the middle of a request body was parked");
    // ... so when the body is abandoned, the connection closes instead of being parked with
    // the rest of the body still to come (which would then be read as requests). The proxy
    // first reads the rest out for the client, which stops sending: it closes at that bound.
    close_app.notify_one();
    let _ = s.write_all(&[b'x'; 1000]).await;
    let mut rest = Vec::new();
    let bound = drainproxy::body::HOLD_END_MAX + std::time::Duration::from_secs(3);
    let read = tokio::time::timeout(bound, s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert_eq!(p.activity.parked(), 0);
    assert!(
        !String::from_utf8_lossy(&rest).contains("400"),
        "body bytes were read as a request: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

pub fn framings(path: &str) -> (&'static [u8], bool) {
    match path {
        "/length" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            false,
        ),
        "/interim" => (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        "/head" => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", false),
        "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/to-end" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
        "/both" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n", false),
        "/extra" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale", false),
        "/bad-length" => (b"HTTP/1.1 200 OK\r\ncontent-length: 12abc\r\n\r\nhello", false),
        "/switch" => (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n", false),
        "/bad-chunk" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", false),
        "/http10" => (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", false),
    }
}

/// Bodiless requests take the proxy's own HTTP/1.1 exchange (`lean`): every framing of
/// RFC 9112 §6.3 reaches the client whole, and the app connection is used again only after
/// a response framed by its length or chunks with nothing after it.
#[tokio::test]
async fn every_http1_response_framing_reaches_the_client_and_only_clean_ends_reuse_the_connection() {
    use std::sync::atomic::Ordering::SeqCst;
    let Scripted { addr, accepted, .. } = scripted_app(framings).await;
    let p = proxy(addr, |c| c.health.path = None).await;
    let mut c = h1(p.proxy_addr).await;
    for (path, body) in [("/length", "hello"), ("/chunked", "hello world"), ("/interim", "ok"), ("/empty", "")] {
        let r = c.get(path).await;
        assert_eq!((r.text().as_str(), r.status.is_success()), (body, true), "{path}");
    }
    let head = c.send(Request::head("/head").header("host", "a").body(full(Bytes::new())).unwrap()).await;
    assert_eq!((head.status.as_u16(), head.headers["content-length"].to_str().unwrap()), (200, "100"));
    assert_eq!(c.get("/length").await.text(), "hello");
    assert_eq!(accepted.load(SeqCst), 1, "every clean end reuses the app connection");

    // A body that runs to the connection's end, one framed both ways, and one followed by
    // bytes nobody asked for: each is whole, and each leaves its connection closed.
    for (path, body) in [("/to-end", "until the end"), ("/both", "ok"), ("/extra", "ok")] {
        let before = accepted.load(SeqCst);
        assert_eq!(c.get(path).await.text(), body, "{path}");
        assert_eq!(c.get("/length").await.text(), "hello", "after {path}");
        assert_eq!(accepted.load(SeqCst), before + 1, "{path} is not followed on its connection");
    }

    // Over HTTP/2, the chunked body's trailers come along.
    let (mut s, _conn) = h2(p.proxy_addr).await;
    let res = s.send_request(h2_get(p.proxy_addr, "/chunked")).await.unwrap();
    let collected = res.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().map(|t| t["x-sum"].clone()), Some(http::HeaderValue::from_static("11")));
    assert_eq!(collected.to_bytes(), "hello world");
}

#[tokio::test]
async fn a_response_the_proxy_cannot_frame_is_a_502_or_a_cut_body() {
    let Scripted { addr, .. } = scripted_app(framings).await;
    let p = proxy(addr, |c| c.health.path = None).await;
    for path in ["/bad-length", "/switch"] {
        let r = get(p.proxy_addr, path).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert!(r.headers.get("x-drainproxy-not-forwarded").is_none(), "{path}: the app saw the request");
    }
    // The head was fine, so the client's exchange is cut wherever the bad chunk finds it (hyper
    // sends a head with the body's first bytes): never a whole response.
    let mut c = h1(p.proxy_addr).await;
    c.sender.ready().await.unwrap();
    let res = c.sender.send_request(Request::get("/bad-chunk").header("host", "a").body(full(Bytes::new())).unwrap());
    if let Ok(res) = res.await {
        assert!(res.into_body().collect().await.is_err(), "the client must not take a cut body for a whole one");
    }
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "drainproxy_upstream_errors_total", &[("kind", "response")]), 2.0);
}

/// A response head past 256 KiB is refused; one with more fields than fit the parser's first
/// try is not.
#[tokio::test]
async fn response_heads_are_bounded_in_bytes_not_in_fields() {
    fn big(path: &str) -> (&'static [u8], bool) {
        static MANY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let head = |fields: usize, width: usize| {
            let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..fields {
                h.extend_from_slice(format!("x-{i}: {}\r\n", "v".repeat(width)).as_bytes());
            }
            h.extend_from_slice(b"content-length: 2\r\n\r\nok");
            h
        };
        match path {
            "/many" => (MANY.get_or_init(|| head(90, 8)), false),
            _ => (HUGE.get_or_init(|| head(40, 8 * 1024)), false),
        }
    }
    let Scripted { addr, .. } = scripted_app(big).await;
    let p = proxy(addr, |c| c.health.path = None).await;
    let r = get(p.proxy_addr, "/many").await;
    assert_eq!((r.status.as_u16(), r.headers.len() > 90, r.text().as_str()), (200, true, "ok"));
    assert_eq!(get(p.proxy_addr, "/huge").await.status, 502);
}

/// An HTTP/1.0 app (Python's `http.server`) answers and closes; the proxy answers its client
/// as HTTP/1.1 and keeps the client's connection.
#[tokio::test]
async fn an_http10_app_does_not_close_the_clients_keep_alive() {
    let Scripted { addr, accepted, .. } = scripted_app(framings).await;
    let p = proxy(addr, |c| c.health.path = None).await;
    let mut c = h1(p.proxy_addr).await;
    for i in 0..3 {
        c.sender.ready().await.unwrap_or_else(|e| panic!("request {i}: the client connection closed: {e}"));
        let res = c.sender.send_request(Request::get("/http10").header("host", "a").body(full(Bytes::new())).unwrap());
        let res = res.await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_11);
        assert_eq!(read(res).await.text(), "ok");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3, "the app closes after each answer");
}
