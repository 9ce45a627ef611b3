//! Interop with OpenSSL over real 127.0.0.1 sockets: our mTLS server against
//! `openssl s_client`, our mTLS client against `openssl s_server`, on TLS 1.2 and 1.3.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(20);

fn td() -> PeerPolicy {
    PeerPolicy::TrustDomain("cluster.local".into())
}

/// `spiffe://cluster.local/ns/echo/sa/{name}`, issued by `mesh`'s `cluster` intermediate.
fn echo_workload(mesh: &Mesh, cluster: &str, name: &str) -> Identity {
    mesh.workload(cluster, &SpiffeId::workload("cluster.local", "echo", name))
        .unwrap()
}

fn write_identity(dir: &Path, name: &str, id: &Identity) {
    std::fs::write(dir.join(format!("{name}-chain.pem")), id.chain_pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), id.key_pem()).unwrap();
    std::fs::write(dir.join("root.pem"), id.root_pem()).unwrap();
}

fn openssl(args: &[&str], dir: &Path) -> Child {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); install it: apt-get install openssl"))
}

/// Kills the child (ours, by handle) when the test ends, whatever happened.
struct Reaper(Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type ServerSaw = (Option<SpiffeId>, Option<rustls::ProtocolVersion>, [u8; 4]);

/// Our mTLS server (fra leaf) accepting one `openssl s_client` (ash leaf). Returns what
/// the server saw (or its error) and the client process.
async fn our_server_with_openssl_client(
    version_flag: &str,
    send_intermediate: bool,
) -> (Result<ServerSaw, String>, Reaper) {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::generate("cluster.local", &["fra", "ash"]).unwrap();
    let server = echo_workload(&mesh, "fra", "server");
    let client = echo_workload(&mesh, "ash", "client");
    write_identity(dir.path(), "client", &client);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(td()).unwrap());
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let version = tls.get_ref().1.protocol_version();
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong\n").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((eastwest_certs::spiffe_id_of(&peer).unwrap(), version, b))
    });

    let mut args = vec![
        "s_client",
        "-connect",
        &addr,
        version_flag,
        "-cert",
        "client-chain.pem",
        "-key",
        "client-key.pem",
        "-CAfile",
        "root.pem",
        "-verify_return_error",
        "-servername",
        "outbound_.8000_._.svc.echo.svc.cluster.local",
        "-ign_eof",
    ];
    if send_intermediate {
        // -cert sends only the leaf; the intermediate must travel too.
        args.extend(["-cert_chain", "client-chain.pem"]);
    }
    let mut child = Reaper(openssl(&args, dir.path()));
    child.0.stdin.take().unwrap().write_all(b"ping").unwrap();
    let saw = tokio::time::timeout(LIMIT, srv)
        .await
        .expect("server timed out")
        .unwrap();
    (saw, child)
}

async fn openssl_client_passes(version_flag: &str, expect: rustls::ProtocolVersion) {
    let (saw, child) = our_server_with_openssl_client(version_flag, true).await;
    let (id, version, got) = saw.unwrap();
    assert_eq!(
        id.unwrap().to_string(),
        "spiffe://cluster.local/ns/echo/sa/client"
    );
    assert_eq!(version, Some(expect));
    assert_eq!(&got, b"ping");
    let out = tokio::task::spawn_blocking(move || {
        let mut c = child;
        let mut s = String::new();
        std::io::Read::read_to_string(c.0.stdout.as_mut().unwrap(), &mut s).unwrap();
        s
    });
    let out = tokio::time::timeout(LIMIT, out).await.unwrap().unwrap();
    assert!(out.contains("pong"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
}

#[tokio::test]
async fn openssl_client_tls12_passes_our_spiffe_server() {
    openssl_client_passes("-tls1_2", rustls::ProtocolVersion::TLSv1_2).await;
}

#[tokio::test]
async fn openssl_client_tls13_passes_our_spiffe_server() {
    openssl_client_passes("-tls1_3", rustls::ProtocolVersion::TLSv1_3).await;
}

#[tokio::test]
async fn openssl_client_without_its_intermediate_is_refused() {
    let (saw, _child) = our_server_with_openssl_client("-tls1_3", false).await;
    let err = saw.unwrap_err();
    assert!(err.contains("unknown issuer"), "{err}");
}

/// Starts `openssl s_server -rev` (reverses each line back) and returns its address.
fn openssl_server(dir: &Path, extra: &[&str]) -> (Reaper, String) {
    let mut args = vec![
        "s_server",
        "-accept",
        "127.0.0.1:0",
        "-cert",
        "server-chain.pem",
        "-cert_chain",
        "server-chain.pem",
        "-key",
        "server-key.pem",
        "-CAfile",
        "root.pem",
        "-Verify",
        "2",
        "-verify_return_error",
        "-naccept",
        "1",
        "-rev",
    ];
    args.extend_from_slice(extra);
    let mut child = Reaper(openssl(&args, dir));
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait for the listening line, bounded in count and time.
    for _ in 0..50 {
        let line = rx
            .recv_timeout(LIMIT)
            .expect("openssl s_server did not start");
        if let Some(addr) = line.strip_prefix("ACCEPT ") {
            return (child, addr.trim().to_string());
        }
    }
    panic!("openssl s_server printed no ACCEPT line");
}

#[tokio::test]
async fn our_client_completes_tls12_mtls_with_openssl_server() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::generate("cluster.local", &["fra", "ash"]).unwrap();
    let server = echo_workload(&mesh, "fra", "server");
    let client = echo_workload(&mesh, "ash", "client");
    write_identity(dir.path(), "server", &server);
    let (_server, addr) = openssl_server(dir.path(), &["-tls1_2"]);
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let cfg = client
        .client_config(PeerPolicy::Exact(vec![server.spiffe_id().clone()]))
        .unwrap();
    let mut tls = tokio::time::timeout(
        LIMIT,
        tokio_rustls::TlsConnector::from(cfg).connect("not-a-san.example".try_into().unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    tls.write_all(b"ping\n").await.unwrap();
    let mut b = [0u8; 5];
    tokio::time::timeout(LIMIT, tls.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"gnip\n");
}

#[tokio::test]
async fn our_client_refuses_openssl_server_from_another_root() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::generate("cluster.local", &["ash"]).unwrap();
    let other = Mesh::generate("cluster.local", &["fra"]).unwrap();
    let server = echo_workload(&other, "fra", "server");
    let client = echo_workload(&mesh, "ash", "client");
    write_identity(dir.path(), "server", &server);
    let (_server, addr) = openssl_server(dir.path(), &[]);
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let err = tokio::time::timeout(
        LIMIT,
        tokio_rustls::TlsConnector::from(client.client_config(td()).unwrap())
            .connect("x.example".try_into().unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown issuer"), "{err}");
}
