//! The gateway's mesh identity from files (checked, rotated), seen by real rustls clients
//! handshaking with the server config it publishes; istiod's CA is in `identity_istiod.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use eastwest_certs::files::{identity_files, write_all};
use eastwest_certs::{Identity, Mesh, SpiffeId};
use eastwest_proxy::identity::{start_with_status, IdentityHandle};
use eastwest_routes::{IdentityConfig, IdentityFiles};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::support::{AnyServer, DEADLINE, TD};

pub(crate) const GATEWAY_ID: &str =
    "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";

pub(crate) fn gateway_id() -> SpiffeId {
    GATEWAY_ID.parse().unwrap()
}

/// The mesh, a source ztunnel's identity and the gateway's files in a temp dir.
pub(crate) struct Setup {
    pub(crate) mesh: Mesh,
    pub(crate) ztunnel: Identity,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) fn setup() -> Setup {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let ztunnel = mesh
        .workload("ash", &SpiffeId::workload(TD, "istio-system", "ztunnel"))
        .unwrap();
    Setup {
        mesh,
        ztunnel,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn gateway_cert(&self) -> Identity {
        self.mesh.workload("fra", &gateway_id()).unwrap()
    }

    /// Writes `id` as `DIR/gw/{cert-chain,key,root-cert}.pem`, as `eastwest-certs gateway` does.
    fn write(&self, id: &Identity) {
        let dir = self.dir.path().join("gw/");
        write_all(&identity_files(id, &dir), true).unwrap();
    }

    /// Writes a gateway certificate, then starts the identity from the files and a listener
    /// serving it: (that certificate, the identity's handle, the listener's address).
    async fn serving(&self) -> (Identity, IdentityHandle, SocketAddr) {
        let cert = self.gateway_cert();
        self.write(&cert);
        let handle = start_with_status(&self.files_config(), CancellationToken::new())
            .await
            .unwrap();
        let addr = echo_listener(&handle).await;
        (cert, handle, addr)
    }

    fn files_config(&self) -> IdentityConfig {
        let dir = self.dir.path().join("gw");
        IdentityConfig {
            trust_domain: TD.into(),
            extra_trust_domains: Vec::new(),
            files: Some(IdentityFiles {
                cert_chain: dir.join("cert-chain.pem"),
                key: dir.join("key.pem"),
                roots: dir.join("root-cert.pem"),
            }),
            istiod: None,
        }
    }
}

/// A stand-in for the hbone listener: reads the server config at each accept, then echoes.
pub(crate) async fn echo_listener(handle: &IdentityHandle) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let configs = handle.server_config.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(configs.borrow().clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

pub(crate) type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A ztunnel-like client: TLS 1.3, ALPN h2, no SNI, presenting `client`'s certificate. It
/// takes any server certificate in the handshake (so a client from another CA still gets to
/// present its own), then checks the gateway's chain to the mesh root and its SPIFFE ID.
/// Then one echo round trip: in TLS 1.3 the server refuses a client certificate only after
/// the client's side of the handshake is done.
pub(crate) async fn connect(addr: SocketAddr, client: &Identity) -> std::io::Result<Tls> {
    let any_server = AnyServer::default();
    let mut cfg = rustls::ClientConfig::builder_with_provider(any_server.0.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(any_server))
        .with_client_auth_cert(client.chain_der(), client.key_der())
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.enable_sni = false;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("ignored.invalid").unwrap();
    let mut tls = tokio::time::timeout(
        DEADLINE,
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))??;
    echo(&mut tls, b"hello").await?;
    Ok(tls)
}

/// Checks what the gateway served: its chain to `root` and its SPIFFE ID.
pub(crate) fn assert_gateway_cert(tls: &Tls, root: CertificateDer<'static>) {
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    eastwest_certs::check_chain(&chain, &[root]).unwrap();
    let id = eastwest_certs::spiffe_id_of(&chain[0]).unwrap().unwrap();
    assert_eq!(id.to_string(), GATEWAY_ID);
}

pub(crate) async fn echo(tls: &mut Tls, msg: &[u8]) -> std::io::Result<()> {
    tls.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    assert_eq!(buf, msg);
    Ok(())
}

pub(crate) fn served_leaf(tls: &Tls) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Polls `check` on the status until it holds (bounded).
pub(crate) async fn wait_status(
    handle: &IdentityHandle,
    what: &str,
    check: impl Fn(&eastwest_proxy::identity::IdentityStatus) -> bool,
) {
    let mut status = handle.status.clone();
    tokio::time::timeout(DEADLINE, status.wait_for(|s| check(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: status stayed {:?}", handle.status.borrow()))
        .unwrap();
}

#[tokio::test]
async fn files_serve_the_gateway_cert_tls13_h2_and_rotate_without_touching_open_connections() {
    let s = setup();
    let (first, handle, addr) = s.serving().await;
    assert_eq!(handle.status.borrow().spiffe_id, GATEWAY_ID);
    let mut before = connect(addr, &s.ztunnel).await.unwrap();
    assert_gateway_cert(&before, s.mesh.root_der());
    assert_eq!(served_leaf(&before), first.chain_der()[0]);
    let session = before.get_ref().1;
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));

    let second = s.gateway_cert();
    s.write(&second);
    wait_status(&handle, "rotation", |st| st.renewals == 1).await;
    let after = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&after), second.chain_der()[0]);
    // The connection opened before still flows, on its old certificate.
    echo(&mut before, b"still here").await.unwrap();
    assert_eq!(served_leaf(&before), first.chain_der()[0]);
}

