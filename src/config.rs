//! Configuration: the YAML schema with its defaults, `DRAINPROXY_*` and flag overrides, and
//! validation that reports every problem at once with file, line and field.
//!
//! Owns parsing and checking only; it never binds, connects or spawns anything, so
//! `drainproxy check` and start-up share exactly the same verdict.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use yaml_serde::{Mapping, Value};

/// A duration written with a unit (`"250ms"`, `"5s"`, `"1m"`, `"1h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// Parses `"250ms"`, `"1.5s"`, `"5s"`, `"1m"`, `"2h"`. A bare number is refused: a duration
/// without a unit is a guess waiting to be wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s, m or h), e.g. \"5s\""))?;
    let (number, unit) = s.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("invalid duration {text:?}: expected a number then ms, s, m or h"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {text:?}: use ms, s, m or h")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!("duration {text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, such as \"250ms\", \"5s\" or \"1m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!("duration {v} needs a unit (ms, s, m or h), e.g. \"{v}s\"")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                self.visit_u64(v.unsigned_abs())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!("duration {v} needs a unit (ms, s, m or h)")))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    Http1,
    H2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub health: HealthConfig,
    pub drain: DrainConfig,
    pub runtime: RuntimeConfig,
    pub tls: Option<TlsConfig>,
    pub hooks: HooksConfig,
    pub warmup: WarmupConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `host:port` of the app, normally on loopback.
    pub address: String,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Dur,
    /// Time allowed from sending a request to receiving the app's response head.
    pub request_timeout: Option<Dur>,
    /// Kept below common app keep-alive timeouts (Node.js: 5 s) so the proxy never picks a
    /// connection the app is about to close.
    pub pool_idle_timeout: Dur,
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Once the first byte of a request head has arrived, the complete head must arrive
    /// within this time (slowloris). Idle keep-alives with no new head are `idle_timeout`'s.
    pub header_read_timeout: Dur,
    pub max_header_bytes: usize,
    /// A client connection with no request in flight for this long is closed.
    pub idle_timeout: Dur,
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// HTTP path checked with GET (2xx = healthy); `None` means a TCP connect check.
    pub path: Option<String>,
    pub interval: Dur,
    pub timeout: Dur,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    pub min_delay: Dur,
    pub quiet_period: Dur,
    pub max_duration: Dur,
    pub retry_after: Dur,
    pub token: String,
    /// After release and a stop signal, how long in-flight work may still take before exit.
    pub exit_grace: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// 1 = current-thread runtime (one core, the usual sidecar budget).
    pub threads: usize,
    /// HTTP/1.1 requests without a body, or with one of up to 64 KiB, are served by
    /// drainproxy's own server path (`fast.rs`) instead of hyper's; false sends every request
    /// through hyper.
    pub http1_fast_path: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often both files are read again; a changed, valid pair is served from the next
    /// handshake on (a rotated Kubernetes Secret, cert-manager). `0s` turns this off.
    #[serde(default = "default_tls_reload")]
    pub reload_interval: Dur,
}

fn default_tls_reload() -> Dur {
    Dur::secs(10)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    pub on_ready: Vec<Hook>,
    pub on_drain: Vec<Hook>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    #[serde(default = "default_hook_method")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_hook_timeout")]
    pub timeout: Dur,
    /// https:// only: trust the CA certificates in this PEM file instead of the system's.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_hook_method() -> String {
    "GET".into()
}

/// Requests sent to the app once it is healthy and before `/ready` turns 200 (DESIGN §5), so
/// the app's first real traffic does not pay for its cold start (JIT, caches, pools).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Sent in order, each `count` times; none means no warm-up.
    pub requests: Vec<WarmupRequest>,
    /// Bound on the whole warm-up: past it the proxy turns ready anyway, and says so.
    pub timeout: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupRequest {
    #[serde(default = "default_hook_method")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_warmup_count")]
    pub count: u32,
}

fn default_warmup_count() -> u32 {
    1
}

