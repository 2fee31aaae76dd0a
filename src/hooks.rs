//! Registry hooks (DESIGN §5): HTTP calls made when the proxy turns ready (registration with
//! a service registry such as Nacos, Eureka or Consul) and when a drain starts
//! (deregistration), with `${NAME}` replaced from the environment (`${POD_IP}` from the
//! downward API).
//!
//! They never hold up what triggered them: each list runs in order in a task of its own, each
//! call bounded by its `timeout`, and a failure is logged, counted and followed by the next
//! call. Plain `http://` only (no TLS client); in the static image a host name resolves
//! through `/etc/hosts` only, so a registry is named by address (`${HOST_IP}` for a node
//! agent) or through a Service's cluster IP in the environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::config::{Hook, HooksConfig};
use crate::metrics::Metrics;

/// When a list of hooks runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    OnReady = 0,
    OnDrain = 1,
}

impl When {
    pub fn as_str(self) -> &'static str {
        match self {
            When::OnReady => "on_ready",
            When::OnDrain => "on_drain",
        }
    }

    /// The configuration field holding this list.
    pub fn field(self) -> &'static str {
        match self {
            When::OnReady => "hooks.on_ready",
            When::OnDrain => "hooks.on_drain",
        }
    }
}

/// One call, its templates filled in.
#[derive(Clone)]
struct Call {
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    timeout: Duration,
    /// https:// only: the client and the name the registry's certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("method", &self.method).field("uri", &self.uri).finish_non_exhaustive()
    }
}

/// TLS clients for https:// hooks, built once at start-up: one on the system's CA
/// certificates, one per `ca` file.
#[derive(Default)]
struct Clients {
    system: Option<TlsConnector>,
    files: BTreeMap<PathBuf, TlsConnector>,
}

impl Clients {
    fn get(&mut self, ca: Option<&Path>) -> Result<TlsConnector, String> {
        let cached = match ca {
            None => self.system.as_ref(),
            Some(path) => self.files.get(path),
        };
        if let Some(c) = cached {
            return Ok(c.clone());
        }
        let c = client(match ca {
            None => system_roots()?,
            Some(path) => file_roots(path)?,
        })?;
        match ca {
            None => self.system = Some(c.clone()),
            Some(path) => {
                self.files.insert(path.to_path_buf(), c.clone());
            }
        }
        Ok(c)
    }
}

fn client(roots: RootCertStore) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The system's CA certificates (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the usual places
/// such as `/etc/ssl/certs`; the image ships them).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(format!("no CA certificates found on this system{why}; set the hook's ca to a PEM file"));
    }
    Ok(roots)
}

fn file_roots(path: &Path) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("ca {}: cannot read: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("ca {}: not valid PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("ca {}: not a usable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("ca {}: no CERTIFICATE block found (PEM expected)", path.display()));
    }
    Ok(roots)
}

/// Both lists, ready to run.
#[derive(Debug, Default)]
pub struct Hooks {
    on_ready: Arc<[Call]>,
    on_drain: Arc<[Call]>,
}

