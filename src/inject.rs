//! `drainproxy inject`: adds drainproxy to Kubernetes workload manifests, in the style of
//! `linkerd inject`.
//!
//! Reads multi-document YAML. Deployments, StatefulSets, DaemonSets, ReplicaSets and Pods get
//! drainproxy (a native sidecar by default, or a classic second container); every other
//! document, and every workload that already has a `drainproxy` container, is written back
//! byte for byte, so injecting twice equals injecting once. Comments inside an injected
//! workload are not preserved (the document is re-serialized).
//!
//! It never writes a cluster and never silently overwrites: an existing `preStop` is kept
//! with a warning unless `--force`; the grace period is raised, never lowered.

use std::fmt;

use yaml_serde::{Mapping, Value};

use crate::config::Dur;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An init container with `restartPolicy: Always` (Kubernetes ≥ 1.29).
    Native,
    /// A regular second container.
    Classic,
}

#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub mode: Mode,
    pub image: String,
    /// Replace an existing `preStop` on the app container.
    pub force: bool,
    /// The app container; default: the first container.
    pub container: Option<String>,
    /// The app's serving port; default: its first `containerPort`.
    pub port: Option<u16>,
    pub listen_port: u16,
    pub admin_port: u16,
    pub min_delay: Dur,
    pub quiet_period: Dur,
    pub max_duration: Dur,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            mode: Mode::Native,
            image: format!("ghcr.io/drainproxy/drainproxy:{}", env!("CARGO_PKG_VERSION")),
            force: false,
            container: None,
            port: None,
            listen_port: 8000,
            admin_port: 9901,
            min_delay: Dur::secs(5),
            quiet_period: Dur::secs(1),
            max_duration: Dur::secs(25),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Change,
    Warning,
}

/// One thing `inject` did or wants the user to do, for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub level: Level,
    pub object: String,
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Change => "change",
            Level::Warning => "warning",
        };
        write!(f, "{tag}: {}: {}", self.object, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("document {document}: {message}")]
pub struct InjectError {
    pub document: usize,
    pub message: String,
}

pub struct Injected {
    pub output: String,
    pub notes: Vec<Note>,
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod"];
const NAME: &str = "drainproxy";

/// Splits multi-document YAML at `---` lines, keeping each document's text as written.
fn split_documents(input: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push(&input[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&input[start..]);
    docs
}

pub fn inject(input: &str, opts: &InjectOptions) -> Result<Injected, InjectError> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut notes = Vec::new();
    let texts = split_documents(input);
    let mut parsed = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            yaml_serde::from_str(text).map_err(|e| InjectError { document: i + 1, message: e.to_string() })?
        };
        parsed.push(value);
    }
    let services: Vec<&Value> = parsed.iter().filter(|v| v["kind"].as_str() == Some("Service")).collect();
    for (i, (text, value)) in texts.iter().zip(&parsed).enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let kind = value["kind"].as_str().unwrap_or("");
        let rewritten = if WORKLOADS.contains(&kind) {
            let mut v = value.clone();
            let object = format!("{kind}/{}", v["metadata"]["name"].as_str().unwrap_or("?"));
            match inject_workload(&mut v, opts, &object, &services, &mut notes) {
                Ok(true) => Some(
                    yaml_serde::to_string(&v).map_err(|e| InjectError { document: i + 1, message: e.to_string() })?,
                ),
                Ok(false) => None,
                Err(message) => return Err(InjectError { document: i + 1, message: format!("{object}: {message}") }),
            }
        } else {
            None
        };
        match rewritten {
            Some(text) => out.push_str(&text),
            None => out.push_str(text),
        }
    }
    Ok(Injected { output: out, notes })
}

fn pod_spec_mut<'a>(v: &'a mut Value, kind: &str) -> Option<&'a mut Mapping> {
    let spec = v.get_mut("spec")?;
    let spec = if kind == "Pod" { spec } else { spec.get_mut("template")?.get_mut("spec")? };
    spec.as_mapping_mut()
}

