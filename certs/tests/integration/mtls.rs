//! Real mTLS handshakes over 127.0.0.1 sockets between identities of a generated mesh.

use std::sync::Arc;
use std::time::Duration;

use eastwest_certs::{Identity, LeafOptions, Mesh, PeerPolicy, SpiffeId};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "cluster.local";
/// Istio sidecars dial with an SNI that is no SAN; verification must ignore it.
const ISTIO_SNI: &str = "outbound_.8000_._.svc.echo.svc.cluster.local";
const LIMIT: Duration = Duration::from_secs(20);

fn td() -> PeerPolicy {
    PeerPolicy::TrustDomain(TD.into())
}

struct Outcome {
    /// SPIFFE ID of the client as seen by the server, or the server's error.
    server: Result<SpiffeId, String>,
    /// SPIFFE ID of the server as seen by the client (after a round trip), or the error.
    client: Result<SpiffeId, String>,
    alpn: Option<Vec<u8>>,
}

async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(eastwest_certs::spiffe_id_of(&peer).unwrap().unwrap())
    });
    let cli = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(ISTIO_SNI).unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let peer = conn.peer_certificates().unwrap()[0].clone();
        let alpn = conn.alpn_protocol().map(|p| p.to_vec());
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        // In TLS 1.3 the server judges the client certificate after the client's
        // handshake finished; a refusal shows up here as an alert.
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>((eastwest_certs::spiffe_id_of(&peer).unwrap().unwrap(), alpn))
    };
    let client = tokio::time::timeout(LIMIT, cli)
        .await
        .expect("client timed out");
    let server = tokio::time::timeout(LIMIT, srv)
        .await
        .expect("server timed out")
        .unwrap();
    let (client, alpn) = match client {
        Ok((id, alpn)) => (Ok(id), alpn),
        Err(e) => (Err(e), None),
    };
    Outcome {
        server,
        client,
        alpn,
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(TD, ns, sa)
}

#[tokio::test]
async fn fra_and_ash_leaves_complete_mtls_through_shared_root() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server = mesh.workload("fra", &id("echo", "server")).unwrap();
    let client = mesh.workload("ash", &id("load", "client")).unwrap();
    let out = handshake(
        server.server_config(td()).unwrap(),
        client
            .client_config(PeerPolicy::Exact(vec![id("echo", "server")]))
            .unwrap(),
    )
    .await;
    assert_eq!(out.server.unwrap(), id("load", "client"));
    assert_eq!(out.client.unwrap(), id("echo", "server"));
}

#[tokio::test]
async fn alpn_set_by_caller_is_negotiated() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server = mesh.workload("fra", &id("a", "s")).unwrap();
    let client = mesh.workload("ash", &id("b", "c")).unwrap();
    let s = server
        .server_config_with_alpn(td(), vec![b"h2".to_vec(), b"istio".to_vec()])
        .unwrap();
    // Callers may also clone the config and set ALPN themselves.
    let mut c = (*client.client_config(td()).unwrap()).clone();
    c.alpn_protocols = vec![b"istio".to_vec()];
    let out = handshake(s, Arc::new(c)).await;
    assert!(out.server.is_ok() && out.client.is_ok());
    assert_eq!(out.alpn.as_deref(), Some(&b"istio"[..]));
}

#[tokio::test]
async fn client_from_another_root_is_refused_as_unknown_issuer() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let stranger_mesh = Mesh::generate(TD, &["ash"]).unwrap();
    let server = mesh.workload("fra", &id("a", "s")).unwrap();
    let stranger = stranger_mesh.workload("ash", &id("b", "c")).unwrap();
    // The stranger trusts our root, so only the server's check can refuse it.
    let client = with_root(&stranger, &mesh);
    let out = handshake(
        server.server_config(td()).unwrap(),
        client.client_config(td()).unwrap(),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("unknown issuer"), "{err}");
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_from_another_root_is_refused_as_unknown_issuer() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let stranger_mesh = Mesh::generate(TD, &["fra"]).unwrap();
    let stranger = stranger_mesh.workload("fra", &id("a", "s")).unwrap();
    let client = mesh.workload("ash", &id("b", "c")).unwrap();
    let out = handshake(
        with_root(&stranger, &mesh).server_config(td()).unwrap(),
        client.client_config(td()).unwrap(),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.contains("unknown issuer"), "{err}");
}

#[tokio::test]
async fn wrong_trust_domain_is_refused_on_both_sides() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let evil = SpiffeId::workload("evil.local", "ns", "sa");
    let good = mesh.workload("fra", &id("a", "s")).unwrap();
    let other_td = mesh.workload("ash", &evil).unwrap();

    let out = handshake(
        good.server_config(td()).unwrap(),
        other_td
            .client_config(PeerPolicy::Exact(vec![id("a", "s")]))
            .unwrap(),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("wrong trust domain"), "{err}");
    assert!(err.contains("spiffe://evil.local/ns/ns/sa/sa"), "{err}");

    let out = handshake(
        other_td
            .server_config(PeerPolicy::Exact(vec![id("a", "s")]))
            .unwrap(),
        good.client_config(td()).unwrap(),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.contains("wrong trust domain"), "{err}");
}

