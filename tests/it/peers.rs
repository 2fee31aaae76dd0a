//! Real peers: nginx as the app with curl and h2load as clients, a grpcio client and server,
//! and promtool reading /metrics. `.ci/run` installs them; a missing one fails the test with
//! the name of what to install.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use drainproxy::config::UpstreamProtocol;
use drainproxy::lifecycle::Phase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::*;

fn need(tool: &str) -> String {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool} || ls /usr/sbin/{tool} 2>/dev/null")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(!found.is_empty(), "{tool} is not installed: run `bash .ci/run` once, which installs it");
    found
}

struct Nginx {
    child: tokio::process::Child,
    port: u16,
}

impl Nginx {
    /// SIGTERM lets the master stop its workers (SIGKILL would orphan them).
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

async fn nginx() -> Nginx {
    let bin = need("nginx");
    let port = free_port();
    // One directory per nginx: tests in one process may each run their own.
    let dir = std::env::temp_dir().join(format!("drainproxy-nginx-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"hello\\n\"; }} }} }}\n",
        d = dir.display()
    );
    let path: PathBuf = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(bin)
        .args(["-c"])
        .arg(&path)
        .args(["-p"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Nginx { child, port };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nginx did not start on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_h2load_get_only_2xx_through_the_proxy_in_front_of_nginx() {
    let ngx = nginx().await;
    let app = format!("127.0.0.1:{}", ngx.port).parse().unwrap();
    let p = proxy(app, |c| c.health.path = Some("/".into())).await;
    wait_phase(&p, Phase::Ready).await;
    let url = format!("http://{}/", p.proxy_addr);
    curl_and_h2load(&url, &[(&[], "200 1.1"), (&["--http2-prior-knowledge"], "200 2")]).await;
    ngx.stop().await;
}

/// The same over TLS: curl verifies the certificate and gets HTTP/2 or HTTP/1.1 by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_h2load_over_tls_get_only_2xx_through_the_proxy_in_front_of_nginx() {
    let ngx = nginx().await;
    let app = format!("127.0.0.1:{}", ngx.port).parse().unwrap();
    let pair = crate::tls::pair(&crate::tls::tempdir("peers"), "a");
    let p = proxy(app, |c| {
        c.health.path = Some("/".into());
        crate::tls::with_tls(c, &pair);
    })
    .await;
    wait_phase(&p, Phase::Ready).await;
    let port = p.proxy_addr.port();
    let url = format!("https://localhost:{port}/");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let ca = pair.cert.to_string_lossy().to_string();
    let verified = ["--cacert", &ca, "--resolve", &resolve];
    let http11 = ["--cacert", &ca, "--resolve", &resolve, "--http1.1"];
    // h2load does not verify certificates and resolves localhost itself.
    curl_and_h2load(&url, &[(&verified, "200 2"), (&http11, "200 1.1")]).await;
    ngx.stop().await;
}

/// curl once per `(arguments, "status version")`, then 2,000 requests with h2load over
/// HTTP/2 and over HTTP/1.1: every one must be answered 2xx.
async fn curl_and_h2load(url: &str, curls: &[(&[&str], &str)]) {
    for (extra, want) in curls {
        let out = Command::new(need("curl"))
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
            .args(*extra)
            .arg(url)
            .output()
            .await
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(&line, want, "curl {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for h1 in [false, true] {
        let mut cmd = Command::new(need("h2load"));
        cmd.args(["-n", "2000", "-c", "8", "-m", "4"]);
        if h1 {
            cmd.arg("--h1");
        }
        let out = cmd.arg(url).output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("2000 succeeded") && text.contains("status codes: 2000 2xx"),
            "h2load {url} (h1={h1}):\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_calls_keep_their_trailers() {
    let python = need("python3");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_peer.py");
    let mut server =
        Command::new(&python).args([script, "serve"]).stdout(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("grpc server starts")
        .unwrap()
        .expect("grpc server prints its port (is grpcio installed? `bash .ci/run` installs it)");
    let app = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
    let p = proxy(app, |c| {
        c.health.path = None;
        c.upstream.protocol = UpstreamProtocol::H2c;
    })
    .await;
    wait_phase(&p, Phase::Ready).await;
    let out = Command::new(&python).args([script, "call", &p.proxy_addr.to_string()]).output().await.unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "grpc client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_during_a_drain() {
    let app = app().await;
    let p = ready_proxy(app.addr, |c| c.drain.min_delay = drainproxy::config::Dur::secs(2)).await;
    assert_eq!(get(p.proxy_addr, "/").await.status, 200);
    p.events.send(drainproxy::lifecycle::Event::Drain(drainproxy::lifecycle::Trigger::Http)).await.unwrap();
    wait_phase(&p, Phase::Draining).await;
    assert_eq!(get(p.proxy_addr, "/").await.status, 200);
    let text = metrics(&p).await;
    let mut child = Command::new(need("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    child.stdin.take().unwrap().write_all(text.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool rejected /metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(metric(&text, "drainproxy_phase", &[("phase", "draining")]), 1.0);
}
