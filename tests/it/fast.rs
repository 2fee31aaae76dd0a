//! The HTTP/1.1 fast path (`fast.rs`) against hyper's server path, side by side: the same raw
//! requests to two proxies, one with `runtime.http1_fast_path` and one without, each in front
//! of its own scripted app. Clients must get the same responses (field order, field-name case
//! and `Date` values aside) and the apps the same request heads.
//!
//! Which path served is visible: the fast path passes the app's field names as they came
//! (`X-App`), hyper writes them in lower case.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Every response names `X-App` in mixed case; only `/length` carries the app's own `Date`.
fn answers(path: &str) -> (&'static [u8], bool) {
    match path {
        "/length" => {
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: a\r\nx-app: b\r\nDate: Mon, 07 Dec 2026 00:00:00 GMT\r\n\r\nhello", false)
        }
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\nX-App: a\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 11\r\nX-Undeclared: 1\r\n\r\n",
            false,
        ),
        "/to-end" => (b"HTTP/1.1 200 OK\r\nX-App: a\r\n\r\nuntil the end", true),
        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-App: a\r\n\r\n", false),
        "/no-content" => (b"HTTP/1.1 204 No Content\r\nX-App: a\r\n\r\n", false),
        "/not-modified" => (b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nX-App: a\r\n\r\n", false),
        "/reason" => (b"HTTP/1.1 404 Gone Fishing\r\nContent-Length: 0\r\nX-App: a\r\n\r\n", false),
        "/no-reason" => (b"HTTP/1.1 200 \r\nContent-Length: 2\r\nX-App: a\r\n\r\nok", false),
        "/named" => (
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nUpgrade: foo\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok",
            false,
        ),
        "/hop" => (
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nUpgrade: foo\r\nTE: x\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok",
            false,
        ),
        "/interim" => {
            (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok", false)
        }
        "/both" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\nX-App: a\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            false,
        ),
        "/bad-length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\nX-App: a\r\n\r\nhello", false),
        "/http10" => (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok", true),
        "/app-close" => (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok", true),
        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok", false),
    }
}

/// What a client saw: the responses to its requests, and whether the connection stayed open
/// for another (a request sent after them was answered).
#[derive(Debug, PartialEq)]
struct Seen {
    responses: Vec<Norm>,
    kept_open: bool,
}

/// Sends `raw`, reads the responses to requests with `methods`, then tries one more request.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8], methods: &[&str]) -> (Seen, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let mut eof = false;
    let responses = loop {
        if let Some(r) = responses(&got, methods, eof) {
            break r;
        }
        assert!(!eof, "the connection ended mid-response: {:?}", String::from_utf8_lossy(&got));
        let mut buf = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("a response").unwrap_or(0);
        eof = n == 0;
        got.extend_from_slice(&buf[..n]);
    };
    let kept_open = !eof && s.write_all(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n").await.is_ok() && {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer or the end");
        n.is_ok_and(|n| n > 0)
    };
    (Seen { responses, kept_open }, got)
}

/// A response as a client reads it, in a form both paths must agree on.
#[derive(Debug, PartialEq)]
struct Norm {
    status_line: String,
    /// Lower-case names, sorted by name (values of one name keep their order); no `Date`.
    fields: Vec<(String, String)>,
    date: bool,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

fn sorted_fields<'a>(fields: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> =
        fields.map(|(n, v)| (n.to_ascii_lowercase(), String::from_utf8_lossy(v).into_owned())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Splits a byte stream into responses to requests with these methods, decoding chunks;
/// `None` while it is incomplete (a body to the connection's end is complete at `eof`).
fn responses(mut raw: &[u8], methods: &[&str], eof: bool) -> Option<Vec<Norm>> {
    let mut out = Vec::new();
    for method in methods {
        let (norm, used) = one_response(raw, method, eof)?;
        out.push(norm);
        raw = &raw[used..];
    }
    assert!(raw.is_empty(), "bytes after the last response: {:?}", String::from_utf8_lossy(raw));
    Some(out)
}

/// The response at the start of `raw` to a request with `method`, and its length in bytes;
/// `None` while it is incomplete.
fn one_response(raw: &[u8], method: &str, eof: bool) -> Option<(Norm, usize)> {
    fn line(raw: &[u8]) -> Option<(&[u8], &[u8])> {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        Some((&raw[..end], &raw[end + 2..]))
    }
    let all = raw.len();
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => panic!("not a response head ({e}): {:?}", String::from_utf8_lossy(raw)),
    };
    if res.code.is_some_and(|c| (100..200).contains(&c)) {
        // An interim answer (hyper's own `100 Continue`): the final one follows.
        let (norm, used) = one_response(&raw[len..], method, eof)?;
        return Some((norm, len + used));
    }
    let code = res.code.unwrap();
    let status_line = format!("HTTP/1.{} {} {}", res.version.unwrap(), code, res.reason.unwrap_or(""));
    let get = |name: &str| res.headers.iter().find(|f| f.name.eq_ignore_ascii_case(name)).map(|f| f.value);
    let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
    let length = get("content-length").map(|v| std::str::from_utf8(v).unwrap().parse::<usize>().unwrap());
    let date = get("date").is_some();
    let fields =
        sorted_fields(res.headers.iter().filter(|f| !f.name.eq_ignore_ascii_case("date")).map(|f| (f.name, f.value)));
    let mut raw = &raw[len..];
    let (mut body, mut trailers) = (Vec::new(), Vec::new());
    if method == "HEAD" || code == 204 || code == 304 {
    } else if chunked {
        loop {
            let (size, rest) = line(raw)?;
            let size = usize::from_str_radix(std::str::from_utf8(size).unwrap(), 16).unwrap();
            raw = rest;
            if size == 0 {
                break;
            }
            if raw.len() < size + 2 {
                return None;
            }
            body.extend_from_slice(&raw[..size]);
            assert_eq!(&raw[size..size + 2], b"\r\n");
            raw = &raw[size + 2..];
        }
        loop {
            let (field, rest) = line(raw)?;
            raw = rest;
            if field.is_empty() {
                break;
            }
            let (n, v) = std::str::from_utf8(field).unwrap().split_once(':').unwrap();
            trailers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    } else if let Some(n) = length {
        if raw.len() < n {
            return None;
        }
        body.extend_from_slice(&raw[..n]);
        raw = &raw[n..];
    } else if eof {
        body.extend_from_slice(raw);
        raw = &[];
    } else {
        return None;
    }
    Some((Norm { status_line, fields, date, body, trailers }, all - raw.len()))
}

/// A request head as the app read it: request line, then its fields as in [`Norm`].
fn norm_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap().to_string();
    let fields = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n, v.trim().as_bytes()));
    (request_line, sorted_fields(fields))
}

