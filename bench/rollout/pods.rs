//! Simulated pods and the kubelet that deletes them.
//!
//! A pod is one loopback address (`127.0.2.x`, `127.0.3.x`, …) running the demo app and, for
//! most kinds, a sidecar in front of it on port 8000. Deletion follows Kubernetes: preStop
//! hooks first (the app's preStop `httpGet` to drainproxy's `/drain` blocks), then SIGTERM,
//! then SIGKILL when the grace period ends. In native sidecar mode the sidecar gets SIGTERM
//! only after the app exited; in classic mode every container gets it at t≈0.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodKind {
    /// drainproxy as a native sidecar (the default in Kubernetes ≥ 1.29).
    Native,
    /// drainproxy as a classic second container.
    Classic,
    /// The app alone: SIGTERM at deletion, and it exits at once.
    AppOnly,
    /// The app alone with the common `preStop: sleep 15`.
    Sleep15,
    /// An nginx sidecar that quits gracefully (SIGQUIT) at deletion: the usual hand-made fix.
    NginxSidecar,
}

impl PodKind {
    pub fn name(self) -> &'static str {
        match self {
            PodKind::Native => "drainproxy-native",
            PodKind::Classic => "drainproxy-classic",
            PodKind::AppOnly => "app-only",
            PodKind::Sleep15 => "app+sleep15",
            PodKind::NginxSidecar => "nginx-sidecar",
        }
    }
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "native" | "drainproxy-native" => PodKind::Native,
            "classic" | "drainproxy-classic" => PodKind::Classic,
            "app" | "app-only" => PodKind::AppOnly,
            "sleep15" | "app+sleep15" => PodKind::Sleep15,
            "nginx-sidecar" => PodKind::NginxSidecar,
            _ => bail!("unknown pod kind {s:?}: use native, classic, app, sleep15 or nginx-sidecar"),
        })
    }
    pub fn has_drainproxy(self) -> bool {
        matches!(self, PodKind::Native | PodKind::Classic)
    }
}

/// Settings shared by every pod of a run.
#[derive(Debug, Clone)]
pub struct PodEnv {
    pub harness: PathBuf,
    pub drainproxy: PathBuf,
    pub dir: PathBuf,
    pub min_delay: Duration,
    pub grace: Duration,
}

pub struct Pod {
    pub id: usize,
    pub kind: PodKind,
    pub ip: Ipv4Addr,
    app: Child,
    sidecar: Option<Child>,
}

/// What deleting a pod measured.
#[derive(Debug, Clone, Default)]
pub struct Deletion {
    /// drainproxy's `/drain` summary, when there was one.
    pub drain: Option<serde_json::Value>,
    pub killed: bool,
    pub took: Duration,
}

pub fn pod_ip(id: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 2 + (id / 250) as u8, 1 + (id % 250) as u8)
}