/// Replaces every `${NAME}` in `text` with `NAME`'s value from `env`.
pub fn expand(text: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
        let name = &after[..end];
        let value = env(name).ok_or_else(|| format!("${{{name}}} is not set in the environment"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A hook that cannot be prepared: `hooks.on_drain[2]: …` (counted from 1).
#[derive(Debug, thiserror::Error)]
#[error("{list}[{n}]: {message}")]
pub struct HookError {
    /// The configuration field holding the hook: `hooks.on_ready` or `hooks.on_drain`.
    pub list: &'static str,
    pub n: usize,
    pub message: String,
}

impl Hooks {
    /// Fills in the templates of `cfg` from `env`; an error names the hook and what is wrong.
    pub fn prepare(cfg: &HooksConfig, env: impl Fn(&str) -> Option<String>) -> Result<Self, HookError> {
        let mut clients = Clients::default();
        let mut list = |when: When, hooks: &[Hook]| -> Result<Arc<[Call]>, HookError> {
            hooks
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    call(h, &env, &mut clients).map_err(|message| HookError { list: when.field(), n: i + 1, message })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Arc::from)
        };
        Ok(Hooks { on_ready: list(When::OnReady, &cfg.on_ready)?, on_drain: list(When::OnDrain, &cfg.on_drain)? })
    }

    /// Runs the list for `when` in a task of its own.
    pub fn run(&self, when: When, metrics: &Arc<Metrics>) {
        let calls = match when {
            When::OnReady => self.on_ready.clone(),
            When::OnDrain => self.on_drain.clone(),
        };
        if calls.is_empty() {
            return;
        }
        let metrics = metrics.clone();
        tokio::spawn(async move {
            for c in calls.iter() {
                let outcome = tokio::time::timeout(c.timeout, send(c))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within its timeout ({} ms)", c.timeout.as_millis())));
                metrics.hook_done(when, outcome.is_ok());
                match outcome {
                    Ok(status) => info!(hook = when.as_str(), method = %c.method, uri = %c.uri, %status, "hook called"),
                    Err(reason) => warn!(hook = when.as_str(), method = %c.method, uri = %c.uri, reason, "hook failed"),
                }
            }
        });
    }
}

fn call(h: &Hook, env: &impl Fn(&str) -> Option<String>, clients: &mut Clients) -> Result<Call, String> {
    let method =
        Method::from_bytes(h.method.as_bytes()).map_err(|_| format!("{:?} is not an HTTP method", h.method))?;
    let url = expand(&h.url, env)?;
    let uri: Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
    check_url(&uri).map_err(|e| format!("url {url:?}: {e}"))?;
    let mut headers = Vec::new();
    for (name, value) in &h.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
        let value = expand(value, env)?;
        let value =
            HeaderValue::from_str(&value).map_err(|_| format!("the value of {name} is not a valid header value"))?;
        headers.push((name, value));
    }
    let tls = match uri.scheme_str() {
        Some("https") => {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_string();
            let name = ServerName::try_from(host).map_err(|e| format!("url {url:?}: {e}"))?;
            Some((clients.get(h.ca.as_deref())?, name))
        }
        _ => None,
    };
    Ok(Call { method, uri, headers, body: Bytes::from(expand(&h.body, env)?), timeout: h.timeout.0, tls })
}

/// A hook's URL must be `http://host[:port]/...`.
pub fn check_url(uri: &Uri) -> Result<(), String> {
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must be an absolute http:// or https:// URL".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

/// One call; Ok with the status when the answer is 2xx.
async fn send(c: &Call) -> Result<http::StatusCode, String> {
    let host = c.uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = c.uri.port_u16().unwrap_or(if c.tls.is_some() { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("connect failed: {e}"))?;
    let _ = stream.set_nodelay(true);
    match &c.tls {
        None => exchange(c, host, stream).await,
        Some((connector, name)) => {
            let stream =
                connector.connect(name.clone(), stream).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
            exchange(c, host, stream).await
        }
    }
}

/// One request and its answer over an established connection.
async fn exchange<T>(c: &Call, host: &str, stream: T) -> Result<http::StatusCode, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let path = c.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut req = Request::builder().method(c.method.clone()).uri(path);
    let authority = c.uri.authority().map(|a| a.as_str()).unwrap_or(host);
    if !c.headers.iter().any(|(n, _)| n == header::HOST) {
        req = req.header(header::HOST, authority);
    }
    if !c.headers.iter().any(|(n, _)| n == header::USER_AGENT) {
        req = req.header(header::USER_AGENT, concat!("drainproxy-hook/", env!("CARGO_PKG_VERSION")));
    }
    for (name, value) in &c.headers {
        req = req.header(name, value);
    }
    let req = req.body(Full::new(c.body.clone())).map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"));
    let res = match res {
        Ok(res) => res,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    let status = res.status();
    let _ = res.into_body().collect().await;
    conn.abort();
    if status.is_success() {
        Ok(status)
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("10.1.2.3".into()),
            "POD_NAME" => Some("shop-7d9".into()),
            _ => None,
        }
    }

    #[test]
    fn templates_are_filled_from_the_environment() {
        assert_eq!(expand("ip=${POD_IP}&name=${POD_NAME}", &env).unwrap(), "ip=10.1.2.3&name=shop-7d9");
        assert_eq!(expand("no templates", &env).unwrap(), "no templates");
        assert_eq!(expand("${MISSING}", &env).unwrap_err(), "${MISSING} is not set in the environment");
        assert!(expand("${POD_IP", &env).unwrap_err().contains("unclosed"));
    }

    #[test]
    fn hooks_name_what_is_wrong() {
        let hook = |url: &str| Hook {
            method: "PUT".into(),
            url: url.into(),
            headers: Default::default(),
            body: String::new(),
            timeout: crate::config::Dur::secs(2),
            ca: None,
        };
        let cfg = |url: &str| HooksConfig { on_ready: vec![], on_drain: vec![hook("http://a/ok"), hook(url)] };
        let err = Hooks::prepare(&cfg("ftp://registry/x"), env).unwrap_err().to_string();
        assert!(err.starts_with("hooks.on_drain[2]: url \"ftp://registry/x\": must be an absolute http://"), "{err}");
        let err = Hooks::prepare(&cfg("http://${REGISTRY}/x"), env).unwrap_err().to_string();
        assert_eq!(err, "hooks.on_drain[2]: ${REGISTRY} is not set in the environment");
        let ok = Hooks::prepare(&cfg("http://registry:8848/v1/ns/instance?ip=${POD_IP}"), env).unwrap();
        assert_eq!(ok.on_drain[1].uri.to_string(), "http://registry:8848/v1/ns/instance?ip=10.1.2.3");
    }
}
