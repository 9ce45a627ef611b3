//! The binary's command line as an operator meets it: errors, --version, completions.

use std::process::Command;

fn control() -> Command {
    Command::new(env!("CARGO_BIN_EXE_eastwest-control"))
}

#[test]
fn a_missing_identity_file_is_one_error_line_with_its_cause_once() {
    let out = control()
        .args(["--cluster", "fra", "--network", "network1"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args([
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "--secret-namespace=",
        ])
        .args(["--tls-cert", "/nonexistent/cert-chain.pem"])
        .args(["--tls-key", "/nonexistent/key.pem"])
        .args(["--tls-ca", "/nonexistent/root-cert.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: starting eastwest-control: loading the control server's TLS identity: \
         /nonexistent/cert-chain.pem: No such file or directory (os error 2)\n"
    );
}

#[test]
fn version_and_completions() {
    let out = control().arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(concat!(
            "eastwest-control ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        )),
        "{version}"
    );
    let out = control().args(["completions", "fish"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete -c eastwest-control"));
}