impl Pod {
    /// Where the front end sends traffic: the sidecar, or the app itself.
    pub fn serving(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 8000))
    }
    fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 9901))
    }

    pub async fn start(id: usize, kind: PodKind, env: &PodEnv) -> anyhow::Result<Pod> {
        let ip = pod_ip(id);
        let dir = env.dir.join(format!("pod-{id}"));
        std::fs::create_dir_all(&dir)?;
        let app_port = if matches!(kind, PodKind::AppOnly | PodKind::Sleep15) { 8000 } else { 8080 };
        let app = Command::new(&env.harness)
            .args(["app", "--listen", &format!("{ip}:{app_port}"), "--name", &format!("pod-{id}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the demo app")?;
        let sidecar = match kind {
            PodKind::Native | PodKind::Classic => {
                let cfg = dir.join("drainproxy.yaml");
                std::fs::write(
                    &cfg,
                    format!(
                        "listen: {ip}:8000\nadmin: {ip}:9901\nupstream:\n  address: {ip}:8080\n\
                         health:\n  path: /healthz\n  interval: 100ms\n\
                         drain:\n  min_delay: {}ms\n  quiet_period: 500ms\n  max_duration: 20s\n",
                        env.min_delay.as_millis()
                    ),
                )?;
                Some(
                    Command::new(&env.drainproxy)
                        .arg("--config")
                        .arg(&cfg)
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(dir.join("drainproxy.log"))?)
                        .kill_on_drop(true)
                        .spawn()
                        .context("cannot start drainproxy")?,
                )
            }
            PodKind::NginxSidecar => {
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_sidecar_config(ip, &dir))?;
                Some(
                    Command::new(crate::fronts::which_nginx())
                        .arg("-c")
                        .arg(&conf)
                        .arg("-p")
                        .arg(&dir)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .context("cannot start the nginx sidecar")?,
                )
            }
            PodKind::AppOnly | PodKind::Sleep15 => None,
        };
        Ok(Pod { id, kind, ip, app, sidecar })
    }

    /// Waits until the pod's readiness probe passes (bounded).
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let (addr, path) = match self.kind {
            PodKind::Native | PodKind::Classic => (self.admin(), "/ready"),
            _ => (self.serving(), "/healthz"),
        };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if get_status(addr, path, Duration::from_millis(500)).await == Some(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("pod {} ({}) not ready within {within:?}", self.id, self.kind.name())
    }

    /// Deletes the pod as the kubelet does; returns once every container is gone.
    pub async fn delete(mut self, grace: Duration) -> Deletion {
        let start = Instant::now();
        let deadline = start + grace;
        let mut out = Deletion::default();
        match self.kind {
            PodKind::Native => {
                out.drain = prestop_drain(self.admin(), deadline).await;
                signal(&self.app, "TERM").await;
                out.killed |= wait_or_kill(&mut self.app, deadline).await;
                if let Some(s) = self.sidecar.as_mut() {
                    signal(s, "TERM").await;
                    out.killed |= wait_or_kill(s, deadline).await;
                }
            }
            PodKind::Classic => {
                // SIGTERM reaches the sidecar at t≈0 while the app's preStop blocks on /drain.
                if let Some(s) = self.sidecar.as_ref() {
                    signal(s, "TERM").await;
                }
                out.drain = prestop_drain(self.admin(), deadline).await;
                signal(&self.app, "TERM").await;
                out.killed |= wait_or_kill(&mut self.app, deadline).await;
                if let Some(s) = self.sidecar.as_mut() {
                    out.killed |= wait_or_kill(s, deadline).await;
                }
            }
            PodKind::AppOnly => {
                signal(&self.app, "TERM").await;
                out.killed |= wait_or_kill(&mut self.app, deadline).await;
            }
            PodKind::Sleep15 => {
                tokio::time::sleep_until((start + Duration::from_secs(15).min(grace)).into()).await;
                signal(&self.app, "TERM").await;
                out.killed |= wait_or_kill(&mut self.app, deadline).await;
            }
            PodKind::NginxSidecar => {
                // Its STOPSIGNAL is SIGQUIT (graceful); the app stops once nginx has finished.
                if let Some(s) = self.sidecar.as_mut() {
                    signal(s, "QUIT").await;
                    out.killed |= wait_or_kill(s, deadline).await;
                }
                signal(&self.app, "TERM").await;
                out.killed |= wait_or_kill(&mut self.app, deadline).await;
            }
        }
        out.took = start.elapsed();
        out
    }
}

async fn signal(child: &Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().await;
    }
}

/// Waits for exit until `deadline`, then SIGKILLs; returns whether it had to kill.
async fn wait_or_kill(child: &mut Child, deadline: Instant) -> bool {
    match tokio::time::timeout_at(deadline.into(), child.wait()).await {
        Ok(_) => false,
        Err(_) => {
            let _ = child.kill().await;
            true
        }
    }
}

/// The app's preStop `httpGet` to `/drain`: blocks until drainproxy releases it. Like the
/// kubelet, it ignores the status and gives up only when the grace period ends.
async fn prestop_drain(admin: SocketAddr, deadline: Instant) -> Option<serde_json::Value> {
    let within = deadline.saturating_duration_since(Instant::now());
    let body = get_body(admin, "/drain", within).await?;
    serde_json::from_slice(&body).ok()
}

pub async fn get_status(addr: SocketAddr, path: &str, within: Duration) -> Option<u16> {
    get(addr, path, within).await.map(|(s, _)| s)
}

async fn get_body(addr: SocketAddr, path: &str, within: Duration) -> Option<Bytes> {
    get(addr, path, within).await.map(|(_, b)| b)
}

async fn get(addr: SocketAddr, path: &str, within: Duration) -> Option<(u16, Bytes)> {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut s, c) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(c);
        let req = http::Request::get(path).header("host", "probe").body(Empty::new()).ok()?;
        let res = s.send_request(req).await.ok()?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(within, fut).await.ok().flatten()
}

fn nginx_sidecar_config(ip: Ipv4Addr, dir: &Path) -> String {
    format!(
        "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
         upstream app {{ server {ip}:8080; keepalive 64; }}\n\
         server {{\n    listen {ip}:8000;\n    keepalive_requests 100000;\n\
         location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
         proxy_read_timeout 60s;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}
