//! The binary as a user runs it.

use std::process::Command;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_eastwest-proxy"))
}

#[test]
fn check_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: tls\n    address: 0.0.0.0:15443\n",
    )
    .unwrap();
    let out = proxy()
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 listeners, 0 services)"));
}

#[test]
fn check_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: tls\n    address: 0.0.0.0:15443\n    mode: passthru\n",
    )
    .unwrap();
    let out = proxy()
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:", path.display()))
            && err.contains("listeners[0].mode")
            && err.contains("passthru"),
        "{err}"
    );
}

#[test]
fn missing_file_is_named() {
    let out = proxy()
        .args(["--config", "/nonexistent/gw.yaml", "--check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gw.yaml: cannot read"));
}
