//! `prism validate` as a user runs it: every manifest under tests/fixtures/invalid-manifests is
//! rejected (exit code 1) with the reason its first line states, and every example passes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn validate(file: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prism"))
        .arg("validate")
        .arg("-f")
        .arg(file)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("running prism validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn invalid_manifests_are_rejected_for_their_stated_reason() {
    let files = yaml_files(&repo().join("tests/fixtures/invalid-manifests"));
    assert!(files.len() >= 15, "expected at least 15 invalid manifests, found {}", files.len());
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks a `# expect:` first line", f.display()));
        let (code, out) = validate(f);
        if code != 1 || !out.contains(expect) {
            failures.push(format!("{}: exit {code}, wanted {expect:?} in:\n{out}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn examples_are_valid() {
    for f in yaml_files(&repo().join("examples")) {
        let (code, out) = validate(&f);
        assert_eq!(code, 0, "{} should be valid:\n{out}", f.display());
        assert!(out.starts_with("ok:"), "{out}");
    }
}
