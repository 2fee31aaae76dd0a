//! Registry hooks (DESIGN §5): `on_ready` when the proxy turns ready, `on_drain` when a drain
//! starts, templates filled from the environment; a failing call neither blocks nor stops the
//! rest.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drainproxy::config::{Config, Dur, Hook};
use drainproxy::lifecycle::{Event, Phase, Trigger};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::support::*;

/// A registry that records every call (method, path and query, body); `/fail` answers 500.
#[derive(Default)]
struct Registry {
    calls: Mutex<Vec<String>>,
    called: Notify,
}

impl Registry {
    async fn start() -> (Arc<Registry>, SocketAddr) {
        Self::serve(None).await
    }

    /// Served over TLS with this acceptor when given (an https:// registry).
    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> (Arc<Registry>, SocketAddr) {
        let reg = Arc::new(Registry::default());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = reg.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let r = r.clone();
                let tls = tls.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = r.clone();
                    async move {
                        let line = format!("{} {}", req.method(), req.uri());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let fail = line.contains("/fail");
                        r.calls.lock().unwrap().push(format!("{line} {}", String::from_utf8_lossy(&body)));
                        r.called.notify_one();
                        let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if fail {
                            *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, hyper::Error>(res)
                    }
                });
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => http.serve_connection(TokioIo::new(s), svc).await,
                        Some(tls) => match tls.accept(s).await {
                            Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                            // A client that does not trust us: nothing to record.
                            Err(_) => Ok(()),
                        },
                    }
                });
            }
        });
        (reg, addr)
    }

    /// Waits (bounded) until `n` calls have arrived; returns them.
    async fn wait_for(&self, n: usize) -> Vec<String> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let notified = self.called.notified();
                if self.calls.lock().unwrap().len() >= n {
                    return self.calls.lock().unwrap().clone();
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} hook calls expected, got {:?}", self.calls.lock().unwrap()))
    }
}

fn hook(method: &str, url: String, body: &str) -> Hook {
    Hook { method: method.into(), url, headers: Default::default(), body: body.into(), timeout: Dur::secs(2), ca: None }
}

fn with_hooks(c: &mut Config, registry: SocketAddr) {
    c.hooks.on_ready = vec![hook("PUT", format!("http://{registry}/register?ip=${{HOOKS_TEST_POD_IP}}"), "up")];
    c.hooks.on_drain = vec![
        hook("POST", format!("http://{registry}/fail"), ""),
        hook("DELETE", format!("http://{registry}/register?ip=${{HOOKS_TEST_POD_IP}}"), "down"),
    ];
}

#[tokio::test]
async fn hooks_register_when_ready_and_deregister_when_the_drain_starts() {
    // Not DRAINPROXY_*: the binary tests spawn drainproxy, which refuses unknown ones.
    std::env::set_var("HOOKS_TEST_POD_IP", "10.1.2.3");
    let (registry, addr) = Registry::start().await;
    let app = app().await;
    let p = ready_proxy(app.addr, |c| {
        with_hooks(c, addr);
        c.drain.min_delay = Dur::secs(3);
    })
    .await;
    assert_eq!(registry.wait_for(1).await, ["PUT /register?ip=10.1.2.3 up"]);
    p.events.send(Event::Drain(Trigger::Http)).await.unwrap();
    let calls = registry.wait_for(3).await;
    assert_eq!(calls[1..], ["POST /fail ", "DELETE /register?ip=10.1.2.3 down"], "the failure did not stop the list");
    assert_eq!(p.state.borrow().phase, Phase::Draining, "deregistered at the drain's start, not its end");
    let m = metrics(&p).await;
    let calls =
        |hook: &str, outcome: &str| metric(&m, "drainproxy_hook_calls_total", &[("hook", hook), ("outcome", outcome)]);
    assert_eq!((calls("on_ready", "ok"), calls("on_drain", "ok"), calls("on_drain", "failed")), (1.0, 1.0, 1.0));
}

#[tokio::test]
async fn a_template_without_its_variable_stops_start_up() {
    let app = app().await;
    let mut cfg = test_config(app.addr);
    cfg.hooks.on_drain = vec![hook("DELETE", "http://127.0.0.1:1/x?ip=${HOOKS_TEST_UNSET}".into(), "")];
    let err = drainproxy::app::start(cfg, Default::default()).await.err().expect("start-up fails");
    assert_eq!(err.to_string(), "hooks.on_drain[1]: ${HOOKS_TEST_UNSET} is not set in the environment");
}

/// A self-signed certificate for 127.0.0.1: the acceptor serving it, and its PEM file.
fn registry_cert(dir: &std::path::Path, name: &str) -> (tokio_rustls::TlsAcceptor, std::path::PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), pem)
}

/// An https:// registry is called over TLS, trusting the hook's `ca`; one whose certificate
/// that CA did not sign is not called, and the hook counts as failed.
#[tokio::test]
async fn https_hooks_verify_the_registry_against_their_ca() {
    let dir = std::env::temp_dir().join(format!("drainproxy-it-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (acceptor, ca) = registry_cert(&dir, "registry");
    let (_, other_ca) = registry_cert(&dir, "other");
    let (registry, addr) = Registry::serve(Some(acceptor)).await;
    let app = app().await;
    let p = ready_proxy(app.addr, |c| {
        let mut trusted = hook("PUT", format!("https://{addr}/register"), "up");
        trusted.ca = Some(ca.clone());
        let mut untrusted = hook("PUT", format!("https://{addr}/untrusted"), "");
        untrusted.ca = Some(other_ca.clone());
        c.hooks.on_ready = vec![untrusted, trusted];
    })
    .await;
    assert_eq!(registry.wait_for(1).await, ["PUT /register up"]);
    wait_metric(&p, "drainproxy_hook_calls_total", &[("hook", "on_ready"), ("outcome", "ok")], 1.0).await;
    let m = metrics(&p).await;
    let calls =
        |outcome: &str| metric(&m, "drainproxy_hook_calls_total", &[("hook", "on_ready"), ("outcome", outcome)]);
    assert_eq!((calls("ok"), calls("failed")), (1.0, 1.0));
    assert_eq!(registry.calls.lock().unwrap().len(), 1, "the untrusted registry got no request");
}

#[tokio::test]
async fn an_unusable_ca_file_stops_start_up() {
    let app = app().await;
    let mut cfg = test_config(app.addr);
    let mut h = hook("DELETE", "https://127.0.0.1:1/x".into(), "");
    h.ca = Some("/nonexistent/ca.pem".into());
    cfg.hooks.on_drain = vec![h];
    let err = drainproxy::app::start(cfg, Default::default()).await.err().expect("start-up fails");
    assert!(err.to_string().starts_with("hooks.on_drain[1]: ca /nonexistent/ca.pem: cannot read"), "{err}");
}