#[tokio::test]
async fn files_a_bad_new_cert_keeps_the_old_one_and_says_why() {
    let s = setup();
    let (first, handle, addr) = s.serving().await;
    let cfg = s.files_config();
    // A certificate from another mesh: does not chain to the roots in force.
    let foreign = Mesh::generate(TD, &["fra"])
        .unwrap()
        .workload("fra", &gateway_id())
        .unwrap();
    let files = cfg.files.as_ref().unwrap();
    let chain_path = files.cert_chain.clone();
    // Two writes: a reload may catch the first alone (key and cert mismatched), and must
    // settle on the pair before reporting.
    std::fs::write(&chain_path, foreign.chain_pem()).unwrap();
    std::fs::write(&files.key, foreign.key_pem()).unwrap();
    wait_status(&handle, "refused reload", |st| st.last_error.is_some()).await;
    let error = handle.status.borrow().last_error.clone().unwrap();
    assert!(error.contains(&chain_path.display().to_string()), "{error}");
    assert!(error.contains("does not chain to the roots"), "{error}");
    assert_eq!(handle.status.borrow().renewals, 0);
    let tls = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&tls), first.chain_der()[0]);
}

#[tokio::test]
async fn files_removed_keep_the_certificate_in_force_until_they_are_back() {
    let s = setup();
    let (first, handle, addr) = s.serving().await;
    let cfg = s.files_config();
    std::fs::remove_file(&cfg.files.as_ref().unwrap().cert_chain).unwrap();
    let tls = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&tls), first.chain_der()[0]);
    let second = s.gateway_cert();
    s.write(&second);
    wait_status(&handle, "files back", |st| st.renewals == 1).await;
    let tls = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&tls), second.chain_der()[0]);
    assert!(handle.status.borrow().last_error.is_none());
}