/// Most warm-up requests one configuration may ask for, in all.
pub const WARMUP_MAX_REQUESTS: u64 = 100_000;

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig { requests: Vec::new(), timeout: Dur::secs(30) }
    }
}
fn default_hook_timeout() -> Dur {
    Dur::secs(2)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `drainproxy=debug`); `RUST_LOG` wins when set.
    pub level: String,
    /// One line per proxied request at info level.
    pub access_log: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            admin: SocketAddr::from(([0, 0, 0, 0], 9901)),
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            health: HealthConfig::default(),
            drain: DrainConfig::default(),
            runtime: RuntimeConfig::default(),
            tls: None,
            hooks: HooksConfig::default(),
            warmup: WarmupConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            address: "127.0.0.1:8080".into(),
            protocol: UpstreamProtocol::Http1,
            connect_timeout: Dur::secs(1),
            request_timeout: None,
            pool_idle_timeout: Dur::secs(4),
            // Enough for every request in flight at once to find a warm connection: a small
            // cap makes every request beyond it pay a connect (HTTP/2 callers multiplex many).
            pool_max_idle: 1024,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout: Dur::secs(10),
            max_header_bytes: 64 * 1024,
            // Longer than the usual caller idle timeouts (ALB, ingress-nginx: 60 s), so the
            // caller closes an idle keep-alive first and never writes into one we close.
            idle_timeout: Dur::secs(75),
            max_connections: 20_000,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: None,
            interval: Dur::secs(1),
            timeout: Dur::millis(500),
            healthy_threshold: 1,
            unhealthy_threshold: 3,
        }
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            min_delay: Dur::secs(5),
            quiet_period: Dur::secs(1),
            max_duration: Dur::secs(25),
            retry_after: Dur::secs(1),
            token: String::new(),
            exit_grace: Dur::secs(1),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { threads: 1, http1_fast_path: true }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into(), access_log: false }
    }
}

/// Every leaf key, dotted. The environment variable for a key is `DRAINPROXY_` followed by
/// the key in upper case with `.` turned into `_` (`drain.min_delay` → `DRAINPROXY_DRAIN_MIN_DELAY`).
pub const KEYS: &[&str] = &[
    "listen",
    "admin",
    "upstream.address",
    "upstream.protocol",
    "upstream.connect_timeout",
    "upstream.request_timeout",
    "upstream.pool_idle_timeout",
    "upstream.pool_max_idle",
    "limits.header_read_timeout",
    "limits.max_header_bytes",
    "limits.idle_timeout",
    "limits.max_connections",
    "health.path",
    "health.interval",
    "health.timeout",
    "health.healthy_threshold",
    "health.unhealthy_threshold",
    "drain.min_delay",
    "drain.quiet_period",
    "drain.max_duration",
    "drain.retry_after",
    "drain.token",
    "drain.exit_grace",
    "runtime.threads",
    "runtime.http1_fast_path",
    "tls.cert",
    "tls.key",
    "tls.reload_interval",
    "warmup.timeout",
    "log.format",
    "log.level",
    "log.access_log",
];

/// Environment variables read by the CLI itself rather than mapped onto a key.
const CLI_ENV: &[&str] = &["DRAINPROXY_CONFIG"];

