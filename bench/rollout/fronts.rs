//! The front ends callers go through, and how endpoint changes reach them.
//!
//! - `haproxy`: HAProxy in `mode http` as an ingress, `retries 3` + `option redispatch` (its
//!   default `retry-on conn-failure` only retries what was never sent, so POSTs are safe).
//! - `tcp`: HAProxy in `mode tcp` with `retries 0`: kube-proxy's path. One pod is chosen per
//!   TCP connection and nothing is retried.
//! - `nginx`: nginx with ingress-nginx's defaults (upstream keep-alive,
//!   `proxy_next_upstream error timeout`, 3 tries, non-idempotent requests not retried).
//!
//! HAProxy backends change through its runtime API (no reload). nginx has no runtime API, so
//! its endpoint changes are reloads; the harness's control run measures what reloads cost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontKind {
    Haproxy,
    Tcp,
    Nginx,
}

impl FrontKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontKind::Haproxy => "haproxy",
            FrontKind::Tcp => "tcp",
            FrontKind::Nginx => "nginx",
        }
    }
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "haproxy" => FrontKind::Haproxy,
            "tcp" => FrontKind::Tcp,
            "nginx" => FrontKind::Nginx,
            _ => bail!("unknown front end {s:?}: use haproxy, tcp or nginx"),
        })
    }
}

const SLOTS: usize = 128;

pub struct Front {
    pub kind: FrontKind,
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
    state: Mutex<FrontState>,
}

#[derive(Default)]
struct FrontState {
    /// HAProxy: which server slot holds which pod.
    slots: HashMap<SocketAddr, usize>,
    next_slot: usize,
    /// nginx: the current upstream list.
    members: Vec<SocketAddr>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Front {
    pub async fn start(kind: FrontKind, dir: PathBuf) -> anyhow::Result<Front> {
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = match kind {
            FrontKind::Haproxy | FrontKind::Tcp => {
                let conf = dir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_config(kind, port, &dir))?;
                Command::new("haproxy")
                    .arg("-f")
                    .arg(&conf)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(dir.join("haproxy.log"))?)
                    .kill_on_drop(true)
                    .spawn()
                    .context("cannot start haproxy (apt-get install haproxy)")?
            }
            FrontKind::Nginx => {
                std::fs::write(dir.join("nginx.conf"), nginx_config(port, &dir, &[]))?;
                Command::new(which_nginx())
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-p")
                    .arg(&dir)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .context("cannot start nginx (apt-get install nginx-light)")?
            }
        };
        let front = Front { kind, addr, dir, child, state: Mutex::new(FrontState::default()) };
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(front);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("{} did not start listening on {addr}", kind.name())
    }

    pub async fn add(&self, pod: SocketAddr) -> anyhow::Result<()> {
        let mut st = self.state.lock().await;
        match self.kind {
            FrontKind::Haproxy | FrontKind::Tcp => {
                let slot = st.next_slot % SLOTS + 1;
                st.next_slot += 1;
                st.slots.insert(pod, slot);
                self.runtime(&format!("set server be/s{slot} addr {} port {}", pod.ip(), pod.port())).await?;
                self.runtime(&format!("set server be/s{slot} state ready")).await?;
            }
            FrontKind::Nginx => {
                st.members.push(pod);
                self.reload(&st.members).await?;
            }
        }
        Ok(())
    }

    pub async fn remove(&self, pod: SocketAddr) -> anyhow::Result<()> {
        let mut st = self.state.lock().await;
        match self.kind {
            FrontKind::Haproxy | FrontKind::Tcp => {
                if let Some(slot) = st.slots.remove(&pod) {
                    self.runtime(&format!("set server be/s{slot} state maint")).await?;
                }
            }
            FrontKind::Nginx => {
                st.members.retain(|m| *m != pod);
                self.reload(&st.members).await?;
            }
        }
        Ok(())
    }

    async fn runtime(&self, cmd: &str) -> anyhow::Result<String> {
        let mut s = tokio::net::UnixStream::connect(self.dir.join("admin.sock")).await?;
        s.write_all(format!("{cmd}\n").as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        if out.to_lowercase().contains("no such") || out.to_lowercase().contains("unknown") {
            bail!("haproxy runtime API refused {cmd:?}: {out}");
        }
        Ok(out)
    }

    async fn reload(&self, members: &[SocketAddr]) -> anyhow::Result<()> {
        let port = self.addr.port();
        std::fs::write(self.dir.join("nginx.conf"), nginx_config(port, &self.dir, members))?;
        let pid = self.child.id().context("nginx exited")?;
        Command::new("kill").arg("-HUP").arg(pid.to_string()).status().await?;
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let sig = if self.kind == FrontKind::Nginx { "-TERM" } else { "-USR1" };
            let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

pub fn which_nginx() -> &'static str {
    if std::path::Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

fn haproxy_config(kind: FrontKind, port: u16, dir: &std::path::Path) -> String {
    let (mode, retries, extra) = match kind {
        FrontKind::Tcp => ("tcp", 0, ""),
        _ => ("http", 3, "  option redispatch\n  http-reuse safe\n"),
    };
    format!(
        "global\n  stats socket {dir}/admin.sock level admin\n  maxconn 8000\n\
         defaults\n  mode {mode}\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 60s\n  retries {retries}\n{extra}\
         frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
         backend be\n  balance roundrobin\n  server-template s 1-{SLOTS} 127.0.0.1:1 disabled\n",
        dir = dir.display()
    )
}

fn nginx_config(port: u16, dir: &std::path::Path, members: &[SocketAddr]) -> String {
    let mut servers: String = members.iter().map(|m| format!("    server {m};\n")).collect();
    if servers.is_empty() {
        servers = "    server 127.0.0.1:1 down;\n".into();
    }
    format!(
        "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
         upstream pods {{\n{servers}    keepalive 320;\n  }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 100000;\n\
         location / {{\n      proxy_pass http://pods;\n      proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
         proxy_next_upstream error timeout;\n      proxy_next_upstream_tries 3;\n      proxy_connect_timeout 5s;\n\
         proxy_read_timeout 60s;\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}
