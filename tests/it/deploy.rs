//! `deploy/` and the `Dockerfile`: every overlay renders with `kubectl kustomize` and every
//! rendered object, and every `inject` output, validates against the Kubernetes 1.29 schemas
//! (`kubernetes-validate --strict`); on top, the rules the schemas do not encode (port names)
//! and the drain invariants the manifests must keep.

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_serde::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn need(tool: &str) {
    let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{tool} is not installed: run `bash .ci/run` once, which installs it");
}

fn docs(text: &str) -> Vec<Value> {
    text.split("\n---")
        .filter(|d| !d.trim().is_empty())
        .map(|d| yaml_serde::from_str(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn validate(file: &Path) {
    need("kubernetes-validate");
    let out =
        Command::new("kubernetes-validate").args(["-k", "1.29.0", "--strict", "--quiet"]).arg(file).output().unwrap();
    assert!(
        out.status.success(),
        "{} does not validate:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// IANA service names, as the API server checks container port names: at most 15
/// characters, lowercase letters, digits and inner dashes, at least one letter.
fn check_port_names(v: &Value, at: &str) {
    match v {
        Value::Mapping(m) => {
            if let (Some(name), Some(_)) = (m.get("name").and_then(Value::as_str), m.get("containerPort")) {
                let ok = name.len() <= 15
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && name.chars().any(|c| c.is_ascii_lowercase())
                    && !name.starts_with('-')
                    && !name.ends_with('-')
                    && !name.contains("--");
                assert!(ok, "{at}: invalid port name {name:?}");
            }
            m.values().for_each(|x| check_port_names(x, at));
        }
        Value::Sequence(s) => s.iter().for_each(|x| check_port_names(x, at)),
        _ => {}
    }
}

fn render(overlay: &str) -> (PathBuf, String) {
    need("kubectl");
    let out =
        Command::new("kubectl").arg("kustomize").arg(root().join("deploy/overlays").join(overlay)).output().unwrap();
    assert!(out.status.success(), "kustomize {overlay}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let file = std::env::temp_dir().join(format!("drainproxy-{}-{overlay}.yaml", std::process::id()));
    std::fs::write(&file, &text).unwrap();
    (file, text)
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn every_overlay_renders_and_validates_with_the_drain_invariants() {
    let overlays: Vec<String> = std::fs::read_dir(root().join("deploy/overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(overlays.iter().any(|o| o == "native") && overlays.iter().any(|o| o == "classic"));
    for overlay in &overlays {
        let (file, text) = render(overlay);
        validate(&file);
        let objects = docs(&text);
        check_port_names(&Value::Sequence(objects.clone()), overlay);
        let deploy = find(&objects, "Deployment");
        let spec = &deploy["spec"];
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(), Some(0), "{overlay}");
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"].as_u64(), Some(1), "{overlay}");
        assert!(spec["minReadySeconds"].as_u64().unwrap_or(0) > 0, "{overlay}: minReadySeconds");
        let pod = &spec["template"]["spec"];
        let native = overlay.starts_with("native");
        let list = if native { "initContainers" } else { "containers" };
        let dp =
            pod[list].as_sequence().unwrap().iter().find(|c| c["name"] == "drainproxy").expect("drainproxy container");
        assert_eq!(dp["restartPolicy"].as_str() == Some("Always"), native, "{overlay}: restartPolicy");
        assert_eq!(dp["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(dp["livenessProbe"]["httpGet"]["path"], "/live");
        assert_eq!(dp["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(dp["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(dp["securityContext"]["capabilities"]["drop"][0], "ALL");
        let app = pod["containers"].as_sequence().unwrap().iter().find(|c| c["name"] == "app").unwrap();
        let hook = &app["lifecycle"]["preStop"]["httpGet"];
        assert_eq!(hook["path"], "/drain");
        assert_eq!(hook["port"].as_u64(), Some(9901), "{overlay}: the preStop port must be numeric");
        // The drainproxy config shipped in the ConfigMap is valid and fits in the grace period.
        let cm = find(&objects, "ConfigMap");
        let cfg_text = cm["data"]["drainproxy.yaml"].as_str().unwrap();
        let cfg_file = std::env::temp_dir().join(format!("drainproxy-cm-{}-{overlay}.yaml", std::process::id()));
        std::fs::write(&cfg_file, cfg_text).unwrap();
        let cfg = drainproxy::config::load(Some(&cfg_file), Vec::new(), &Default::default()).unwrap();
        let need_s = (cfg.drain.min_delay.0 + cfg.drain.max_duration.0).as_secs();
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > need_s, "{overlay}: grace {grace}s must exceed min_delay + max_duration ({need_s}s)");
        // The Service's named targetPort lands on drainproxy, not the app.
        let svc = find(&objects, "Service");
        let target = svc["spec"]["ports"][0]["targetPort"].as_str().expect("a named targetPort");
        assert!(
            dp["ports"].as_sequence().unwrap().iter().any(|p| p["name"] == target),
            "{overlay}: targetPort {target}"
        );
        assert_eq!(spec["template"]["metadata"]["annotations"]["prometheus.io/scrape"], "true");
        find(&objects, "PodDisruptionBudget");
    }
}

#[test]
fn every_inject_output_validates_against_the_kubernetes_schemas() {
    for entry in std::fs::read_dir(root().join("tests/inject")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".out.yaml") {
            validate(&path);
            let text = std::fs::read_to_string(&path).unwrap();
            check_port_names(&Value::Sequence(docs(&text)), &path.display().to_string());
        }
    }
}

#[test]
fn dockerfile_builds_a_static_non_root_image_with_exec_form_entrypoint() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage");
    let last_from = froms.last().unwrap();
    assert!(last_from.contains("distroless/static") || last_from.contains("scratch"), "{last_from}");
    let final_stage: Vec<&&str> = lines.iter().skip_while(|l| *l != *last_from).collect();
    let user = final_stage.iter().find(|l| l.starts_with("USER ")).expect("USER in the final stage");
    assert!(!user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"), "{user}");
    let entry = final_stage.iter().find(|l| l.starts_with("ENTRYPOINT ")).expect("ENTRYPOINT");
    let json: Vec<String> =
        serde_json::from_str(entry.trim_start_matches("ENTRYPOINT ")).expect("exec form (a JSON array)");
    assert_eq!(json, ["/drainproxy"]);
    assert!(final_stage.contains(&&"STOPSIGNAL SIGTERM"));
    let expose = final_stage.iter().find(|l| l.starts_with("EXPOSE ")).expect("EXPOSE");
    assert!(expose.contains("8000") && expose.contains("9901"), "{expose}");
    // The build stage runs the script CI runs, so CI builds the same static binary.
    assert!(text.contains("RUN ./deploy/build-static.sh"));
    let script = std::fs::read_to_string(root().join("deploy/build-static.sh")).unwrap();
    assert!(script.contains("crt-static") && script.contains("--release") && script.contains("--locked"));
}

#[test]
fn grafana_dashboard_charts_the_drain_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/drainproxy-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: String = v["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    for m in [
        "drainproxy_phase",
        "drainproxy_drains_total",
        "drainproxy_drain_duration_seconds",
        "drainproxy_drain_last_request_seconds",
        "drainproxy_drain_requests_total",
        "drainproxy_retry_hints_total",
        "drainproxy_drain_connections_closed_total",
    ] {
        assert!(exprs.contains(m), "the dashboard has no panel for {m}");
    }
}