pub fn env_var_for(key: &str) -> String {
    format!("DRAINPROXY_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Where a value came from, so a problem names the place the user must edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File { path: PathBuf, line: Option<usize> },
    Env(String),
    Flag(&'static str),
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub source: Source,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::File { path, line: Some(line) } => write!(f, "{}:{line}: ", path.display())?,
            Source::File { path, line: None } => write!(f, "{}: ", path.display())?,
            Source::Env(var) => write!(f, "environment {var}: ")?,
            Source::Flag(flag) => write!(f, "flag {flag}: ")?,
            Source::Default => {}
        }
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// All problems found in one configuration; start-up stops with exit code 2 on any.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(f, "invalid configuration ({n} problem{}):", if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Values given on the command line; they win over the environment and the file.
#[derive(Debug, Clone, Default)]
pub struct FlagOverrides {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub upstream: Option<String>,
}

/// Loads the configuration: the file (or the embedded defaults when `path` is `None`), then
/// `DRAINPROXY_*` variables from `env`, then flags.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &FlagOverrides,
) -> Result<Config, ConfigError> {
    let fail = |source: Source, field: &str, message: String| ConfigError {
        problems: vec![Problem { source, field: field.into(), message }],
    };
    let (src, file) = match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => (s, Some(p.to_path_buf())),
            Err(e) => {
                let source = Source::File { path: p.to_path_buf(), line: None };
                return Err(fail(source, "", format!("cannot read the configuration file: {e}")));
            }
        },
        None => (String::new(), None),
    };
    let file_source = |line: Option<usize>| match &file {
        Some(path) => Source::File { path: path.clone(), line },
        None => Source::Default,
    };

    let root: Value = if src.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        yaml_serde::from_str(&src).map_err(|e| {
            let line = e.location().map(|l| l.line());
            fail(file_source(line), "", format!("not valid YAML: {e}"))
        })?
    };
    let mut root = match root {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => return Err(fail(file_source(Some(1)), "", "the top level must be a mapping of keys".into())),
    };

    let mut problems = Vec::new();
    let mut overridden: BTreeMap<String, Source> = BTreeMap::new();
    let mut env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("DRAINPROXY_")).collect();
    env.sort();
    for (var, value) in env {
        if CLI_ENV.contains(&var.as_str()) {
            continue;
        }
        match KEYS.iter().find(|k| env_var_for(k) == var) {
            Some(key) => {
                set_path(&mut root, key, scalar_from_env(&value));
                overridden.insert((*key).to_string(), Source::Env(var));
            }
            None => problems.push(Problem {
                source: Source::Env(var.clone()),
                field: String::new(),
                message: "unknown variable; each key maps to DRAINPROXY_<KEY> (see config/example.yaml)".into(),
            }),
        }
    }
    for (key, flag, value) in [
        ("listen", "--listen", &flags.listen),
        ("admin", "--admin", &flags.admin),
        ("upstream.address", "--upstream", &flags.upstream),
    ] {
        if let Some(v) = value {
            set_path(&mut root, key, Value::String(v.clone()));
            overridden.insert(key.to_string(), Source::Flag(flag));
        }
    }

    let source_of = |field: &str| -> Source {
        // The most specific override that covers this field names the place to fix.
        if let Some(s) = overridden.get(field) {
            return s.clone();
        }
        file_source(locate(&src, field))
    };

    let mut cfg = Config::default();
    for (key, value) in root {
        let Some(name) = key.as_str().map(str::to_owned) else {
            problems.push(Problem {
                source: file_source(None),
                field: format!("{key:?}"),
                message: "keys must be strings".into(),
            });
            continue;
        };
        let errors = match name.as_str() {
            "listen" => section(value, &mut cfg.listen),
            "admin" => section(value, &mut cfg.admin),
            "upstream" => section(value, &mut cfg.upstream),
            "limits" => section(value, &mut cfg.limits),
            "health" => section(value, &mut cfg.health),
            "drain" => section(value, &mut cfg.drain),
            "runtime" => section(value, &mut cfg.runtime),
            "tls" => section(value, &mut cfg.tls),
            "hooks" => section(value, &mut cfg.hooks),
            "warmup" => section(value, &mut cfg.warmup),
            "log" => section(value, &mut cfg.log),
            _ => vec![(
                String::new(),
                "unknown field; expected one of listen, admin, upstream, limits, health, drain, runtime, tls, hooks, warmup, log"
                    .to_string(),
            )],
        };
        for (sub, message) in errors {
            let field = if sub.is_empty() || sub == "." { name.clone() } else { format!("{name}.{sub}") };
            let source = source_of(&field);
            problems.push(Problem { source, field, message });
        }
    }

    // A field that failed to parse holds its default now: checks that name it would only
    // repeat the problem already reported.
    let bad: Vec<String> = problems.iter().map(|p| p.field.clone()).collect();
    for (field, message) in cfg.validate().into_iter().filter(|(f, _)| !bad.iter().any(|b| b == f)) {
        let source = source_of(field);
        problems.push(Problem { source, field: field.to_string(), message });
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError { problems })
    }
}

