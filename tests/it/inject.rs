//! `drainproxy inject` over real-world-shaped manifests: golden output and warnings, and
//! idempotence (injecting the output again changes nothing). The options of each case are on
//! the first line of its `.in.yaml`. `UPDATE_GOLDEN=1 cargo test inject` rewrites the goldens
//! (review the diff before committing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::bin;

fn run_inject(args: &[&str], input: &str) -> (String, String, i32) {
    use std::io::Write as _;
    let mut child = Command::new(bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap(), out.status.code().unwrap_or(-1))
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".in.yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 6, "golden cases missing in {}", dir.display());
    v
}

fn args_of(input: &str) -> Vec<String> {
    let first = input.lines().next().unwrap_or("");
    let rest = first.strip_prefix("# drainproxy inject").expect("first line names the options");
    rest.split_whitespace().map(str::to_string).collect()
}

#[test]
fn inject_matches_the_golden_manifests_and_warnings() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in cases() {
        let input = std::fs::read_to_string(&case).unwrap();
        let args = args_of(&input);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, err, code) = run_inject(&args, &input);
        assert_eq!(code, 0, "{}: {err}", case.display());
        let base = case.to_string_lossy().trim_end_matches(".in.yaml").to_string();
        for (ext, got) in [(".out.yaml", &out), (".warnings.txt", &err)] {
            let path = PathBuf::from(format!("{base}{ext}"));
            if update {
                std::fs::write(&path, got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_default();
            if &want != got {
                mismatches.push(format!("{}:\n--- want\n{want}\n--- got\n{got}", path.display()));
            }
        }
        // Idempotence: the output injected again is the output, with no warnings.
        let (again, err2, _) = run_inject(&args, &out);
        assert_eq!(again, out, "{}: injecting twice differs from injecting once", case.display());
        assert_eq!(err2, "", "{}: a second injection warned", case.display());
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

#[test]
fn dry_run_explains_and_writes_no_manifest() {
    let input = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject/spring-boot.in.yaml"))
        .unwrap();
    let (out, _, code) = run_inject(&["--dry-run"], &input);
    assert_eq!(code, 0);
    assert!(!out.contains("apiVersion"), "dry run printed manifests:\n{out}");
    assert!(
        out.contains("warning: Deployment/orders: container \"orders\" already has a preStop (exec sh -c sleep 15)"),
        "{out}"
    );
    assert!(out.contains("change: Deployment/orders: drainproxy added as a native sidecar"), "{out}");
    assert!(out.contains("terminationGracePeriodSeconds raised from 30 to 35"), "{out}");
}

#[test]
fn inject_refuses_broken_yaml_with_exit_2() {
    let (_, err, code) = run_inject(&[], "kind: Deployment\nspec: [unclosed\n");
    assert_eq!(code, 2);
    assert!(err.contains("document 1"), "{err}");
}
