//! The `eastwest-certs` binary: `mesh`, `workload`, `gateway`, checked with the system's
//! `openssl` (verify + x509 -text) and with rustls handshakes on the written files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_eastwest-certs");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run eastwest-certs")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "eastwest-certs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the system openssl; fails with an install hint when it's missing.
fn openssl(dir: &Path, args: &[&str]) -> Output {
    match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run openssl ({e}); install it: apt-get install openssl"),
    }
}

fn openssl_text(dir: &Path, cert: &str) -> String {
    let out = openssl(dir, &["x509", "-in", cert, "-noout", "-text"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn verify(dir: &Path, extra: &[&str], leaf: &str) -> (bool, String) {
    let mut args = vec!["verify", "-CAfile", "pki/root-cert.pem"];
    args.extend_from_slice(extra);
    args.push(leaf);
    let out = openssl(dir, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains(": OK"), text)
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The fra server leaf that [`mesh_dir`] issues.
const FRA_SERVER: [&str; 7] = [
    "workload",
    "--ca",
    "pki/fra",
    "--spiffe",
    "spiffe://cluster.local/ns/echo/sa/server",
    "--out",
    "fra-server",
];

/// `mesh` + one workload leaf per cluster, in a fresh directory.
fn mesh_dir(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["mesh", "--out", "pki", "--clusters", "fra,ash"];
    args.extend_from_slice(extra);
    ok(dir.path(), &args);
    ok(
        dir.path(),
        &[
            "workload",
            "--ca",
            "pki/ash",
            "--spiffe",
            "spiffe://cluster.local/ns/echo/sa/client",
            "--dns",
            "client.echo.svc",
            "--out",
            "ash-client",
        ],
    );
    ok(dir.path(), &FRA_SERVER);
    dir
}

#[test]
fn mesh_writes_istio_cacerts_layout_with_private_keys_0600() {
    let dir = mesh_dir(&[]);
    let d = dir.path();
    for cluster in ["fra", "ash"] {
        let c = d.join("pki").join(cluster);
        for f in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
            assert_eq!(mode(&c.join(f)), 0o644, "{cluster}/{f}");
        }
        assert_eq!(mode(&c.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&c.join("cacerts-secret.yaml")), 0o600);
        let root = std::fs::read_to_string(d.join("pki/root-cert.pem")).unwrap();
        let ca = std::fs::read_to_string(c.join("ca-cert.pem")).unwrap();
        assert_eq!(
            std::fs::read_to_string(c.join("root-cert.pem")).unwrap(),
            root
        );
        assert_eq!(
            std::fs::read_to_string(c.join("cert-chain.pem")).unwrap(),
            format!("{ca}{root}")
        );
        let secret = std::fs::read_to_string(c.join("cacerts-secret.yaml")).unwrap();
        for needle in [
            "kind: Secret",
            "name: cacerts",
            "namespace: istio-system",
            "  ca-cert.pem: |",
            "  ca-key.pem: |",
            "  root-cert.pem: |",
            "  cert-chain.pem: |",
            "    -----BEGIN PRIVATE KEY-----",
        ] {
            assert!(secret.contains(needle), "{cluster} secret lacks {needle:?}");
        }
    }
    assert_eq!(mode(&d.join("pki/root-key.pem")), 0o600);
    assert_eq!(mode(&d.join("ash-client-key.pem")), 0o600);
}

#[test]
fn existing_files_are_not_overwritten_without_force() {
    let dir = mesh_dir(&[]);
    let d = dir.path();
    let before = std::fs::read(d.join("pki/fra/ca-key.pem")).unwrap();
    let out = run(d, &["mesh", "--out", "pki", "--clusters", "fra,ash"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pki/root-cert.pem") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(d.join("pki/fra/ca-key.pem")).unwrap(), before);

    let out = run(d, &FRA_SERVER);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fra-server-cert-chain.pem"));
    let mut forced = FRA_SERVER.to_vec();
    forced.push("--force");
    ok(d, &forced);
    ok(
        d,
        &["mesh", "--out", "pki", "--clusters", "fra,ash", "--force"],
    );
    assert_ne!(std::fs::read(d.join("pki/fra/ca-key.pem")).unwrap(), before);
    assert_eq!(mode(&d.join("pki/fra/ca-key.pem")), 0o600);
}

/// `workload --ca {ca} --spiffe {spiffe}`, which must fail: its stderr.
fn failed_workload(dir: &Path, ca: &str, spiffe: &str) -> String {
    let out = run(
        dir,
        &["workload", "--ca", ca, "--spiffe", spiffe, "--out", "x"],
    );
    assert!(
        !out.status.success(),
        "workload --ca {ca} --spiffe {spiffe}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn errors_name_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = failed_workload(d, "nope", "spiffe://cluster.local/ns/a/sa/b");
    // One line, `error: <what>: <cause>`, the cause once.
    assert_eq!(
        err,
        "error: loading CA from nope: nope/ca-cert.pem: No such file or directory (os error 2)\n"
    );

    std::fs::create_dir(d.join("bad")).unwrap();
    for f in ["ca-cert.pem", "root-cert.pem"] {
        std::fs::write(d.join("bad").join(f), "not a cert").unwrap();
    }
    std::fs::write(d.join("bad/ca-key.pem"), "not a key").unwrap();
    let err = failed_workload(d, "bad", "spiffe://cluster.local/ns/a/sa/b");
    assert!(err.contains("bad/ca-cert.pem"), "{err}");

    let err = failed_workload(d, "bad", "spiffe://Cluster.local/x");
    assert!(err.contains("trust domain may only contain"), "{err}");
}

#[test]
fn chains_verify_with_openssl_and_carry_istio_extensions() {
    let dir = mesh_dir(&[]);
    let d = dir.path();
    // Leaf files hold (leaf, intermediate); openssl verifies the first cert in the file.
    let (good, text) = verify(
        d,
        &["-untrusted", "pki/ash/ca-cert.pem", "-purpose", "sslclient"],
        "ash-client-cert-chain.pem",
    );
    assert!(good, "{text}");
    let (good, text) = verify(
        d,
        &[
            "-untrusted",
            "pki/fra/cert-chain.pem",
            "-purpose",
            "sslserver",
        ],
        "fra-server-cert-chain.pem",
    );
    assert!(good, "{text}");
    let (good, text) = verify(d, &[], "pki/fra/ca-cert.pem");
    assert!(good, "{text}");
    // Negative control: ash's leaf does not chain through fra's intermediate.
    let (good, text) = verify(
        d,
        &["-untrusted", "pki/fra/ca-cert.pem"],
        "ash-client-cert-chain.pem",
    );
    assert!(!good, "{text}");

    let leaf = openssl_text(d, "ash-client-cert-chain.pem");
    for needle in [
        "Subject: O = cluster.local",
        "X509v3 Basic Constraints: critical\n                CA:FALSE",
        "X509v3 Key Usage: critical\n                Digital Signature, Key Encipherment",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "URI:spiffe://cluster.local/ns/echo/sa/client, DNS:client.echo.svc",
        "ASN1 OID: prime256v1",
    ] {
        assert!(leaf.contains(needle), "leaf lacks {needle:?}:\n{leaf}");
    }
    let int = openssl_text(d, "pki/fra/ca-cert.pem");
    for needle in [
        "Subject: O = cluster.local, CN = Intermediate CA, L = fra",
        "Issuer: O = cluster.local, CN = Root CA",
        "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0",
        "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign",
    ] {
        assert!(
            int.contains(needle),
            "intermediate lacks {needle:?}:\n{int}"
        );
    }
    let root = openssl_text(d, "pki/root-cert.pem");
    assert!(
        root.contains("X509v3 Basic Constraints: critical\n                CA:TRUE\n"),
        "{root}"
    );
    assert!(root.contains("Certificate Sign, CRL Sign"), "{root}");
}

#[test]
fn gateway_defaults_to_eastwest_gateway_identity() {
    let dir = mesh_dir(&[]);
    let d = dir.path();
    std::fs::create_dir(d.join("gw")).unwrap();
    ok(
        d,
        &[
            "gateway",
            "--ca",
            "pki/fra",
            "--dns",
            "eastwest.fra.example",
            "--out",
            "gw",
        ],
    );
    let text = openssl_text(d, "gw/cert-chain.pem");
    assert!(
        text.contains(
            "URI:spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway, DNS:eastwest.fra.example"
        ),
        "{text}"
    );
    let (good, text) = verify(
        d,
        &["-untrusted", "pki/fra/ca-cert.pem"],
        "gw/cert-chain.pem",
    );
    assert!(good, "{text}");
    assert_eq!(mode(&d.join("gw/key.pem")), 0o600);
}

#[test]
fn rsa_mesh_verifies_with_openssl() {
    let dir = mesh_dir(&["--key-type", "rsa2048"]);
    let d = dir.path();
    let int = openssl_text(d, "pki/ash/ca-cert.pem");
    assert!(int.contains("Public-Key: (2048 bit)"), "{int}");
    assert!(int.contains("sha256WithRSAEncryption"), "{int}");
    let (good, text) = verify(
        d,
        &["-untrusted", "pki/ash/ca-cert.pem"],
        "ash-client-cert-chain.pem",
    );
    assert!(good, "{text}");
}

#[tokio::test]
async fn files_written_by_cli_complete_mtls_between_clusters() {
    use eastwest_certs::{Identity, PeerPolicy};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = mesh_dir(&[]);
    let d = dir.path();
    let load = |p: &str| {
        let f = |s: &str| -> PathBuf { d.join(format!("{p}-{s}")) };
        Identity::load(&f("cert-chain.pem"), &f("key.pem"), &f("root-cert.pem")).unwrap()
    };
    let server = load("fra-server");
    let client = load("ash-client");
    let td = || PeerPolicy::TrustDomain("cluster.local".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(td()).unwrap());
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await.unwrap();
        tls.write_all(&b).await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client.client_config(td()).unwrap())
        .connect("echo.svc".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    tls.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hello");
    tokio::time::timeout(std::time::Duration::from_secs(20), srv)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn cluster_adds_an_intermediate_without_touching_the_root() {
    let dir = mesh_dir(&["--trust-domain", "example.org"]);
    let d = dir.path();
    // What `cluster` must leave alone: the root and another cluster's key.
    let kept = || -> Vec<Vec<u8>> {
        [
            "pki/root-cert.pem",
            "pki/root-key.pem",
            "pki/fra/ca-key.pem",
        ]
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect()
    };
    let before = kept();
    let out = ok(d, &["cluster", "--root", "pki", "--name", "par"]);
    assert!(out.contains("pki/par/ca-cert.pem"), "{out}");
    assert_eq!(kept(), before, "the root or another cluster changed");
    assert_eq!(mode(&d.join("pki/par/ca-key.pem")), 0o600);
    assert_eq!(
        std::fs::read(d.join("pki/par/root-cert.pem")).unwrap(),
        before[0]
    );
    // The new cluster's leaves chain to the old root and carry the mesh's trust domain.
    ok(
        d,
        &[
            "workload",
            "--ca",
            "pki/par",
            "--spiffe-id",
            "spiffe://example.org/ns/echo/sa/par",
            "--out",
            "par-leaf",
        ],
    );
    let (verified, text) = verify(
        d,
        &["-untrusted", "pki/par/ca-cert.pem"],
        "par-leaf-cert-chain.pem",
    );
    assert!(verified, "{text}");
    // A second run refuses to replace the new cluster's files without --force.
    let out = run(d, &["cluster", "--root", "pki", "--name", "par"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    ok(d, &["cluster", "--root", "pki", "--name", "par", "--force"]);
    assert_eq!(
        std::fs::read(d.join("pki/root-key.pem")).unwrap(),
        before[1]
    );
}
