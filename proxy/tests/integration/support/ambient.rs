//! The ambient mesh the `hbone` tests run: certificates for a source ztunnel, the gateway and
//! destination ztunnels, destination-ztunnel stand-ins, and the client-side helpers.

use std::net::SocketAddr;
use std::sync::Arc;

use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use eastwest_proxy::hbone::client::{HboneClient, HboneStream};
use eastwest_proxy::Proxy;
use eastwest_routes::{
    Endpoint, IdentityConfig, IdentityFiles, ListenerConfig, ListenerMode, ProxyConfig, RouteTable,
    Service, ServicePort,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{AnyServer, DEADLINE, TD};

pub const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

/// The mesh as ambient sees it: a source ztunnel, the gateway, destination ztunnels.
pub struct Ambient {
    pub mesh: Mesh,
    pub source: Identity,
    pub destination: Identity,
    pub gateway_files: IdentityFiles,
    _dir: tempfile::TempDir,
}

pub fn ambient() -> Ambient {
    let mesh = Mesh::generate(TD, &["west", "east"]).unwrap();
    let id = |cluster: &str, ns: &str, sa: &str| {
        mesh.workload(cluster, &SpiffeId::workload(TD, ns, sa))
            .unwrap()
    };
    let source = id("west", "istio-system", "ztunnel");
    let destination = id("east", "istio-system", "ztunnel");
    let gateway = id("east", "istio-system", "istio-eastwestgateway");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let gateway_files = IdentityFiles {
        cert_chain: write("cert-chain.pem", gateway.chain_pem()),
        key: write("key.pem", gateway.key_pem()),
        roots: write("root-cert.pem", gateway.root_pem()),
    };
    Ambient {
        mesh,
        source,
        destination,
        gateway_files,
        _dir: dir,
    }
}

pub fn h2_client_tls(id: &Identity) -> Arc<rustls::ClientConfig> {
    id.client_config_with_alpn(PeerPolicy::TrustDomain(TD.into()), vec![b"h2".to_vec()])
        .unwrap()
}

/// An ambient endpoint: `address` as the route table has it, HBONE on `hbone` (the stand-in).
pub fn ambient_endpoint(hbone: SocketAddr) -> Endpoint {
    Endpoint {
        address: SocketAddr::new(hbone.ip(), 9080),
        labels: Default::default(),
        hbone_port: Some(hbone.port()),
        workload: None,
    }
}

pub fn sidecar_endpoint(address: SocketAddr) -> Endpoint {
    Endpoint {
        address,
        labels: Default::default(),
        hbone_port: None,
        workload: None,
    }
}

pub fn service(host: &str, ports: Vec<(u16, Vec<Endpoint>)>) -> Service {
    Service {
        hostname: host.into(),
        subsets: vec![],
        ports: ports
            .into_iter()
            .map(|(port, endpoints)| ServicePort {
                port,
                name: None,
                waypoint: Vec::new(),
                endpoints,
            })
            .collect(),
    }
}

/// A gateway config with one `hbone` listener, `listener` (one name per test: metrics are
/// process-wide).
pub fn hbone_config(ambient: &Ambient, listener: &str, services: Vec<Service>) -> ProxyConfig {
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        listener,
        "127.0.0.1:0".parse().unwrap(),
        ListenerMode::Hbone,
    )]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    cfg.identity = Some(IdentityConfig {
        trust_domain: TD.into(),
        extra_trust_domains: vec![],
        files: Some(ambient.gateway_files.clone()),
        istiod: None,
    });
    cfg.routes = RouteTable {
        services: services.into_iter().map(Arc::new).collect(),
        ..Default::default()
    };
    cfg
}

/// The stand most HBONE tests use: `listener` routes `REVIEWS:9080` to one ambient endpoint, a
/// TCP echo.
pub async fn reviews_echo_config(ambient: &Ambient, listener: &str) -> ProxyConfig {
    let echo = ambient_endpoint(tcp_echo().await);
    hbone_config(
        ambient,
        listener,
        vec![service(REVIEWS, vec![(9080, vec![echo])])],
    )
}

/// A destination ztunnel stand-in: mTLS (its own identity, ALPN h2), HTTP/2, and per CONNECT
/// a 200, a greeting `<name> <authority> <client SPIFFE ID>\n`, then an echo.
pub async fn destination_ztunnel(name: &'static str, id: &Identity) -> SocketAddr {
    let tls = id
        .server_config_tls13(PeerPolicy::TrustDomain(TD.into()), vec![b"h2".to_vec()])
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| eastwest_certs::spiffe_id_of(&c[0]).ok().flatten())
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let authority = req.uri().authority().unwrap().to_string();
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    let send = respond.send_response(resp, false).unwrap();
                    let greeting = format!("{name} {authority} {peer}\n");
                    tokio::spawn(echo(HboneStream::new(send, req.into_body()), greeting));
                }
            });
        }
    });
    addr
}

/// Writes `greeting`, then echoes until EOF, then closes its side.
pub async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    greeting: String,
) {
    if s.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

/// A plain TCP echo, for tests about the outer layer only (no inner HBONE needed).
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(echo(tcp, String::new()));
        }
    });
    addr
}

pub fn no_sni() -> ServerName<'static> {
    // An IP name: rustls sends no SNI, as ztunnel.
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// An outer HBONE connection to the gateway, as a source ztunnel opens it.
pub async fn outer(gw: SocketAddr, id: &Identity) -> HboneClient {
    let tcp = TcpStream::connect(gw).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    HboneClient::connect(tcp, h2_client_tls(id), no_sni())
        .await
        .unwrap()
}

pub async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut b))
            .await
            .expect("no line in time")
            .unwrap();
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

pub async fn roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .expect("no echo in time")
        .unwrap();
    assert_eq!(back, msg);
}

pub async fn start(cfg: ProxyConfig) -> (Proxy, SocketAddr) {
    let name = cfg.listeners[0].name.clone();
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr(&name).unwrap();
    (proxy, gw)
}

/// Presents `client`'s certificate and accepts any server (so only the gateway can refuse).
pub fn trusting_gateway(client: &Identity) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer::default()))
    .with_client_auth_cert(client.chain_der(), client.key_der())
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}