/// Deserializes one top-level section. On an error the offending key is set aside and the
/// rest deserialized again, so every bad key in the section is reported, not just the first.
/// Returns the failing sub-paths with their messages.
fn section<T: DeserializeOwned>(mut value: Value, slot: &mut T) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    for _ in 0..KEYS.len() + 4 {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) => {
                *slot = v;
                return errors;
            }
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                // yaml_serde appends a position that refers to the detached section, not the file.
                let message = match inner.find(" at line ") {
                    Some(i) => inner[..i].to_string(),
                    None => inner,
                };
                let removed = remove_path(&mut value, &path);
                errors.push((path, message));
                if !removed {
                    return errors;
                }
            }
        }
    }
    errors
}

/// Removes a dotted key (as serde_path_to_error prints it) from a mapping tree.
fn remove_path(value: &mut Value, path: &str) -> bool {
    if path.is_empty() || path == "." || path.contains('[') {
        return false;
    }
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return false };
    let mut cur = value;
    for part in parts {
        match cur.get_mut(part) {
            Some(next) => cur = next,
            None => return false,
        }
    }
    match cur.as_mapping_mut() {
        Some(m) => m.remove(last).is_some(),
        None => false,
    }
}

/// An environment value is read as a YAML scalar (so `3` is a number and `true` a bool);
/// anything that would parse as a structure stays a plain string.
fn scalar_from_env(raw: &str) -> Value {
    match yaml_serde::from_str::<Value>(raw) {
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::String(_))) => v,
        _ => Value::String(raw.to_string()),
    }
}

fn set_path(root: &mut Mapping, dotted: &str, value: Value) {
    let mut parts = dotted.split('.').peekable();
    let mut map = root;
    while let Some(part) = parts.next() {
        let key = Value::String(part.to_string());
        if parts.peek().is_none() {
            map.insert(key, value);
            return;
        }
        let entry = map.entry(key).or_insert_with(|| Value::Mapping(Mapping::new()));
        if !entry.is_mapping() {
            *entry = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(next) = entry else { return };
        map = next;
    }
}

/// Finds the 1-based line of a dotted key in block-style YAML, or of its deepest found parent.
pub fn locate(src: &str, dotted: &str) -> Option<usize> {
    let mut found = None;
    let mut parent_indent: Option<usize> = None;
    let mut start = 0;
    let lines: Vec<&str> = src.lines().collect();
    'parts: for part in dotted.split('.') {
        let part = part.trim_start_matches('[').split('[').next().unwrap_or(part);
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if let Some(p) = parent_indent {
                if i > start && indent <= p {
                    break 'parts;
                }
            }
            let key = trimmed.trim_start_matches("- ");
            if key.strip_prefix(part).is_some_and(|rest| rest.trim_start().starts_with(':')) {
                found = Some(i + 1);
                parent_indent = Some(indent);
                start = i + 1;
                continue 'parts;
            }
        }
        break;
    }
    found
}

