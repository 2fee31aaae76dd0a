//! TLS termination on the proxy listener (`tls` in the configuration): rustls with the ring
//! provider, ALPN `h2` then `http/1.1`, and certificate rotation without a restart.
//!
//! The certificate chain and key are read at start-up, where a problem stops start-up (exit
//! code 2, naming the field and the file). Every `reload_interval` both files are read again:
//! a changed pair that parses and matches is served from the next handshake on, while
//! connections already open keep the certificate they agreed on. A changed pair that does
//! not load (a rotation caught halfway, with the new certificate but still the old key, or a
//! file missing for a moment) leaves the pair in service untouched; it is logged and counted
//! once per change, and retried when the files change again.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// A certificate or key that cannot be used, with the field and file to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub field: &'static str,
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.field, self.path.display(), self.message)
    }
}

impl std::error::Error for TlsError {}

/// The bytes of both files, as last read.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Reads the files and builds the listener's acceptor; the [`Reloader`] keeps its
/// certificate current. Also what `drainproxy check` runs.
pub fn load(cfg: &TlsConfig) -> Result<(TlsAcceptor, Reloader), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = read(cfg)?;
    let key = certified_key(cfg, &files, &provider)?;
    let served = Arc::new(Served(RwLock::new(key)));
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { field: "tls", path: cfg.cert.clone(), message: e.to_string() })?
        .with_no_client_auth()
        .with_cert_resolver(served.clone());
    let mut config = config;
    // h2 first: a client offering both gets HTTP/2, as from any TLS front end.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let reloader = Reloader { cfg: cfg.clone(), provider, served, files };
    Ok((TlsAcceptor::from(Arc::new(config)), reloader))
}

fn read(cfg: &TlsConfig) -> Result<Files, TlsError> {
    let file = |field: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| TlsError { field, path: path.clone(), message: format!("cannot read: {e}") })
    };
    Ok(Files { cert: file("tls.cert", &cfg.cert)?, key: file("tls.key", &cfg.key)? })
}

fn certified_key(cfg: &TlsConfig, files: &Files, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_err = |message: String| TlsError { field: "tls.cert", path: cfg.cert.clone(), message };
    let key_err = |message: String| TlsError { field: "tls.key", path: cfg.key.clone(), message };
    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block found (PEM expected)".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| match e {
        pem::Error::NoItemsFound => key_err("no PRIVATE KEY block found (PEM expected)".into()),
        e => key_err(format!("not valid PEM: {e}")),
    })?;
    CertifiedKey::from_der(chain, key, provider).map(Arc::new).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            key_err(format!("does not match the certificate in {}", cfg.cert.display()))
        }
        rustls::Error::InvalidCertificate(e) => cert_err(format!("not a usable certificate: {e}")),
        e => key_err(format!("not a usable private key: {e}")),
    })
}

/// The pair handshakes use now.
#[derive(Debug)]
struct Served(RwLock<Arc<CertifiedKey>>);

impl Served {
    fn get(&self) -> Arc<CertifiedKey> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        match self.0.write() {
            Ok(mut k) => *k = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }
}

impl ResolvesServerCert for Served {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Reads the files again every `reload_interval` and swaps in a changed, valid pair.
pub struct Reloader {
    cfg: TlsConfig,
    provider: Arc<CryptoProvider>,
    served: Arc<Served>,
    files: Files,
}

impl Reloader {
    /// Runs until aborted; returns at once when `reload_interval` is `0s`.
    pub async fn run(self, metrics: Arc<Metrics>) {
        let every = self.cfg.reload_interval.0;
        if every.is_zero() {
            return;
        }
        // What the files held at the last look: a change is acted on (and logged) once.
        let mut seen: Result<Files, TlsError> = Ok(self.files);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Two small files, usually on tmpfs (a Secret volume): read inline.
            let now = read(&self.cfg);
            if now == seen {
                continue;
            }
            match &now {
                Ok(files) => match certified_key(&self.cfg, files, &self.provider) {
                    Ok(key) => {
                        self.served.set(key);
                        metrics.tls_reloads[0].inc();
                        info!(cert = %self.cfg.cert.display(), "tls: certificate files changed; new handshakes use the new pair");
                    }
                    Err(error) => {
                        metrics.tls_reloads[1].inc();
                        warn!(%error, "tls: changed certificate files not loaded; the previous pair stays in service");
                    }
                },
                Err(error) => {
                    metrics.tls_reloads[1].inc();
                    warn!(%error, "tls: certificate files not readable; the previous pair stays in service");
                }
            }
            seen = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &std::path::Path, name: &str) -> TlsConfig {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        TlsConfig { cert, key, reload_interval: crate::config::Dur::secs(10) }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("drainproxy-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_valid_pair_loads() {
        let dir = tempdir("valid");
        assert!(load(&pair(&dir, "a")).is_ok());
    }

    #[test]
    fn each_bad_input_names_its_field_and_file() {
        let dir = tempdir("bad");
        let a = pair(&dir, "a");
        let b = pair(&dir, "b");
        let err = |cfg: &TlsConfig| load(cfg).err().expect("must fail");

        let missing = TlsConfig { cert: dir.join("nope.crt"), ..a.clone() };
        let e = err(&missing);
        assert_eq!((e.field, e.path.clone()), ("tls.cert", dir.join("nope.crt")));
        assert!(e.message.starts_with("cannot read"), "{e}");

        let swapped = TlsConfig { cert: a.key.clone(), key: a.cert.clone(), ..a.clone() };
        let e = err(&swapped);
        assert_eq!(e.field, "tls.cert");
        assert!(e.message.contains("no CERTIFICATE"), "{e}");

        let mismatched = TlsConfig { key: b.key.clone(), ..a.clone() };
        let e = err(&mismatched);
        assert_eq!((e.field, e.path.clone()), ("tls.key", b.key.clone()));
        assert!(e.message.contains("does not match"), "{e}");

        std::fs::write(dir.join("garbage.key"), "-----BEGIN PRIVATE KEY-----\nnot base64!\n").unwrap();
        let garbage = TlsConfig { key: dir.join("garbage.key"), ..a.clone() };
        let e = err(&garbage);
        assert_eq!(e.field, "tls.key");
        assert!(e.to_string().contains("garbage.key"), "{e}");
    }
}