#[tokio::test]
async fn exact_policy_refuses_other_ids_of_the_same_trust_domain() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server = mesh.workload("fra", &id("echo", "server")).unwrap();
    let client = mesh.workload("ash", &id("load", "intruder")).unwrap();
    let out = handshake(
        server
            .server_config(PeerPolicy::Exact(vec![id("load", "client")]))
            .unwrap(),
        client.client_config(td()).unwrap(),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(
        err.contains("SPIFFE ID spiffe://cluster.local/ns/load/sa/intruder not allowed by policy"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_leaf_is_refused_as_expired() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server = mesh.workload("fra", &id("a", "s")).unwrap();
    let expired = mesh
        .workload_with(
            "ash",
            &id("b", "c"),
            &LeafOptions {
                not_before: Some(time::OffsetDateTime::now_utc() - Duration::from_secs(7200)),
                validity: Duration::from_secs(3600),
                ..LeafOptions::default()
            },
        )
        .unwrap();
    let out = handshake(
        server.server_config(td()).unwrap(),
        expired.client_config(td()).unwrap(),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("expired"), "{err}");

    let out = handshake(
        expired.server_config(td()).unwrap(),
        server.client_config(td()).unwrap(),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test]
async fn leaf_without_spiffe_id_is_refused() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    // A leaf with only a DNS SAN, signed by a real mesh intermediate.
    let ca = &mesh.intermediates["ash"];
    let ca_key = rcgen::KeyPair::from_pem(ca.key_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca.cert_der(), &ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["plain.example".to_string()]).unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, format!("{}{}", cert.pem(), ca.cert_pem())).unwrap();
    let key_path = dir.path().join("key.pem");
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, mesh.root.cert_pem()).unwrap();
    // Identity::load insists on a SPIFFE ID, so build the client config by hand.
    let err = Identity::load(&chain, &key_path, &root)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chain.pem") && err.contains("no SPIFFE ID"),
        "{err}"
    );

    // A plain (non-mTLS) server presenting it: our client refuses it.
    let plain = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone(), ca.cert_der()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let client = mesh.workload("fra", &id("a", "c")).unwrap();
    let out = handshake(Arc::new(plain), client.client_config(td()).unwrap()).await;
    let err = out.client.unwrap_err();
    assert!(err.contains("no SPIFFE ID in certificate"), "{err}");
}

#[tokio::test]
async fn identity_written_to_files_loads_and_handshakes() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let orig = mesh.workload("fra", &id("a", "s")).unwrap();
    let loaded = write_and_load(&orig, &orig.root_pem());
    assert_eq!(loaded.spiffe_id(), orig.spiffe_id());
    assert_eq!(loaded.chain_der(), orig.chain_der());
    let client = mesh.workload("ash", &id("b", "c")).unwrap();
    let out = handshake(
        loaded.server_config(td()).unwrap(),
        client.client_config(td()).unwrap(),
    )
    .await;
    assert_eq!(out.client.unwrap(), id("a", "s"));
}

/// `ident` with `mesh`'s root as its trust anchor (to isolate one side's check).
fn with_root(ident: &Identity, mesh: &Mesh) -> Identity {
    write_and_load(ident, mesh.root_pem())
}

/// `ident`'s chain and key, with `root_pem` as the trust anchor, written to files in
/// Istio's names and loaded back with [`Identity::load`].
fn write_and_load(ident: &Identity, root_pem: &str) -> Identity {
    let dir = tempfile::tempdir().unwrap();
    let (c, k, r) = (
        dir.path().join("cert-chain.pem"),
        dir.path().join("key.pem"),
        dir.path().join("root-cert.pem"),
    );
    std::fs::write(&c, ident.chain_pem()).unwrap();
    std::fs::write(&k, ident.key_pem()).unwrap();
    std::fs::write(&r, root_pem).unwrap();
    Identity::load(&c, &k, &r).unwrap()
}

#[tokio::test]
async fn several_trust_domains_and_roots_tls13_only_from_parts() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let other_mesh = Mesh::generate(TD, &["fra"]).unwrap();
    let server = mesh.workload("fra", &id("istio-system", "gw")).unwrap();
    // Roots of two meshes (a root rotation): a client of either is accepted.
    let roots = [mesh.root_der(), other_mesh.root_der()];
    let policy = PeerPolicy::TrustDomains(vec![TD.into(), "old.local".into()]);
    let cfg = |policy: PeerPolicy| {
        Arc::new(
            eastwest_certs::mtls_server_config(
                server.chain_der(),
                server.key_der(),
                &roots,
                policy,
                eastwest_certs::TlsVersions::Tls13Only,
                vec![b"h2".to_vec()],
            )
            .unwrap(),
        )
    };
    let with_h2 = |client: &Identity| {
        let mut c = (*with_root(client, &mesh).client_config(td()).unwrap()).clone();
        c.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(c)
    };
    for client in [
        mesh.workload("ash", &id("a", "ztunnel")).unwrap(),
        mesh.workload("ash", &SpiffeId::workload("old.local", "a", "ztunnel"))
            .unwrap(),
        other_mesh.workload("fra", &id("a", "ztunnel")).unwrap(),
    ] {
        let out = handshake(cfg(policy.clone()), with_h2(&client)).await;
        assert_eq!(out.server.unwrap(), *client.spiffe_id());
        assert_eq!(out.alpn.as_deref(), Some(&b"h2"[..]));
    }
    let stranger = mesh
        .workload("ash", &SpiffeId::workload("elsewhere.local", "a", "z"))
        .unwrap();
    let err = handshake(cfg(policy), with_h2(&stranger))
        .await
        .server
        .unwrap_err();
    assert!(
        err.contains("expected trust domain cluster.local or old.local"),
        "{err}"
    );
    // The chain check a gateway runs on its own certificate before serving it.
    eastwest_certs::check_chain(&server.chain_der(), &roots).unwrap();
    let err = eastwest_certs::check_chain(&server.chain_der(), &[other_mesh.root_der()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not chain to the mesh root"), "{err}");
}