/// Which path answered: the fast path keeps the app's `X-App`, hyper lower-cases it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Fast,
    Hyper,
    /// The proxy answered on its own (an error, a 400): nothing tells the paths apart.
    Either,
}

#[tokio::test]
async fn the_fast_path_answers_as_hyper_does_and_sends_the_app_the_same_heads() {
    let (fast_app, hyper_app) = (scripted_app(answers).await, scripted_app(answers).await);
    let fast = proxy(fast_app.addr, |c| c.health.path = None).await;
    let slow = proxy(hyper_app.addr, |c| {
        c.health.path = None;
        c.runtime.http1_fast_path = false;
    })
    .await;
    let many_fields: String = (0..70).map(|i| format!("x-f{i}: {i}\r\n")).collect();
    let many = format!("GET /many HTTP/1.1\r\nHost: a\r\n{many_fields}\r\n");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    let post = |n: usize| {
        let body: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        format!("POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n{body}{}", get("/length"))
    };
    let (big_body, too_big_body) = (post(drainproxy::fast::BODY_MAX), post(drainproxy::fast::BODY_MAX + 1));
    let cases: Vec<(String, Vec<&str>, Path)> = vec![
        (get("/length"), vec!["GET"], Path::Fast),
        ("GET /chunked HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n".into(), vec!["GET"], Path::Fast),
        (get("/chunked"), vec!["GET"], Path::Fast),
        (get("/to-end"), vec!["GET"], Path::Fast),
        ("HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n".into(), vec!["HEAD"], Path::Fast),
        (get("/no-content"), vec!["GET"], Path::Fast),
        (get("/not-modified"), vec!["GET"], Path::Fast),
        (get("/reason"), vec!["GET"], Path::Fast),
        (get("/no-reason"), vec!["GET"], Path::Fast),
        (get("/named"), vec!["GET"], Path::Fast),
        (get("/hop"), vec!["GET"], Path::Fast),
        (get("/interim"), vec!["GET"], Path::Fast),
        (get("/both"), vec!["GET"], Path::Fast),
        (get("/bad-length"), vec!["GET"], Path::Either),
        (get("/http10"), vec!["GET"], Path::Fast),
        (get("/app-close"), vec!["GET"], Path::Fast),
        ("DELETE /x?q=1&r=%20 HTTP/1.1\r\nHost: a\r\n\r\n".into(), vec!["DELETE"], Path::Fast),
        ("GET /length HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n".into(), vec!["GET"], Path::Fast),
        ("GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n".into(), vec!["GET"], Path::Fast),
        (get("/length").replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"), vec!["GET"], Path::Fast),
        (
            "GET /fwd HTTP/1.1\r\nHost: a.example:8080\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2, 10.0.0.3\r\nX-Forwarded-Proto: https\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n".into(),
            vec!["GET"],
            Path::Fast,
        ),
        (
            "GET /fwd HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: front.example\r\nConnection: keep-alive, close\r\n\r\n".into(),
            vec!["GET"],
            Path::Fast,
        ),
        (
            format!("{}HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n{}", get("/length"), get("/chunked")),
            vec!["GET", "HEAD", "GET"],
            Path::Fast,
        ),
        // A body up to `BODY_MAX` is read whole and sent behind its head.
        (
            format!("{}POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd{}", get("/length"), get("/x")),
            vec!["GET", "POST", "GET"],
            Path::Fast,
        ),
        // (Both framings at once, answered to a request with a body: the length must not
        // reach the client.)
        ("POST /both HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx".into(), vec!["POST"], Path::Fast),
        ("POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd".into(), vec!["POST"], Path::Fast),
        ("PUT /post HTTP/1.0\r\nHost: a\r\ncontent-length:0\r\n\r\n".into(), vec!["PUT"], Path::Fast),
        (big_body.clone(), vec!["POST", "GET"], Path::Fast),
        // Handed to hyper from the start: a larger body, which hyper streams; a length said
        // twice, with a leading zero, or with `Expect`; a chunked body.
        (too_big_body, vec!["POST", "GET"], Path::Hyper),
        ("POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd".into(), vec!["POST"], Path::Hyper),
        ("POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 04\r\n\r\nabcd".into(), vec!["POST"], Path::Hyper),
        ("POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nabcd".into(), vec!["POST"], Path::Hyper),
        ("POST /post HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n".into(), vec!["POST"], Path::Hyper),
        ("GET http://a/abs HTTP/1.1\r\nHost: a\r\n\r\n".into(), vec!["GET"], Path::Hyper),
        ("GET /no-host HTTP/1.0\r\n\r\n".into(), vec!["GET"], Path::Hyper),
        ("GET /named HTTP/1.1\r\nHost: a\r\nConnection: X-Foo\r\nX-Foo: 1\r\n\r\n".into(), vec!["GET"], Path::Hyper),
        ("GET /frag#x HTTP/1.1\r\nHost: a\r\n\r\n".into(), vec!["GET"], Path::Hyper),
        ("GET /q?a=\"b\" HTTP/1.1\r\nHost: a\r\n\r\n".into(), vec!["GET"], Path::Either),
        ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".into(), vec!["OPTIONS"], Path::Hyper),
        (
            "GET /h2c HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n".into(),
            vec!["GET"],
            Path::Hyper,
        ),
        (many, vec!["GET"], Path::Hyper),
        ("GET /two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), vec!["GET"], Path::Either),
        ("GET /no-host HTTP/1.1\r\n\r\n".into(), vec!["GET"], Path::Either),
        ("GET /bad HTTP/1.1\r\nHost: a\r\nBad Field: x\r\n\r\n".into(), vec!["GET"], Path::Either),
        ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n".into(), vec!["CONNECT"], Path::Either),
    ];
    for (raw, methods, path) in &cases {
        let (fast_seen, fast_out) = exchange(fast.proxy_addr, raw.as_bytes(), methods).await;
        let (hyper_seen, _) = exchange(slow.proxy_addr, raw.as_bytes(), methods).await;
        let what = raw.lines().next().unwrap();
        assert_eq!(fast_seen, hyper_seen, "{what}");
        // (A request without a host goes with the app's own address: each app has its own.)
        let heads = |app: &Scripted| {
            let addr = app.addr.to_string();
            app.heads.lock().unwrap().drain(..).map(|h| norm_head(&h.replace(&addr, "APP"))).collect::<Vec<_>>()
        };
        assert_eq!(heads(&fast_app), heads(&hyper_app), "what the app read for {what}");
        let text = String::from_utf8_lossy(&fast_out);
        match path {
            Path::Fast => assert!(text.contains("X-App: a"), "{what} took the fast path:\n{text}"),
            Path::Hyper => {
                assert!(text.contains("x-app: a") && !text.contains("X-App"), "{what} went to hyper:\n{text}")
            }
            Path::Either => {}
        }
    }

    // Where the paths differ on purpose: a body to the connection's end, to an HTTP/1.0 client
    // that asked to keep its connection, cannot keep it. hyper says `keep-alive` and closes;
    // the fast path says `close`.
    let raw = b"GET /to-end HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";
    let (f, _) = exchange(fast.proxy_addr, raw, &["GET"]).await;
    let (h, _) = exchange(slow.proxy_addr, raw, &["GET"]).await;
    assert_eq!((f.kept_open, h.kept_open), (false, false));
    assert_eq!(f.responses[0].body, h.responses[0].body);
    assert!(f.responses[0].fields.contains(&("connection".into(), "close".into())), "{f:?}");
    fast_app.heads.lock().unwrap().clear();
    hyper_app.heads.lock().unwrap().clear();

    // The app's `Date` is passed on; without one, each path adds its own.
    let (_, out) = exchange(fast.proxy_addr, get("/length").as_bytes(), &["GET"]).await;
    assert!(String::from_utf8_lossy(&out).contains("Date: Mon, 07 Dec 2026 00:00:00 GMT\r\n"));
    let (seen, _) = exchange(fast.proxy_addr, get("/x").as_bytes(), &["GET"]).await;
    assert!(seen.responses[0].date);
}

/// Answers the proxy makes itself on the fast path (the app unreachable) are hyper's.
#[tokio::test]
async fn the_fast_path_answers_an_unreachable_app_as_hyper_does() {
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let fast = proxy(closed, |c| c.health.path = None).await;
    let slow = proxy(closed, |c| {
        c.health.path = None;
        c.runtime.http1_fast_path = false;
    })
    .await;
    for (raw, method) in [
        ("GET /x HTTP/1.1\r\nHost: a\r\n\r\n", "GET"),
        ("HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", "HEAD"),
        ("GET /x HTTP/1.0\r\nHost: a\r\n\r\n", "GET"),
    ] {
        let (f, _) = exchange(fast.proxy_addr, raw.as_bytes(), &[method]).await;
        let (h, _) = exchange(slow.proxy_addr, raw.as_bytes(), &[method]).await;
        assert_eq!(f, h, "{raw}");
        assert_eq!(f.responses[0].status_line.split(' ').nth(1), Some("503"), "{raw}");
    }
    // An HTTP/1.0 client that asked to keep its connection: hyper writes `connection: close,
    // keep-alive` on a retry hint (it appends its own token); the fast path says `close`
    // alone, which is what happens.
    let raw = b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";
    let (f, _) = exchange(fast.proxy_addr, raw, &["GET"]).await;
    assert!(!f.kept_open);
    assert!(f.responses[0].fields.contains(&("connection".into(), "close".into())), "{f:?}");
}

/// A body the app sends in parts reaches the client part by part (an event stream, a long
/// download), over plain TCP and TLS, chunked and with a length: the app sends its second part
/// only once the client has read the first.
#[tokio::test]
async fn a_body_the_app_sends_in_parts_reaches_the_client_part_by_part() {
    use std::sync::Arc;
    let dir = crate::tls::tempdir("fast-stream");
    let pair = crate::tls::pair(&dir, "s");
    let parts: [(&[u8], &[u8]); 2] = [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n", b"4\r\nlast\r\n0\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nfirst", b"last"),
    ];
    for (head_and_first, rest) in parts {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let go = Arc::new(tokio::sync::Notify::new());
        let app_go = go.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let go = app_go.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    s.write_all(head_and_first).await.unwrap();
                    go.notified().await;
                    s.write_all(rest).await.unwrap();
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        for tls in [false, true] {
            let p = proxy(addr, |c| {
                c.health.path = None;
                if tls {
                    crate::tls::with_tls(c, &pair);
                }
            })
            .await;
            let mut s: Box<dyn Stream> = if tls {
                Box::new(crate::tls::connect(p.proxy_addr, &[&pair.der], &[b"http/1.1"]).await)
            } else {
                Box::new(TcpStream::connect(p.proxy_addr).await.unwrap())
            };
            s.write_all(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
            let mut got = Vec::new();
            read_until(&mut s, &mut got, b"first").await;
            go.notify_one();
            read_until(&mut s, &mut got, b"last").await;
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Stream for T {}

/// Reads until `want` has arrived (bounded).
async fn read_until(s: &mut Box<dyn Stream>, got: &mut Vec<u8>, want: &[u8]) {
    let mut buf = [0u8; 4096];
    while !got.windows(want.len()).any(|w| w == want) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("{:?} never arrived; got {:?}", String::from_utf8_lossy(want), String::from_utf8_lossy(got))
            })
            .unwrap();
        assert!(n > 0, "the connection ended before {:?}", String::from_utf8_lossy(want));
        got.extend_from_slice(&buf[..n]);
    }
}

/// A small deterministic generator (xorshift64*): the random cases below are the same on every
/// run, and a failing one is named by its number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

/// Up to `most` places, in order, to cut `len` bytes at: heads and bodies cut anywhere, as a
/// slow client's segments cut them.
fn random_cuts(rng: &mut Rng, len: usize, most: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.below(most + 1)).map(|_| rng.below(len)).collect();
    cuts.sort_unstable();
    cuts
}

/// A field name in the case a client might use: as written, lower, upper, or mixed.
fn any_case(rng: &mut Rng, name: &str) -> String {
    match rng.below(4) {
        0 => name.to_string(),
        1 => name.to_ascii_lowercase(),
        2 => name.to_ascii_uppercase(),
        _ => {
            name.chars().map(|c| if rng.chance(50) { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect()
        }
    }
}

/// One request of a random pipeline, and its method; `last` asks the proxy to close after it.
/// With `random_answers`, the path names one of that many random app answers (`/r/<i>`).
/// Without `keep_alive_10`, no HTTP/1.0 request asks to keep its connection.
fn random_request(
    rng: &mut Rng,
    last: bool,
    random_answers: Option<usize>,
    keep_alive_10: bool,
) -> (String, &'static str) {
    let method = *rng.pick(&["GET", "GET", "GET", "GET", "HEAD", "HEAD", "DELETE", "OPTIONS", "POST"]);
    let http10 = rng.chance(15);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut field = |rng: &mut Rng, name: &str, value: &str| {
        let ows = |rng: &mut Rng| *rng.pick(&["", "", " ", "\t", "  "]);
        let value = format!("{}{value}{}", ows(rng), ows(rng));
        fields.push((any_case(rng, name), value));
    };
    match rng.below(20) {
        0 if !http10 => {}
        1 => {
            field(rng, "Host", "a");
            field(rng, "Host", "b");
        }
        _ => {
            let host = *rng.pick(&["a", "a.example:8080", "[::1]:80"]);
            field(rng, "Host", host);
        }
    }
    let mut connection: Vec<&str> = Vec::new();
    if rng.chance(20) {
        connection.push(*rng.pick(&["keep-alive", "close", "Keep-Alive", "X-Foo", "Upgrade"]));
    }
    if rng.chance(10) {
        connection.push(*rng.pick(&["keep-alive", "close"]));
    }
    if last {
        connection.push("close");
    }
    if http10 && (random_answers.is_some() || !keep_alive_10) {
        // Any random answer may end at the connection's end, as every answer does during a
        // drain: the known difference below.
        connection.retain(|t| !t.eq_ignore_ascii_case("keep-alive"));
    }
    let keep_alive_10 = http10 && connection.iter().any(|t| t.eq_ignore_ascii_case("keep-alive"));
    for _ in 0..rng.below(5) {
        let (name, value): (&str, String) = match rng.below(13) {
            0 => ("X-Forwarded-For", rng_ip(rng).into()),
            1 => ("X-Forwarded-For", format!("{}, {}", rng_ip(rng), rng_ip(rng))),
            2 => ("X-Forwarded-Proto", "https".into()),
            3 => ("X-Forwarded-Host", "front.example".into()),
            4 => ("TE", (*rng.pick(&["trailers", "gzip", "trailers, deflate"])).into()),
            5 => ("Keep-Alive", "timeout=5".into()),
            6 => ("Proxy-Connection", "keep-alive".into()),
            7 => ("Cookie", (*rng.pick(&["a=1", "b=2; c=3"])).into()),
            8 => ("Accept", "*/*".into()),
            9 => ("X-Foo", "1".into()),
            10 => ("Upgrade", "foo".into()),
            11 if rng.chance(30) => ("Expect", "100-continue".into()),
            _ => ("User-Agent", "random/1.0".into()),
        };
        field(rng, name, &value);
    }
    if !connection.is_empty() {
        field(rng, "Connection", &connection.join(", "));
    }
    // An HTTP/1.0 client that asked to keep its connection gets a body to the connection's
    // end (the app's own, or chunks it cannot take) with `close` on the fast path and
    // `keep-alive` from hyper: a known difference (the side-by-side test above states it), so
    // not drawn here.
    let paths: &[&str] = if keep_alive_10 {
        &["/length", "/head", "/no-content", "/not-modified", "/reason", "/named", "/hop", "/x"]
    } else {
        &[
            "/length",
            "/chunked",
            "/to-end",
            "/head",
            "/no-content",
            "/not-modified",
            "/reason",
            "/no-reason",
            "/named",
            "/hop",
            "/interim",
            "/both",
            "/http10",
            "/app-close",
            "/x",
        ]
    };
    // `/head` announces a body it never sends: for HEAD only.
    let path = match *rng.pick(paths) {
        "/head" if method != "HEAD" => "/length".to_string(),
        path => path.to_string(),
    };
    // A random answer to HEAD is its head alone (`/h`), as an app answers HEAD.
    // (Not a faulty answer to a POST: without the fast path, hyper's client carries the body
    // and refuses those, where the lean client passes them on.)
    let path = match random_answers {
        Some(n) => {
            let mut i = rng.below(n);
            while method == "POST" && self::random_answers()[i].faulty {
                i = rng.below(n);
            }
            format!("/r/{i}{}", if method == "HEAD" { "/h" } else { "" })
        }
        None => path,
    };
    let body = if method == "POST" {
        // Mostly small; now and then more than one read, or more than the fast path takes.
        let n = match rng.below(20) {
            0 => 5000 + rng.below(3000),
            1 => drainproxy::fast::BODY_MAX - 100 + rng.below(200),
            _ => rng.below(40),
        };
        let body: String = (0..n).map(|_| char::from(b'a' + rng.below(26) as u8)).collect();
        field(rng, "Content-Length", &body.len().to_string());
        body
    } else {
        String::new()
    };
    let mut raw = format!("{method} {path} HTTP/1.{}\r\n", if http10 { 0 } else { 1 });
    for (name, value) in &fields {
        raw.push_str(&format!("{name}:{value}\r\n"));
    }
    raw.push_str("\r\n");
    raw.push_str(&body);
    (raw, method)
}

fn rng_ip(rng: &mut Rng) -> &'static str {
    const IPS: [&str; 4] = ["10.0.0.1", "192.0.2.7", "2001:db8::1", "unknown"];
    IPS[rng.below(IPS.len())]
}

/// Sends `raw`, in pieces cut at `cuts`, and reads until the proxy closes: every random
/// pipeline ends with `Connection: close`. The responses are those that arrived whole, in
/// order.
async fn until_end(addr: std::net::SocketAddr, raw: &[u8], cuts: &[usize], methods: &[&str]) -> (Vec<Norm>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut from = 0;
    for &cut in cuts.iter().chain([raw.len()].iter()) {
        // A piece is its own segment: written, then the proxy may read it before the next. A
        // proxy that closed early (after an error, or a close) takes no more.
        if s.write_all(&raw[from..cut]).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
        from = cut;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match read.expect("the proxy closes after `Connection: close`") {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let mut out = Vec::new();
    let mut rest = &got[..];
    for method in methods {
        match one_response(rest, method, true) {
            Some((norm, used)) => {
                out.push(norm);
                rest = &rest[used..];
            }
            None => break,
        }
    }
    assert!(rest.is_empty(), "bytes after the last whole response: {:?}", String::from_utf8_lossy(rest));
    (out, got)
}

/// Two proxies, with and without the fast path, each in front of its own scripted app.
struct Pair {
    fast_app: Scripted,
    hyper_app: Scripted,
    fast: drainproxy::app::Running,
    slow: drainproxy::app::Running,
}

impl Pair {
    async fn new(answer: fn(&str) -> (&'static [u8], bool), tweak: fn(&mut drainproxy::config::Config)) -> Pair {
        let (fast_app, hyper_app) = (scripted_app(answer).await, scripted_app(answer).await);
        let fast = proxy(fast_app.addr, |c| {
            c.health.path = None;
            tweak(c);
        })
        .await;
        let slow = proxy(hyper_app.addr, |c| {
            c.health.path = None;
            c.runtime.http1_fast_path = false;
            tweak(c);
        })
        .await;
        Pair { fast_app, hyper_app, fast, slow }
    }

    /// Sends `cases` random pipelines (`random_answers`, `keep_alive_10`: see
    /// [`random_request`]) through both proxies, heads cut anywhere: the clients must read the
    /// same responses and the apps the same heads. `check` sees each case's responses as well;
    /// at the end, both paths must have answered (the fast path keeps the app's `X-App`).
    async fn compare(
        &self,
        rng: &mut Rng,
        cases: usize,
        (random_answers, keep_alive_10): (Option<usize>, bool),
        mut check: impl FnMut(usize, &str, &[&str], &[Norm]),
    ) {
        // hyper's client, which carries a request body without the fast path, speaks HTTP/1.0
        // (with `Connection: keep-alive`) on a connection whose app answered in HTTP/1.0
        // before; the fast path and the lean client always speak HTTP/1.1.
        let heads = |app: &Scripted| {
            let addr = app.addr.to_string();
            let mut heads =
                app.heads.lock().unwrap().drain(..).map(|h| norm_head(&h.replace(&addr, "APP"))).collect::<Vec<_>>();
            for (line, fields) in &mut heads {
                if let Some(start) = line.strip_suffix(" HTTP/1.0") {
                    *line = format!("{start} HTTP/1.1");
                    fields.retain(|(n, v)| !(n == "connection" && v == "keep-alive"));
                }
            }
            heads
        };
        let (mut fast_served, mut all) = (0, 0);
        for case in 0..cases {
            let count = 1 + rng.below(4);
            let (mut raw, mut methods) = (String::new(), Vec::new());
            for i in 0..count {
                let (request, method) = random_request(rng, i + 1 == count, random_answers, keep_alive_10);
                raw.push_str(&request);
                methods.push(method);
            }
            let cuts = random_cuts(rng, raw.len(), 3);
            let (f, out) = until_end(self.fast.proxy_addr, raw.as_bytes(), &cuts, &methods).await;
            let (h, _) = until_end(self.slow.proxy_addr, raw.as_bytes(), &cuts, &methods).await;
            assert_eq!(f, h, "case {case}:\n{raw}");
            assert_eq!(heads(&self.fast_app), heads(&self.hyper_app), "what the app read, case {case}:\n{raw}");
            check(case, &raw, &methods, &f);
            fast_served += String::from_utf8_lossy(&out).matches("X-App: a").count();
            all += f.len();
        }
        // Both paths were exercised: most requests qualify for the fast path, some go to hyper.
        eprintln!("{fast_served} of {all} responses from the fast path");
        assert!(fast_served * 10 > all * 3 && fast_served < all, "{fast_served} of {all} from the fast path");
    }
}

/// Random pipelines of the requests the cases above are made of (methods, versions, hop-by-hop
/// and forwarding fields in any case and spacing, bodies, errors) through both paths: the
/// clients read the same responses and the apps the same heads.
#[tokio::test]
async fn random_pipelines_are_answered_alike_on_both_paths() {
    let pair = Pair::new(answers, |_| {}).await;
    pair.compare(&mut Rng(0x5eed_d2a1_4b1e_c0de), 1000, (None, true), |_, _, _, _| {}).await;
}

/// The same while both proxies drain (DESIGN §4.2): every response says `Connection: close`
/// and is the connection's last, on either path.
#[tokio::test]
async fn random_pipelines_during_a_drain_are_answered_alike_and_closed() {
    let pair = Pair::new(answers, |c| {
        // Draining for the whole test: idle connections are not closed, the listener stays.
        c.drain.min_delay = drainproxy::config::Dur(Duration::from_secs(120));
        c.drain.max_duration = drainproxy::config::Dur(Duration::from_secs(180));
    })
    .await;
    start_drain(&pair.fast).await;
    start_drain(&pair.slow).await;
    let check = |case: usize, raw: &str, _: &[&str], got: &[Norm]| {
        assert!(got.len() <= 1, "case {case}: {} responses on a draining connection:\n{raw}", got.len());
        // (hyper, serving what the fast path hands it, may add `keep-alive` after `close` for
        // an HTTP/1.0 client that asked for it: `close` wins, RFC 9112 §9.6.)
        for r in got {
            let close = r.fields.iter().any(|(n, v)| n == "connection" && v.split(',').any(|t| t.trim() == "close"));
            assert!(close, "case {case}: {r:?}\n{raw}");
        }
    };
    pair.compare(&mut Rng(0xd2a1_0000_5eed_0003), 300, (None, false), check).await;
}

/// What the app answers `/r/<i>` with (`/r/<i>/h`: the head alone), and whether it closes
/// after each; made once, from a fixed seed.
struct Answer {
    /// The answer, and whether the app closes after it.
    full: &'static [u8],
    close: bool,
    /// Its head alone (to HEAD), and whether the app closes after it.
    head: &'static [u8],
    head_close: bool,
    /// The final status and the content, decoded, that a client must read.
    status: u16,
    content: Vec<u8>,
    /// HTTP/1.0 with `Transfer-Encoding`: framing RFC 9112 §6.1 calls faulty. The lean client
    /// decodes it and closes; hyper's client refuses it (a 502).
    faulty: bool,
}
const RANDOM_ANSWER_COUNT: usize = 400;

/// The random answers, the same for every test that uses them.
fn random_answers() -> &'static [Answer] {
    static ANSWERS: std::sync::OnceLock<Vec<Answer>> = std::sync::OnceLock::new();
    ANSWERS.get_or_init(|| {
        let mut rng = Rng(0xa115_0f7e_5a3e_0001);
        (0..RANDOM_ANSWER_COUNT).map(|_| make_answer(&mut rng)).collect()
    })
}

fn random_answer(path: &str) -> (&'static [u8], bool) {
    let answers = random_answers();
    let rest = path.strip_prefix("/r/").expect("a random answer's path");
    let (i, head_only) = match rest.strip_suffix("/h") {
        Some(i) => (i, true),
        None => (rest, false),
    };
    let a = &answers[i.parse::<usize>().expect("an index")];
    if head_only {
        (a.head, a.head_close)
    } else {
        (a.full, a.close)
    }
}

/// One random app answer: interim responses, versions, statuses and reasons, every framing
/// (length, chunks with extensions and trailers, both at once, to the connection's end),
/// hop-by-hop fields and `Connection` naming others, field names in any case.
fn make_answer(rng: &mut Rng) -> Answer {
    let mut head = String::new();
    if rng.chance(10) {
        let interim = *rng.pick(&["HTTP/1.1 100 Continue\r\n\r\n", "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]);
        head.push_str(interim);
    }
    let http10 = rng.chance(15);
    let status = *rng.pick(&[200u16, 200, 200, 201, 206, 301, 404, 500, 204, 304]);
    let reason = match rng.below(6) {
        0 => "Fine",
        1 => "",
        _ => http::StatusCode::from_u16(status).unwrap().canonical_reason().unwrap_or(""),
    };
    head.push_str(&format!("HTTP/1.{} {status} {reason}\r\n", if http10 { 0 } else { 1 }));
    // As written, so that the fast path's answers are told apart (hyper lower-cases it).
    head.push_str("X-App: a\r\n");
    let mut field = |rng: &mut Rng, name: &str, value: &str| {
        head.push_str(&format!("{}: {value}\r\n", any_case(rng, name)));
    };
    let mut conn_close = false;
    for _ in 0..rng.below(5) {
        match rng.below(10) {
            0 => field(rng, "Server", "app/1"),
            1 => field(rng, "Content-Type", "text/plain"),
            2 => {
                field(rng, "Set-Cookie", "s=1");
                field(rng, "Set-Cookie", "t=2");
            }
            3 => field(rng, "Keep-Alive", "timeout=5"),
            4 => field(rng, "Proxy-Connection", "keep-alive"),
            5 => field(rng, "Upgrade", "foo"),
            6 => field(rng, "Date", "Mon, 07 Dec 2026 00:00:00 GMT"),
            7 => field(rng, "ETag", "\"v1\""),
            _ => {
                let value = *rng.pick(&["close", "keep-alive", "X-Secret", "keep-alive, X-Secret", "Close"]);
                conn_close |= value.eq_ignore_ascii_case("close");
                field(rng, "Connection", value);
                field(rng, "X-Secret", "1");
            }
        }
    }
    let data = |rng: &mut Rng| "x".repeat(rng.below(30));
    let mut body = Vec::new();
    let mut content = Vec::new();
    let mut to_end = false;
    let mut coded = false;
    let bodiless = status == 204 || status == 304;
    match rng.below(if bodiless { 2 } else { 6 }) {
        // No framing: a body to the connection's end (empty), unless there can be none.
        0 => to_end = !bodiless,
        1 => {
            let n = if bodiless { 7 } else { rng.below(30) };
            field(rng, "Content-Length", &n.to_string());
            if !bodiless {
                body.extend("y".repeat(n).bytes());
                content.extend("y".repeat(n).bytes());
            }
        }
        2 | 3 => {
            let both = rng.chance(30);
            let coding = *rng.pick(&["chunked", "Chunked", "gzip, chunked"]);
            coded = true;
            field(rng, "Transfer-Encoding", coding);
            if both {
                field(rng, "Content-Length", "3");
            }
            if rng.chance(30) {
                field(rng, "Trailer", "X-Sum");
            }
            for _ in 0..rng.below(3) {
                let chunk = data(rng);
                if !chunk.is_empty() {
                    let ext = if rng.chance(20) { ";x=1" } else { "" };
                    body.extend(format!("{:x}{ext}\r\n{chunk}\r\n", chunk.len()).bytes());
                    content.extend(chunk.bytes());
                }
            }
            body.extend(b"0\r\n");
            if rng.chance(30) {
                body.extend(b"X-Sum: 1\r\n");
            }
            body.extend(b"\r\n");
        }
        // To the connection's end, plain or with a coding other than chunked.
        plain_or_coded => {
            if plain_or_coded == 5 {
                field(rng, "Transfer-Encoding", "gzip");
                coded = true;
            }
            let data = data(rng);
            body.extend(data.bytes());
            content.extend(data.bytes());
            to_end = true;
        }
    }
    head.push_str("\r\n");
    let full = [head.as_bytes(), &body].concat();
    Answer {
        full: Box::leak(full.into_boxed_slice()),
        close: conn_close || to_end,
        head: Box::leak(head.into_bytes().into_boxed_slice()),
        head_close: conn_close,
        status,
        content,
        faulty: http10 && coded,
    }
}

/// Random requests to random app answers through both paths: the clients read the same
/// responses and the apps the same heads, and each app answer arrives with the status and the
/// content the app meant.
#[tokio::test]
async fn random_answers_reach_clients_alike_on_both_paths() {
    let pair = Pair::new(random_answer, |_| {}).await;
    // Not only alike: what the app meant. Each app answer (not the proxy's own) arrives with
    // its status and its content whole, however it was framed.
    let check = |case: usize, raw: &str, methods: &[&str], got: &[Norm]| {
        let answers = random_answers();
        let paths = raw.lines().filter_map(|l| l.split(' ').nth(1).filter(|p| p.starts_with("/r/")));
        for ((norm, path), method) in got.iter().zip(paths).zip(methods) {
            if !norm.fields.contains(&("x-app".into(), "a".into())) {
                continue;
            }
            let index = path.trim_start_matches("/r/").trim_end_matches("/h");
            let answer = &answers[index.parse::<usize>().unwrap()];
            assert_eq!(norm.status_line.split(' ').nth(1), Some(answer.status.to_string().as_str()), "case {case}");
            let content: &[u8] = if *method == "HEAD" { &[] } else { &answer.content };
            assert_eq!(norm.body, content, "case {case}, {path}:\n{raw}");
        }
    };
    pair.compare(&mut Rng(0x0dd5_eed5_f00d_0002), 1000, (Some(RANDOM_ANSWER_COUNT), true), check).await;
}

/// The random app answers to an HTTP/2 client (hyper's server, the HTTP/1.1 app behind), to
/// requests with a body and without: each
/// arrives as a valid HTTP/2 response with the app's status and content, no connection-specific
/// field (HTTP/2 forbids them), and a length, if any, that is the content's.
#[tokio::test]
async fn random_answers_reach_http2_clients_whole() {
    let app = scripted_app(random_answer).await;
    let p = proxy(app.addr, |c| c.health.path = None).await;
    let (mut sender, _conn) = h2(p.proxy_addr).await;
    for (i, answer) in random_answers().iter().enumerate() {
        // HEAD and GET go by the lean client, POST with its body by hyper's.
        for method in [http::Method::GET, http::Method::HEAD, http::Method::POST] {
            let head = method == http::Method::HEAD;
            let path = format!("/r/{i}{}", if head { "/h" } else { "" });
            let body = if method == http::Method::POST { full(bytes::Bytes::from_static(b"x")) } else { empty() };
            let req =
                http::Request::builder().method(method.clone()).uri(format!("http://a{path}")).body(body).unwrap();
            sender.ready().await.unwrap();
            let res = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
                .await
                .expect("an answer")
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            let (parts, body) = res.into_parts();
            let body =
                http_body_util::BodyExt::collect(body).await.unwrap_or_else(|e| panic!("{path}: {e}")).to_bytes();
            if answer.faulty && method == http::Method::POST {
                assert_eq!(parts.status, http::StatusCode::BAD_GATEWAY, "{path}");
                continue;
            }
            assert_eq!(parts.status.as_u16(), answer.status, "{path}");
            let content: &[u8] = if head { &[] } else { &answer.content };
            assert_eq!(&body[..], content, "{path}");
            for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
                assert!(!parts.headers.contains_key(name), "{path}: {name} passed on");
            }
            // `X-Secret` goes only where a `Connection` field named it.
            let app_head = String::from_utf8_lossy(answer.head).to_ascii_lowercase();
            let named = app_head.lines().any(|l| l.starts_with("connection:") && l.contains("x-secret"));
            let sent = app_head.lines().any(|l| l.starts_with("x-secret:"));
            assert_eq!(parts.headers.contains_key("x-secret"), sent && !named, "{path}");
            if let (Some(length), false) = (parts.headers.get("content-length"), head) {
                assert_eq!(length.to_str().unwrap(), body.len().to_string(), "{path}");
            }
        }
    }
}

/// Random request bodies, framed by a length or by chunks (any sizes, extensions, trailers),
/// cut anywhere and pipelined between bodiless requests, over HTTP/1.1; and in random DATA
/// frames over HTTP/2. The app reads each body whole and exactly, and the connection carries
/// on: the fast path reads a body up to `BODY_MAX` whole and hands a larger or chunked one to
/// hyper, which serves what follows.
#[tokio::test]
async fn random_request_bodies_reach_the_app_whole() {
    let app = app().await;
    let p = proxy(app.addr, |c| c.health.path = None).await;
    let mut rng = Rng(0xb0d1_e5b0_d1e5_0001);
    // Bytes that look like framing, to catch a body read as anything else.
    let content = |rng: &mut Rng| -> Vec<u8> {
        let alphabet: &[&[u8]] = &[b"x", b"\r\n", b"0", b"0\r\n\r\n", b";", b":", b"\xff", b"GET / HTTP/1.1\r\n"];
        let len = *rng.pick(&[0usize, 1, 7, 100, 3000, 70_000]);
        let mut v = Vec::new();
        while v.len() < len {
            v.extend_from_slice(alphabet[rng.below(alphabet.len())]);
        }
        v.truncate(len);
        v
    };
    for case in 0..300 {
        let count = 1 + rng.below(3);
        let (mut raw, mut methods, mut expected) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..count {
            let close = if i + 1 == count { "Connection: close\r\n" } else { "" };
            if rng.chance(30) {
                raw.extend(format!("GET /x HTTP/1.1\r\nHost: a\r\n{close}\r\n").bytes());
                methods.push("GET");
                expected.push(b"ok".to_vec());
                continue;
            }
            let body = content(&mut rng);
            let expect = if rng.chance(10) { "Expect: 100-continue\r\n" } else { "" };
            if rng.chance(50) {
                raw.extend(
                    format!("POST /echo HTTP/1.1\r\nHost: a\r\n{expect}{close}Content-Length: {}\r\n\r\n", body.len())
                        .bytes(),
                );
                raw.extend(&body);
            } else {
                raw.extend(
                    format!("POST /echo HTTP/1.1\r\nHost: a\r\n{expect}{close}Transfer-Encoding: chunked\r\n\r\n")
                        .bytes(),
                );
                let mut rest = &body[..];
                while !rest.is_empty() {
                    let n = (1 + rng.below(5000)).min(rest.len());
                    let ext = if rng.chance(20) { ";name=value" } else { "" };
                    raw.extend(format!("{n:x}{ext}\r\n").bytes());
                    raw.extend(&rest[..n]);
                    raw.extend(b"\r\n");
                    rest = &rest[n..];
                }
                raw.extend(if rng.chance(20) { &b"0\r\nX-Sum: 1\r\n\r\n"[..] } else { &b"0\r\n\r\n"[..] });
            }
            methods.push("POST");
            expected.push(body);
        }
        let cuts = random_cuts(&mut rng, raw.len(), 4);
        let (got, _) = until_end(p.proxy_addr, &raw, &cuts, &methods).await;
        assert_eq!(got.len(), count, "case {case}: {} of {count} answered", got.len());
        for (i, (r, want)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(r.status_line, "HTTP/1.1 200 OK", "case {case}, request {i}");
            assert!(r.body == *want, "case {case}, request {i}: {} bytes back, {} sent", r.body.len(), want.len());
        }
    }
    // HTTP/2: the same contents in DATA frames of random sizes, on one connection.
    let (mut sender, _conn) = h2(p.proxy_addr).await;
    for case in 0..100 {
        let body = content(&mut rng);
        let mut frames = Vec::new();
        let mut rest = &body[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(20_000)).min(rest.len());
            frames.push(Ok::<_, hyper::Error>(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(&rest[..n]))));
            rest = &rest[n..];
        }
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let req = http::Request::post("http://a/echo").body(http_body_util::BodyExt::boxed(stream)).unwrap();
        sender.ready().await.unwrap();
        let res = sender.send_request(req).await.unwrap_or_else(|e| panic!("h2 case {case}: {e}"));
        assert_eq!(res.status(), 200, "h2 case {case}");
        let back = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
        assert!(back[..] == body[..], "h2 case {case}: {} bytes back, {} sent", back.len(), body.len());
    }
}

/// A request with a body up to `BODY_MAX` is read whole before it goes to the app, and is in
/// flight from its head (a drain would wait for it): the app sees it only once it is whole.
#[tokio::test]
async fn a_request_is_in_flight_while_its_body_comes() {
    let app = app().await;
    let p = ready_proxy(app.addr, |_| {}).await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    wait_metric(&p, "drainproxy_requests_inflight", &[], 1.0).await;
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "half a body reached the app");
    s.write_all(b"world").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("an answer").unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nhelloworld"), "{text}");
    assert_eq!(p.activity.inflight(), 0);
}

/// A body that stops coming for `limits.header_read_timeout` is answered 408 and its
/// connection closed; the app never sees it.
#[tokio::test]
async fn a_stalled_request_body_is_answered_408() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.limits.header_read_timeout = drainproxy::config::Dur::millis(300)).await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let start = std::time::Instant::now();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello").await.unwrap();
    let mut buf = Vec::new();
    // The proxy must answer and close by itself; the bound only keeps a broken build from
    // hanging the suite.
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("closed").unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{text}");
    assert!(text.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(250), "answered too early: {:?}", start.elapsed());
    assert_eq!(app.state.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing forwarded");
    assert_eq!(p.activity.inflight(), 0);
}