#[tokio::test]
async fn files_are_checked_at_start_with_errors_naming_the_file() {
    let s = setup();
    let gw = s.gateway_cert();
    s.write(&gw);
    let cfg = s.files_config();
    let files = cfg.files.clone().unwrap();
    let start_err = |cfg: IdentityConfig| async move {
        format!(
            "{:#}",
            start_with_status(&cfg, CancellationToken::new())
                .await
                .err()
                .expect("start should fail")
        )
    };

    // A key that is not the certificate's.
    std::fs::write(&files.key, s.gateway_cert().key_pem()).unwrap();
    let err = start_err(cfg.clone()).await;
    assert!(
        err.contains(&files.key.display().to_string()) && err.contains("does not match"),
        "{err}"
    );
    std::fs::write(&files.key, gw.key_pem()).unwrap();

    // Roots of another mesh.
    let other = Mesh::generate(TD, &["fra"]).unwrap();
    std::fs::write(&files.roots, other.root_pem()).unwrap();
    let err = start_err(cfg.clone()).await;
    assert!(
        err.contains(&files.roots.display().to_string()) && err.contains("does not chain"),
        "{err}"
    );
    std::fs::write(&files.roots, gw.root_pem()).unwrap();

    // A certificate without a SPIFFE ID.
    let plain = rcgen::generate_simple_self_signed(vec!["gw.example".to_string()]).unwrap();
    std::fs::write(&files.cert_chain, plain.cert.pem()).unwrap();
    std::fs::write(&files.key, plain.signing_key.serialize_pem()).unwrap();
    let err = start_err(cfg.clone()).await;
    assert!(
        err.contains(&files.cert_chain.display().to_string()) && err.contains("no SPIFFE ID"),
        "{err}"
    );

    // A missing file.
    let mut missing = cfg.clone();
    missing.files.as_mut().unwrap().key = s.dir.path().join("nope.pem");
    let err = start_err(missing).await;
    assert!(err.contains("nope.pem"), "{err}");
}

#[tokio::test]
async fn clients_from_a_foreign_ca_or_another_trust_domain_are_refused() {
    let s = setup();
    let (_, _handle, addr) = s.serving().await;
    let foreign = Mesh::generate(TD, &["fra"])
        .unwrap()
        .workload("fra", &SpiffeId::workload(TD, "istio-system", "ztunnel"))
        .unwrap();
    let err = connect(addr, &foreign)
        .await
        .expect_err("foreign CA accepted");
    assert!(err.to_string().contains("alert"), "{err}");
    let other_td = s
        .mesh
        .workload(
            "ash",
            &SpiffeId::workload("other.local", "istio-system", "ztunnel"),
        )
        .unwrap();
    let err = connect(addr, &other_td)
        .await
        .expect_err("other trust domain accepted");
    assert!(err.to_string().contains("alert"), "{err}");
    connect(addr, &s.ztunnel).await.unwrap();

    // Listed in extra_trust_domains: accepted.
    let mut cfg = s.files_config();
    cfg.extra_trust_domains = vec!["other.local".into()];
    let handle = start_with_status(&cfg, CancellationToken::new())
        .await
        .unwrap();
    let addr = echo_listener(&handle).await;
    connect(addr, &other_td).await.unwrap();
}

#[tokio::test]
async fn a_proxy_with_identity_shows_it_in_config_dump_and_metrics() {
    let s = setup();
    s.write(&s.gateway_cert());
    let mut cfg = crate::support::passthrough_config("identity-wired", vec![]);
    cfg.identity = Some(s.files_config());
    let proxy = eastwest_proxy::Proxy::start(cfg).await.unwrap();
    let (status, body) = crate::support::admin_get(&proxy, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["identity"]["spiffe_id"], GATEWAY_ID);
    assert_eq!(dump["identity"]["source"], "files");
    assert!(dump["identity"]["not_after"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let (_, metrics) = crate::support::admin_get(&proxy, "/metrics").await;
    let expiry = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("eastwest_identity_cert_expiry_timestamp_seconds{source=\"files\"} ")
        })
        .unwrap_or_else(|| panic!("no expiry gauge in:\n{metrics}"));
    let expiry: f64 = expiry.trim().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The default leaf lives a day.
    assert!(
        expiry > now && expiry < now + 2.0 * 86400.0,
        "{expiry} vs {now}"
    );
    assert!(metrics.contains("eastwest_identity_cert_renewals_total{source=\"files\"}"));
    crate::support::promtool_check(&metrics);

    // Identity that cannot be loaded: the proxy does not start, and says which file.
    let mut cfg = crate::support::passthrough_config("identity-bad", vec![]);
    let mut id = s.files_config();
    id.files.as_mut().unwrap().roots = s.dir.path().join("missing-root.pem");
    cfg.identity = Some(id);
    let Err(err) = eastwest_proxy::Proxy::start(cfg).await else {
        panic!("a proxy with an unloadable identity started");
    };
    assert!(format!("{err:#}").contains("missing-root.pem"), "{err:#}");
}