impl Config {
    /// Cross-field checks; every problem found, as (field, message).
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        let d = &self.drain;
        if d.min_delay >= d.max_duration {
            p.push((
                "drain.min_delay",
                format!(
                    "min_delay ({}) must be less than max_duration ({}): the drain could never release on idleness",
                    d.min_delay, d.max_duration
                ),
            ));
        }
        if d.quiet_period >= d.max_duration {
            p.push((
                "drain.quiet_period",
                format!("quiet_period ({}) must be less than max_duration ({})", d.quiet_period, d.max_duration),
            ));
        }
        if d.retry_after.0.is_zero() || d.retry_after.0.subsec_millis() != 0 {
            p.push((
                "drain.retry_after",
                "must be a whole number of seconds of at least 1s (Retry-After counts seconds)".into(),
            ));
        }
        if self.listen == self.admin && self.listen.port() != 0 {
            p.push(("admin", format!("admin and listen must differ (both {})", self.listen)));
        }
        if self.upstream.address.to_socket_addrs().map(|mut a| a.next().is_none()).unwrap_or(true) {
            p.push(("upstream.address", format!("{:?} is not a reachable host:port", self.upstream.address)));
        } else if self.upstream.address.parse::<SocketAddr>().is_ok_and(|a| a == self.listen) {
            p.push(("upstream.address", "must not be drainproxy's own listen address".into()));
        }
        let u = &self.upstream;
        for (field, v) in
            [("upstream.connect_timeout", u.connect_timeout), ("upstream.pool_idle_timeout", u.pool_idle_timeout)]
        {
            if v.0.is_zero() {
                p.push((field, "must be greater than 0".into()));
            }
        }
        if u.request_timeout.is_some_and(|t| t.0.is_zero()) {
            p.push(("upstream.request_timeout", "must be greater than 0 (omit it for no timeout)".into()));
        }
        let l = &self.limits;
        if l.header_read_timeout.0.is_zero() {
            p.push(("limits.header_read_timeout", "must be greater than 0".into()));
        }
        if l.idle_timeout.0.is_zero() {
            p.push(("limits.idle_timeout", "must be greater than 0".into()));
        }
        if l.max_header_bytes < 8192 {
            p.push(("limits.max_header_bytes", "must be at least 8192".into()));
        }
        if l.max_connections == 0 {
            p.push(("limits.max_connections", "must be at least 1".into()));
        }
        let h = &self.health;
        if h.interval.0.is_zero() {
            p.push(("health.interval", "must be greater than 0".into()));
        }
        if h.timeout.0.is_zero() {
            p.push(("health.timeout", "must be greater than 0".into()));
        }
        if h.healthy_threshold == 0 {
            p.push(("health.healthy_threshold", "must be at least 1".into()));
        }
        if h.unhealthy_threshold == 0 {
            p.push(("health.unhealthy_threshold", "must be at least 1".into()));
        }
        if let Some(path) = &h.path {
            if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                p.push(("health.path", format!("{path:?} must be an absolute path such as /healthz")));
            }
        }
        if self.runtime.threads == 0 || self.runtime.threads > 64 {
            p.push(("runtime.threads", "must be between 1 and 64".into()));
        }
        if let Some(tls) = &self.tls {
            if tls.cert.as_os_str().is_empty() {
                p.push(("tls.cert", "must name the certificate file (PEM)".into()));
            }
            if tls.key.as_os_str().is_empty() {
                p.push(("tls.key", "must name the private key file (PEM)".into()));
            }
            if !tls.reload_interval.0.is_zero() && tls.reload_interval.0 < Duration::from_secs(1) {
                p.push(("tls.reload_interval", "must be at least 1s, or 0s to never read the files again".into()));
            }
        }
        self.validate_hooks(&mut p);
        self.validate_warmup(&mut p);
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(("log.level", format!("{:?} is not a valid level or filter (try info or debug)", self.log.level)));
        }
        p
    }
}

