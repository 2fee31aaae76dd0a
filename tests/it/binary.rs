//! The real binary: the CLI, exit codes, signals in native and classic sidecar mode, and
//! memory while streaming.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use crate::support::*;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drainproxy-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Proc {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Proc {
    fn start(name: &str, yaml: &str) -> Proc {
        let dir = tmpdir(name);
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cfg = dir.join("config.yaml");
        std::fs::write(&cfg, format!("listen: {listen}\nadmin: {admin}\n{yaml}")).unwrap();
        let log = dir.join("stderr.log");
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, listen, admin, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self, within: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some((s, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    fn rss_kib(&self) -> u64 {
        Proc::rss_of(self.child.id())
    }

    /// Polls an admin path until it returns `want` (the child's readiness is the signal).
    async fn wait_status(&self, path: &str, want: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(self.admin).await {
                drop(s);
                if get(self.admin, path).await.status == want {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{path} never returned {want}; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fast_drain(app: SocketAddr) -> String {
    format!(
        "upstream:\n  address: {app}\nhealth:\n  path: /healthz\n  interval: 20ms\ndrain:\n  min_delay: 300ms\n  quiet_period: 100ms\n  max_duration: 5s\n"
    )
}

#[test]
fn check_reports_every_problem_with_its_line_and_exits_2() {
    let dir = tmpdir("check");
    let file = dir.join("broken.yaml");
    let mut f = std::fs::File::create(&file).unwrap();
    writeln!(f, "listen: 0.0.0.0:8000\ndrain:\n  min_delay: 30s\n  max_duration: 10s\n  quiet: 1s").unwrap();
    let out = Command::new(bin()).args(["check", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.yaml:5: drain.quiet: unknown field"), "{err}");
    assert!(err.contains("2 problems") || err.contains("broken.yaml:3"), "{err}");
}

/// `${NAME}` in a hook is filled at start-up. `check` usually runs where the pod's variables
/// are not set: there a missing one is a note. `run` stops with exit 2, naming file, line and
/// hook. A hook's CA file is read by both, like the TLS files.
#[test]
fn hook_templates_and_files_are_checked_before_start_up() {
    let dir = tmpdir("hooks");
    let file = dir.join("hooks.yaml");
    let hooks = "hooks:\n  on_ready:\n    - { method: PUT, url: \"http://127.0.0.1:1/r?ip=${DP_TEST_POD_IP}\" }\n";
    std::fs::write(&file, format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{hooks}")).unwrap();
    let cmd = |args: &[&str]| Command::new(bin()).args(args).arg(&file).env_remove("DP_TEST_POD_IP").output().unwrap();

    let out = cmd(&["check", "--config"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("${DP_TEST_POD_IP}, which is not set here"));

    let out = cmd(&["run", "--config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hooks.yaml:4: hooks.on_ready[1]: ${DP_TEST_POD_IP} is not set"), "{err}");

    let ca = "    - { method: DELETE, url: \"https://127.0.0.1:1/d\", ca: /nonexistent/ca.pem }\n";
    std::fs::write(&file, format!("hooks:\n  on_drain:\n{ca}")).unwrap();
    let out = cmd(&["check", "--config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hooks.yaml:2: hooks.on_drain[1]: ca /nonexistent/ca.pem: cannot read"), "{err}");
}

#[test]
fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.yaml");
    let out = Command::new(bin()).args(["check", "--config", example]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

#[test]
fn a_bad_environment_override_stops_start_up_with_exit_2() {
    let out = Command::new(bin()).arg("check").env("DRAINPROXY_DRAIN_MIN_DELAY", "5").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DRAINPROXY_DRAIN_MIN_DELAY") && err.contains("needs a unit"), "{err}");
}

#[test]
fn help_and_version_explain_themselves() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["--config", "--listen", "--upstream", "check", "Exit codes"] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn an_address_in_use_exits_1_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = tokio::process::Command::new(bin())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--admin", &format!("127.0.0.1:{}", free_port())])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot bind listen address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_sidecar_sigterm_drains_then_exits_0() {
    let app = app().await;
    let mut p = Proc::start("classic", &fast_drain(app.addr));
    p.wait_status("/ready", 200).await;
    p.signal("TERM");
    p.wait_status("/ready", 503).await;
    // Still forwarded during the drain, and told to close.
    let r = get(p.listen, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["connection"], "close");
    let (status, _) = p.wait_exit(Duration::from_secs(10)).expect("exits after release");
    assert_eq!(status.code(), Some(0), "logs:\n{}", p.logs());
    let logs = p.logs();
    assert!(logs.contains("drain report"), "{logs}");
    assert!(logs.contains("trigger=\"sigterm\"") || logs.contains("trigger=sigterm"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_sidecar_sigterm_after_release_exits_0_within_two_seconds() {
    let app = app().await;
    let mut p = Proc::start("native", &fast_drain(app.addr));
    p.wait_status("/ready", 200).await;
    // preStop on the app container: blocks until release.
    assert_eq!(get(p.admin, "/drain").await.status, 200);
    // The app exits; then the kubelet stops the sidecar.
    p.signal("TERM");
    let (status, took) = p.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0), "logs:\n{}", p.logs());
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_exits_at_once_with_code_3() {
    let app = app().await;
    let mut p = Proc::start("quit", &fast_drain(app.addr));
    p.wait_status("/ready", 200).await;
    p.signal("QUIT");
    let (status, _) = p.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_each_way_with_flat_memory() {
    const GIB: u64 = 1 << 30;
    let app = app().await;
    let p = Proc::start("stream", &format!("upstream:\n  address: {}\n", app.addr));
    p.wait_status("/live", 200).await;
    assert_eq!(get(p.listen, "/").await.status, 200);
    let baseline = p.rss_kib();
    let pid = p.child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let rss = Proc::rss_of(pid);
                peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Download.
    let mut c = h1(p.listen).await;
    c.sender.ready().await.unwrap();
    let res = c
        .sender
        .send_request(http::Request::get(format!("/bytes?n={GIB}")).header("host", "a").body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = res.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        got += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, GIB);
    // Upload, streamed from a generator.
    let chunk = bytes::Bytes::from(vec![b'y'; 256 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            (sent < GIB)
                .then(|| (Ok::<_, hyper::Error>(hyper::body::Frame::data(chunk.clone())), sent + chunk.len() as u64))
        }
    });
    let req = http::Request::post("/count")
        .header("host", "a")
        .body(http_body_util::StreamBody::new(stream).boxed())
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.text(), GIB.to_string());
    sampler.abort();
    let growth = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(baseline);
    eprintln!("rss baseline {baseline} KiB, growth {growth} KiB");
    assert!(growth < 64 * 1024, "RSS grew by {growth} KiB while streaming 2 GiB");
}

impl Proc {
    fn rss_of(pid: u32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_access_log_and_the_drain_report() {
    let app = app().await;
    let yaml = format!("{}log:\n  format: json\n  access_log: true\n", fast_drain(app.addr));
    let mut p = Proc::start("json", &yaml);
    p.wait_status("/ready", 200).await;
    assert_eq!(get(p.listen, "/some/path?q=1").await.status, 200);
    p.signal("TERM");
    let (status, _) = p.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0));
    let logs = p.logs();
    let lines: Vec<serde_json::Value> = logs.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    let access = lines.iter().find(|v| v["path"] == "/some/path?q=1").expect("an access log line");
    assert_eq!(access["status"], 200);
    assert_eq!(access["method"], "GET");
    let report = lines.iter().find(|v| v["message"].as_str().is_some_and(|m| m.starts_with("drain report"))).unwrap();
    assert_eq!(report["outcome"], "idle");
    assert_eq!(report["requests_after_start"], 0);
}

#[test]
fn demo_loses_nothing_with_drainproxy_and_shows_losses_without() {
    let start = Instant::now();
    let out = Command::new(bin()).arg("demo").env_remove("RUST_LOG").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(30), "the demo must finish within 30s");
    assert!(text.contains("with drainproxy: 0 failed requests."), "{text}");
    let failed = |row: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row} row:\n{text}"));
        line[row.len()..].split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert_eq!(failed("with drainproxy "), 0, "{text}");
    assert!(failed("without drainproxy") > 0, "the baseline must show what drainproxy prevents:\n{text}");
}

/// The binary holds HTTP/2 writes until its runtime runs out of work; every stream must still
/// be answered in full, whatever its size, on one worker thread or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_held_for_a_batched_write_all_arrive_whole() {
    let app = app().await;
    for threads in [1, 2] {
        let p = Proc::start(
            &format!("h2-held-{threads}"),
            &format!("upstream:\n  address: {}\nruntime:\n  threads: {threads}\n", app.addr),
        );
        p.wait_status("/ready", 200).await;
        let (sender, _conn) = h2(p.listen).await;
        let mut streams = tokio::task::JoinSet::new();
        for i in 0..150u64 {
            let mut sender = sender.clone();
            let (path, want) = match i % 3 {
                0 => ("/".to_string(), 2),
                1 => (format!("/bytes?n={}", 100_000 + i), 100_000 + i),
                _ => ("/trailers".to_string(), 7),
            };
            streams.spawn(async move {
                let res = sender.send_request(h2_get(p.listen, &path)).await.unwrap();
                assert_eq!(res.status(), 200, "{path}: {:?}", res.headers());
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body.len() as u64, want, "{path}");
            });
        }
        let all = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(r) = streams.join_next().await {
                r.unwrap();
            }
        });
        assert!(all.await.is_ok(), "threads {threads}: streams unanswered; logs:\n{}", p.logs());
    }
}