fn has_drainproxy(spec: &Mapping) -> bool {
    ["containers", "initContainers"].iter().any(|k| {
        spec.get(*k).and_then(Value::as_sequence).is_some_and(|s| s.iter().any(|c| c["name"].as_str() == Some(NAME)))
    })
}

/// Returns `Ok(true)` when the workload was changed.
fn inject_workload(
    v: &mut Value,
    opts: &InjectOptions,
    object: &str,
    services: &[&Value],
    notes: &mut Vec<Note>,
) -> Result<bool, String> {
    let kind = v["kind"].as_str().unwrap_or("").to_string();
    let labels = pod_labels(v, &kind);
    let change =
        |notes: &mut Vec<Note>, m: String| notes.push(Note { level: Level::Change, object: object.into(), message: m });
    let warn = |notes: &mut Vec<Note>, m: String| {
        notes.push(Note { level: Level::Warning, object: object.into(), message: m })
    };
    let spec = pod_spec_mut(v, &kind).ok_or("no pod spec found")?;
    if has_drainproxy(spec) {
        change(notes, "already has drainproxy: unchanged".into());
        return Ok(false);
    }
    // drainproxy's ports must not collide with any port a container of the pod declares.
    let used: Vec<u64> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_sequence))
        .flatten()
        .filter_map(|c| c["ports"].as_sequence())
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    let free = |mut p: u16| {
        while used.contains(&u64::from(p)) {
            p += 1;
        }
        p
    };
    let listen_port = free(opts.listen_port);
    let admin_port = free(opts.admin_port);
    let containers = spec.get_mut("containers").and_then(Value::as_sequence_mut).ok_or("no containers")?;
    let idx = match &opts.container {
        Some(name) => containers
            .iter()
            .position(|c| c["name"].as_str() == Some(name))
            .ok_or_else(|| format!("no container named {name:?}"))?,
        None => 0,
    };
    let app = containers.get_mut(idx).and_then(Value::as_mapping_mut).ok_or("the app container is not a mapping")?;
    let app_name = app.get("name").and_then(Value::as_str).unwrap_or("app").to_string();

    // The app's serving port, and its name if it has one.
    let ports = app.get_mut("ports").and_then(Value::as_sequence_mut);
    let mut port_name: Option<String> = None;
    let app_port: u16 = match (opts.port, ports) {
        (Some(p), ports) => {
            if let Some(ports) = ports {
                if let Some(entry) = ports.iter_mut().find(|e| e["containerPort"].as_u64() == Some(u64::from(p))) {
                    port_name = rename_port(entry);
                }
            }
            p
        }
        (None, Some(ports)) if !ports.is_empty() => {
            let entry = &mut ports[0];
            let p = entry["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or("first containerPort is not a port number")?;
            port_name = rename_port(entry);
            p
        }
        (None, _) => {
            warn(notes, format!("container {app_name:?} declares no containerPort: assuming 8080 (use --port)"));
            8080
        }
    };
    if let Some(old) = &port_name {
        // The app's own probes may name the port: they must follow it to its new name.
        let new = Value::from(app_port_name(old));
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                if let Some(port) = app.get_mut(probe).and_then(|p| p.get_mut(handler)).and_then(|h| h.get_mut("port"))
                {
                    if port.as_str() == Some(old) {
                        *port = new.clone();
                    }
                }
            }
        }
    }
    let dp_port_name = match &port_name {
        Some(name) => {
            change(
                notes,
                format!(
                    "port {name:?} now belongs to drainproxy (:{listen_port}); the app's port is renamed {:?}",
                    app_port_name(name)
                ),
            );
            name.clone()
        }
        None => {
            let mut msg = format!(
                "the app's port {app_port} has no name: Services must target drainproxy's port \"http\" ({listen_port}) by name"
            );
            for svc in services.iter().filter(|s| selects(s, &labels)) {
                let svc_name = svc["metadata"]["name"].as_str().unwrap_or("?");
                for p in svc["spec"]["ports"].as_sequence().into_iter().flatten() {
                    let target = p.get("targetPort").or_else(|| p.get("port"));
                    if target.and_then(Value::as_u64) == Some(u64::from(app_port)) {
                        msg.push_str(&format!(
                            "; change Service/{svc_name} port {} to targetPort: http",
                            p["port"].as_u64().unwrap_or(0)
                        ));
                    }
                }
            }
            warn(notes, msg);
            "http".into()
        }
    };

    // preStop: the app stops only once drainproxy has drained.
    let prestop = Value::Mapping(map(&[(
        "httpGet",
        Value::Mapping(map(&[("path", "/drain".into()), ("port", Value::from(admin_port))])),
    )]));
    let lifecycle = app.entry("lifecycle".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
    if !lifecycle.is_mapping() {
        *lifecycle = Value::Mapping(Mapping::new());
    }
    let lifecycle = lifecycle.as_mapping_mut().ok_or("lifecycle is not a mapping")?;
    match lifecycle.get("preStop") {
        Some(existing) if !opts.force => warn(
            notes,
            format!(
                "container {app_name:?} already has a preStop ({}): kept, so drainproxy cannot hold the app until it is idle; rerun with --force to replace it",
                describe_hook(existing)
            ),
        ),
        existing => {
            if let Some(e) = existing {
                warn(notes, format!("replaced the preStop of {app_name:?} ({}) with GET /drain (--force)", describe_hook(e)));
            } else {
                change(notes, format!("preStop on {app_name:?}: GET :{admin_port}/drain (blocks until drained)"));
            }
            lifecycle.insert("preStop".into(), prestop);
        }
    }
    let health_path = app
        .get("readinessProbe")
        .and_then(|p| p.get("httpGet"))
        .and_then(|h| h.get("path"))
        .and_then(Value::as_str)
        .map(str::to_string);

    let sidecar = sidecar(opts, app_port, listen_port, admin_port, &dp_port_name, health_path.as_deref())?;
    match opts.mode {
        Mode::Native => {
            let inits = spec.entry("initContainers".into()).or_insert_with(|| Value::Sequence(Vec::new()));
            let inits = inits.as_sequence_mut().ok_or("initContainers is not a list")?;
            inits.insert(0, sidecar);
            change(
                notes,
                "drainproxy added as a native sidecar (initContainers, restartPolicy: Always; Kubernetes >= 1.29)"
                    .into(),
            );
        }
        Mode::Classic => {
            let containers = spec.get_mut("containers").and_then(Value::as_sequence_mut).ok_or("no containers")?;
            containers.push(sidecar);
            change(notes, "drainproxy added as a classic sidecar container".into());
        }
    }

    // The whole drain must fit in the grace period, with room for the app's own shutdown.
    let needed = (opts.min_delay.0 + opts.max_duration.0).as_secs() + 5;
    let current = spec.get("terminationGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(30);
    if current < needed {
        spec.insert("terminationGracePeriodSeconds".into(), Value::from(needed));
        change(notes, format!("terminationGracePeriodSeconds raised from {current} to {needed}"));
    }
    Ok(true)
}

fn app_port_name(name: &str) -> String {
    // Port names are at most 15 characters.
    let mut n = format!("{name}-app");
    if n.len() > 15 {
        n = format!("app-{}", &name[..name.len().min(11)]);
    }
    n
}

/// Renames a named port entry to its app name; returns the original name.
fn rename_port(entry: &mut Value) -> Option<String> {
    let name = entry.get("name")?.as_str()?.to_string();
    if let Some(m) = entry.as_mapping_mut() {
        m.insert("name".into(), Value::from(app_port_name(&name)));
    }
    Some(name)
}

fn describe_hook(hook: &Value) -> String {
    if let Some(cmd) = hook.get("exec").and_then(|e| e.get("command")).and_then(Value::as_sequence) {
        let words: Vec<&str> = cmd.iter().filter_map(Value::as_str).collect();
        return format!("exec {}", words.join(" "));
    }
    if let Some(path) = hook.get("httpGet").and_then(|h| h.get("path")).and_then(Value::as_str) {
        return format!("httpGet {path}");
    }
    if hook.get("sleep").is_some() {
        return "sleep".into();
    }
    "a hook".into()
}

fn pod_labels(v: &Value, kind: &str) -> Mapping {
    let meta = if kind == "Pod" { &v["metadata"] } else { &v["spec"]["template"]["metadata"] };
    meta["labels"].as_mapping().cloned().unwrap_or_default()
}

fn selects(service: &Value, labels: &Mapping) -> bool {
    match service["spec"]["selector"].as_mapping() {
        Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
        _ => false,
    }
}

fn map(entries: &[(&str, Value)]) -> Mapping {
    entries.iter().map(|(k, v)| (Value::from(*k), v.clone())).collect()
}

fn sidecar(
    opts: &InjectOptions,
    app_port: u16,
    listen: u16,
    admin: u16,
    port_name: &str,
    health: Option<&str>,
) -> Result<Value, String> {
    let restart = if opts.mode == Mode::Native { "restartPolicy: Always\n" } else { "" };
    let health_env = health.map_or(String::new(), |p| format!("- name: DRAINPROXY_HEALTH_PATH\n  value: {p:?}\n"));
    let yaml = format!(
        "name: {NAME}\n\
         image: {image:?}\n\
         args: [\"run\"]\n\
         {restart}\
         env:\n\
         - name: DRAINPROXY_LISTEN\n  value: \"0.0.0.0:{listen}\"\n\
         - name: DRAINPROXY_ADMIN\n  value: \"0.0.0.0:{admin}\"\n\
         - name: DRAINPROXY_UPSTREAM_ADDRESS\n  value: \"127.0.0.1:{app_port}\"\n\
         {health_env}\
         - name: DRAINPROXY_DRAIN_MIN_DELAY\n  value: \"{min}\"\n\
         - name: DRAINPROXY_DRAIN_QUIET_PERIOD\n  value: \"{quiet}\"\n\
         - name: DRAINPROXY_DRAIN_MAX_DURATION\n  value: \"{max}\"\n\
         ports:\n\
         - name: {port_name}\n  containerPort: {listen}\n\
         - name: dp-admin\n  containerPort: {admin}\n\
         startupProbe:\n  httpGet: {{path: /live, port: {admin}}}\n  periodSeconds: 1\n  failureThreshold: 30\n\
         livenessProbe:\n  httpGet: {{path: /live, port: {admin}}}\n  periodSeconds: 10\n\
         readinessProbe:\n  httpGet: {{path: /ready, port: {admin}}}\n  periodSeconds: 2\n  failureThreshold: 1\n\
         resources:\n  requests: {{cpu: 50m, memory: 32Mi}}\n  limits: {{memory: 128Mi}}\n\
         securityContext:\n  runAsNonRoot: true\n  runAsUser: 65532\n  readOnlyRootFilesystem: true\n  allowPrivilegeEscalation: false\n  capabilities: {{drop: [ALL]}}\n",
        image = opts.image,
        min = opts.min_delay,
        quiet = opts.quiet_period,
        max = opts.max_duration,
    );
    yaml_serde::from_str(&yaml).map_err(|e| format!("internal: sidecar template: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_and_rejoin_verbatim() {
        let input = "a: 1\n---\n# comment\nb: 2\n--- \nc: 3\n";
        let docs = split_documents(input);
        assert_eq!(docs, vec!["a: 1\n", "# comment\nb: 2\n", "c: 3\n"]);
        let out = inject(input, &InjectOptions::default()).unwrap();
        assert_eq!(out.output, "a: 1\n---\n# comment\nb: 2\n---\nc: 3\n");
    }

    #[test]
    fn port_names_stay_within_fifteen_characters() {
        assert_eq!(app_port_name("http"), "http-app");
        assert!(app_port_name("very-long-name1").len() <= 15);
    }
}
