//! `eastwest-certs inspect` on good, expired, wrong-chain and garbage input.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use eastwest_certs::{LeafOptions, Mesh, SpiffeId};

const BIN: &str = env!("CARGO_BIN_EXE_eastwest-certs");

fn inspect(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("inspect")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// root.pem, fra-int.pem, good.pem (ash leaf chain), expired.pem, foreign.pem (a leaf
/// chain from another mesh).
fn fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mesh = Mesh::generate("cluster.local", &["fra", "ash"]).unwrap();
    let id = SpiffeId::workload("cluster.local", "echo", "client");
    std::fs::write(d.join("root.pem"), mesh.root.cert_pem()).unwrap();
    std::fs::write(d.join("fra-int.pem"), mesh.intermediates["fra"].cert_pem()).unwrap();
    let good = mesh.workload("ash", &id).unwrap();
    std::fs::write(d.join("good.pem"), good.chain_pem()).unwrap();
    let expired = mesh
        .workload_with(
            "ash",
            &id,
            &LeafOptions {
                not_before: Some(time::OffsetDateTime::now_utc() - Duration::from_secs(7200)),
                validity: Duration::from_secs(3600),
                ..LeafOptions::default()
            },
        )
        .unwrap();
    std::fs::write(d.join("expired.pem"), expired.chain_pem()).unwrap();
    let other = Mesh::generate("cluster.local", &["ash"]).unwrap();
    let foreign = other.workload("ash", &id).unwrap();
    std::fs::write(d.join("foreign.pem"), foreign.chain_pem()).unwrap();
    dir
}

#[test]
fn good_chain_shows_details_and_verifies() {
    let dir = fixtures();
    let (code, out, err) = inspect(
        dir.path(),
        &["good.pem", "fra-int.pem", "--root", "root.pem"],
    );
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        "good.pem\n",
        "[0] subject:   O=cluster.local\n",
        "issuer:    O=cluster.local, CN=Intermediate CA, L=ash",
        "SPIFFE ID: spiffe://cluster.local/ns/echo/sa/client",
        "SANs:      URI:spiffe://cluster.local/ns/echo/sa/client",
        "key:       ECDSA P-256",
        "basic:     CA:FALSE",
        "key usage: Digital Signature, Key Encipherment",
        "ext usage: serverAuth, clientAuth",
        "[1] subject:   O=cluster.local, CN=Intermediate CA, L=ash",
        "basic:     CA:TRUE, pathlen:0",
        "key usage: Key Cert Sign, CRL Sign",
        "chain: OK (verified to root root.pem)",
        "fra-int.pem\n",
        "L=fra",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(
        out.contains("h ") && out.contains("m left)"),
        "time left: {out}"
    );
}

#[test]
fn json_output_is_machine_readable() {
    let dir = fixtures();
    let (code, out, _) = inspect(dir.path(), &["--json", "good.pem", "--root", "root.pem"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let leaf = &v[0]["certs"][0];
    assert_eq!(v[0]["file"], "good.pem");
    assert_eq!(v[0]["chain"]["ok"], true);
    assert_eq!(
        leaf["spiffe_ids"][0],
        "spiffe://cluster.local/ns/echo/sa/client"
    );
    assert_eq!(leaf["is_ca"], false);
    assert_eq!(leaf["expired"], false);
    assert!(leaf["seconds_left"].as_i64().unwrap() > 23 * 3600);
    assert_eq!(v[0]["certs"][1]["path_len"], 0);
    assert_eq!(leaf["key_type"], "ECDSA P-256");
}

#[test]
fn expired_certificate_fails_even_without_root() {
    let dir = fixtures();
    let (code, out, _) = inspect(dir.path(), &["expired.pem"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(EXPIRED 1h 0m ago)"), "{out}");
    let (code, out, _) = inspect(dir.path(), &["expired.pem", "--root", "root.pem"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("chain: BROKEN: certificate #0 (O=cluster.local) expired at"),
        "{out}"
    );
    let (code, out, _) = inspect(dir.path(), &["--json", "expired.pem"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["certs"][0]["expired"], true);
}

#[test]
fn chain_to_another_root_is_broken() {
    let dir = fixtures();
    let (code, out, _) = inspect(dir.path(), &["foreign.pem", "--root", "root.pem"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("chain: BROKEN:"), "{out}");
    assert!(out.contains("unknown issuer"), "{out}");
    // A leaf chain that skips its intermediate names the missing issuer.
    let good = std::fs::read_to_string(dir.path().join("good.pem")).unwrap();
    let leaf_only = &good[..good.find("-----END CERTIFICATE-----").unwrap() + 26];
    std::fs::write(dir.path().join("leaf-only.pem"), leaf_only).unwrap();
    let (code, out, _) = inspect(dir.path(), &["leaf-only.pem", "--root", "root.pem"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("unknown issuer: certificate #0 (O=cluster.local) is issued by O=cluster.local, CN=Intermediate CA, L=ash"),
        "{out}"
    );
}

#[test]
fn garbage_input_is_reported_per_file() {
    let dir = fixtures();
    let d = dir.path();
    std::fs::write(d.join("garbage.txt"), "hello, not a certificate\n").unwrap();
    std::fs::write(
        d.join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, out, _) = inspect(d, &["garbage.txt", "bad.pem", "missing.pem", "good.pem"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("garbage.txt\n  ERROR: garbage.txt: neither PEM"),
        "{out}"
    );
    assert!(
        out.contains("bad.pem\n  ERROR: bad.pem: certificate #0 is not valid X.509"),
        "{out}"
    );
    assert!(
        out.contains("missing.pem\n  ERROR: missing.pem: No such file"),
        "{out}"
    );
    // The good file is still shown.
    assert!(
        out.contains("SPIFFE ID: spiffe://cluster.local/ns/echo/sa/client"),
        "{out}"
    );

    let (code, _, err) = inspect(d, &["good.pem", "--root", "garbage.txt"]);
    assert_eq!(code, 1);
    assert!(err.contains("garbage.txt"), "{err}");
}

#[test]
fn der_input_is_accepted() {
    let dir = fixtures();
    let mesh = Mesh::generate("cluster.local", &["fra"]).unwrap();
    std::fs::write(dir.path().join("root.der"), mesh.root_der()).unwrap();
    let (code, out, _) = inspect(dir.path(), &["root.der"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("CN=Root CA") && out.contains("CA:TRUE (self-signed)"),
        "{out}"
    );
}