impl Config {
    /// What can be checked before `${NAME}` templates are filled in at start-up.
    fn validate_hooks(&self, p: &mut Vec<(&'static str, String)>) {
        for (field, list) in [("hooks.on_ready", &self.hooks.on_ready), ("hooks.on_drain", &self.hooks.on_drain)] {
            for (i, h) in list.iter().enumerate() {
                let n = i + 1;
                if http::Method::from_bytes(h.method.as_bytes()).is_err() {
                    p.push((field, format!("hook {n}: {:?} is not an HTTP method", h.method)));
                }
                let scheme = h.url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
                match scheme.as_deref() {
                    Some("https") => {}
                    Some("http") if h.ca.is_some() => {
                        p.push((field, format!("hook {n}: ca applies to https:// URLs only")))
                    }
                    Some("http") => {}
                    _ => p.push((
                        field,
                        format!("hook {n}: url {:?} must be an absolute http:// or https:// URL", h.url),
                    )),
                }
                for name in h.headers.keys() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        p.push((field, format!("hook {n}: {name:?} is not a header name")));
                    }
                }
                if h.timeout.0.is_zero() {
                    p.push((field, format!("hook {n}: timeout must be greater than 0")));
                }
            }
        }
    }

    fn validate_warmup(&self, p: &mut Vec<(&'static str, String)>) {
        let w = &self.warmup;
        if w.timeout.0.is_zero() {
            p.push(("warmup.timeout", "must be greater than 0".into()));
        }
        let mut total = 0u64;
        for (i, r) in w.requests.iter().enumerate() {
            let n = i + 1;
            if http::Method::from_bytes(r.method.as_bytes()).is_err() {
                p.push(("warmup.requests", format!("request {n}: {:?} is not an HTTP method", r.method)));
            }
            if !r.path.starts_with('/') || r.path.parse::<http::uri::PathAndQuery>().is_err() {
                p.push((
                    "warmup.requests",
                    format!("request {n}: path {:?} must be an absolute path such as /", r.path),
                ));
            }
            for (name, value) in &r.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    p.push(("warmup.requests", format!("request {n}: {name:?} is not a header name")));
                } else if http::HeaderValue::from_str(value).is_err() {
                    p.push((
                        "warmup.requests",
                        format!("request {n}: the value of {name} is not a valid header value"),
                    ));
                }
            }
            if r.count == 0 {
                p.push(("warmup.requests", format!("request {n}: count must be at least 1")));
            }
            total += u64::from(r.count);
        }
        if total > WARMUP_MAX_REQUESTS {
            p.push((
                "warmup.requests",
                format!(
                    "{total} requests in all; at most {WARMUP_MAX_REQUESTS}: a warm-up delays every pod's readiness"
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(src: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("drainproxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.yaml", src.len() * 31 + env.len()));
        std::fs::write(&path, src).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        load(Some(&path), env, &FlagOverrides::default())
    }

    #[test]
    fn the_tls_section_is_checked_and_can_come_from_the_environment() {
        let err =
            load_str("tls:\n  cert: /c.pem\n  key: \"\"\n  reload_interval: 500ms\n", &[]).unwrap_err().to_string();
        assert!(err.contains("tls.key: must name"), "{err}");
        assert!(err.contains("tls.reload_interval: must be at least 1s"), "{err}");
        let c = load_str("", &[("DRAINPROXY_TLS_CERT", "/c.pem"), ("DRAINPROXY_TLS_KEY", "/k.pem")]).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!((tls.cert.to_str(), tls.key.to_str()), (Some("/c.pem"), Some("/k.pem")));
        assert_eq!(tls.reload_interval, Dur::secs(10));
    }

    #[test]
    fn bad_warm_up_requests_are_each_reported() {
        let src = r#"
warmup:
  timeout: 0s
  requests:
    - { method: "G T", path: /ok }
    - { path: relative }
    - { path: /h, headers: { "bad name": x } }
    - { path: /c, count: 0 }
    - { path: /many, count: 100001 }
"#;
        let err = load_str(src, &[]).unwrap_err();
        let text = err.to_string();
        for needle in [
            "warmup.timeout: must be greater than 0",
            "request 1: \"G T\" is not an HTTP method",
            "request 2: path \"relative\" must be an absolute path",
            "request 3: \"bad name\" is not a header name",
            "request 4: count must be at least 1",
            "100004 requests in all",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 6, "{text}");
        let ok = load_str("warmup:\n  requests:\n    - { path: /, count: 3 }\n", &[]).unwrap();
        assert_eq!((ok.warmup.requests[0].method.as_str(), ok.warmup.requests[0].count), ("GET", 3));
    }

    #[test]
    fn bad_hooks_are_each_reported() {
        let src = r#"
hooks:
  on_ready:
    - { method: "B AD", url: "http://r/x" }
    - { url: "http://r/x", ca: /etc/ca.pem }
  on_drain:
    - { url: "r/x", headers: { "bad name": x }, timeout: 0s }
"#;
        let text = load_str(src, &[]).unwrap_err().to_string();
        for needle in [
            "hooks.on_ready: hook 1: \"B AD\" is not an HTTP method",
            "hooks.on_ready: hook 2: ca applies to https:// URLs only",
            "hooks.on_drain: hook 1: url \"r/x\" must be an absolute http:// or https:// URL",
            "hooks.on_drain: hook 1: \"bad name\" is not a header name",
            "hooks.on_drain: hook 1: timeout must be greater than 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(load_str("hooks:\n  on_drain:\n    - { url: \"http://${R}/x\" }\n", &[]).is_ok());
        assert!(load_str("hooks:\n  on_drain:\n    - { url: \"https://r/x\", ca: /etc/ca.pem }\n", &[]).is_ok());
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("5").unwrap_err().contains("unit"));
        assert!(parse_duration("5parsecs").is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load(None, Vec::new(), &FlagOverrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8000");
        assert_eq!(c.admin.to_string(), "0.0.0.0:9901");
        assert_eq!(c.upstream.address, "127.0.0.1:8080");
        assert_eq!(c.drain.min_delay, Dur::secs(5));
        assert_eq!(c.drain.quiet_period, Dur::secs(1));
        assert_eq!(c.drain.max_duration, Dur::secs(25));
        assert_eq!(c.drain.retry_after, Dur::secs(1));
        assert!(c.upstream.pool_idle_timeout < Dur::secs(5));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let src = "listen: 0.0.0.0:8000\nupstream:\n  address: 127.0.0.1:8080\n  colour: red\ndrain:\n  min_delay: 30s\n  max_duration: 10s\nbogus: 1\n";
        let err = load_str(src, &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(":4: upstream.colour: unknown field"), "{text}");
        assert!(text.contains(":6: drain.min_delay: min_delay (30s) must be less than max_duration (10s)"), "{text}");
        assert!(text.contains(":8: bogus: unknown field"), "{text}");
    }

    #[test]
    fn every_bad_key_in_one_section_is_reported() {
        let src = "drain:\n  quiet: 1s\n  min_delay: soon\n  max_duration: 10s\n  colour: red\n";
        let text = load_str(src, &[]).unwrap_err().to_string();
        assert!(text.contains(":2: drain.quiet: unknown field"), "{text}");
        assert!(text.contains(":3: drain.min_delay: invalid duration"), "{text}");
        assert!(text.contains(":5: drain.colour: unknown field"), "{text}");
        assert!(text.contains("3 problems"), "{text}");
    }

    #[test]
    fn environment_overrides_the_file_and_is_named_in_errors() {
        let src = "drain:\n  min_delay: 2s\n";
        let c = load_str(src, &[("DRAINPROXY_DRAIN_MIN_DELAY", "3s"), ("DRAINPROXY_RUNTIME_THREADS", "2")]).unwrap();
        assert_eq!(c.drain.min_delay, Dur::secs(3));
        assert_eq!(c.runtime.threads, 2);
        let err = load_str(src, &[("DRAINPROXY_DRAIN_MIN_DELAY", "soon")]).unwrap_err().to_string();
        assert!(err.contains("environment DRAINPROXY_DRAIN_MIN_DELAY: drain.min_delay"), "{err}");
        let err = load_str(src, &[("DRAINPROXY_DRIAN_MIN_DELAY", "1s")]).unwrap_err().to_string();
        assert!(err.contains("DRAINPROXY_DRIAN_MIN_DELAY: unknown variable"), "{err}");
    }

    #[test]
    fn flags_win_over_environment() {
        let flags = FlagOverrides { listen: Some("127.0.0.1:7000".into()), ..Default::default() };
        let env = vec![("DRAINPROXY_LISTEN".to_string(), "127.0.0.1:7001".to_string())];
        let c = load(None, env, &flags).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
    }

    #[test]
    fn yaml_syntax_errors_carry_the_line() {
        let err = load_str("drain:\n  min_delay: [1s\n", &[]).unwrap_err().to_string();
        assert!(err.contains("not valid YAML"), "{err}");
        assert!(err.contains(".yaml:"), "{err}");
    }

    #[test]
    fn every_key_has_an_environment_variable_and_is_documented() {
        let example = include_str!("../config/example.yaml");
        for key in KEYS {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(example.contains(&format!("{leaf}:")), "config/example.yaml does not document {key}");
        }
    }

    #[test]
    fn every_example_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                load(Some(&path), Vec::new(), &FlagOverrides::default())
                    .unwrap_or_else(|e| panic!("{} is invalid: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 2, "expected config/example.yaml and config/minimal.yaml");
    }

    #[test]
    fn locate_finds_nested_keys() {
        let src = "a: 1\nupstream:\n  # c\n  address: x\ndrain:\n  address: y\n";
        assert_eq!(locate(src, "upstream.address"), Some(4));
        assert_eq!(locate(src, "drain.address"), Some(6));
        assert_eq!(locate(src, "drain.nothing"), Some(5));
    }
}
