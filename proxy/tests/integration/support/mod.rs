//! In-process helpers: TLS backends, Istio-like mTLS clients, admin scraping.

pub mod ambient;
pub mod hello;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use eastwest_proxy::Proxy;
use eastwest_routes::{
    Endpoint, ListenerConfig, ListenerMode, ProxyConfig, RouteTable, Service, ServicePort,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const TD: &str = "cluster.local";
pub const SGLANG: &str = "sglang.demo.svc.cluster.local";
pub const ISTIO_ALPN: [&[u8]; 2] = [b"istio-peer-exchange", b"istio"];

/// A free port on loopback, for a server that must be told its address up front. Taken
/// below the kernel's ephemeral range (32768 and up by default): the thousands of client
/// connections other tests open draw their local ports from that range and would otherwise
/// take a port between this check and the server's bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    // Where this process starts, so concurrent test processes rarely probe the same ports.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// A child process (an eastwest binary) killed when the test ends, pass or fail.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from 127.0.0.1:`port` on a new connection, blocking: (status, body), or `None`
/// when nothing answers properly within 10 s.
pub fn http_get_blocking(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some((
        out.get(9..12)?.parse().ok()?,
        out.split_once("\r\n\r\n")?.1.to_string(),
    ))
}

/// A bounded wait for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Pki {
    pub client: Identity,
    pub server: Identity,
}

pub fn pki() -> Pki {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let client = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "open-webui"))
        .unwrap();
    let server = mesh
        .workload("ash", &SpiffeId::workload(TD, "demo", "sglang"))
        .unwrap();
    Pki { client, server }
}

/// An mTLS backend like a sidecar-fronted pod: requires a mesh client cert, answers each
/// connection with "<name> <client spiffe id>\n" then echoes everything.
pub async fn tls_echo_backend(name: &'static str, server: &Identity) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    tls_echo_backend_on(listener, name, server)
}

/// [`tls_echo_backend`] on a listener the caller bound (e.g. to revive a dead address).
pub fn tls_echo_backend_on(
    listener: TcpListener,
    name: &'static str,
    server: &Identity,
) -> SocketAddr {
    let cfg = server
        .server_config_with_alpn(PeerPolicy::TrustDomain(TD.into()), vec![b"istio".to_vec()])
        .unwrap();
    let acceptor = TlsAcceptor::from(cfg);
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
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
                ambient::echo(tls, format!("{name} {peer}\n")).await;
            });
        }
    });
    addr
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects like an Istio sidecar: mesh client cert, ALPN istio-peer-exchange/istio, `sni`.
pub async fn istio_connect(addr: SocketAddr, client: &Identity, sni: &str) -> std::io::Result<Tls> {
    let cfg = client
        .client_config_with_alpn(
            PeerPolicy::TrustDomain(TD.into()),
            ISTIO_ALPN.iter().map(|p| p.to_vec()).collect(),
        )
        .unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    TlsConnector::from(cfg).connect(name, tcp).await
}

/// Reads the backend's greeting line.
pub async fn greeting(tls: &mut Tls) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while tokio::time::timeout(DEADLINE, tls.read_exact(&mut b))
        .await
        .unwrap()
        .is_ok()
    {
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

pub fn istio_sni(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

pub fn service(host: &str, port: u16, endpoints: &[(SocketAddr, &[(&str, &str)])]) -> Service {
    Service {
        hostname: host.into(),
        subsets: vec![],
        ports: vec![ServicePort {
            port,
            name: None,
            waypoint: Vec::new(),
            endpoints: endpoints
                .iter()
                .map(|(a, labels)| Endpoint {
                    address: *a,
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    hbone_port: None,
                    workload: None,
                })
                .collect(),
        }],
    }
}

/// A config with one auto-passthrough listener named `listener` on 127.0.0.1:0.
pub fn passthrough_config(listener: &str, services: Vec<Service>) -> ProxyConfig {
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        listener,
        "127.0.0.1:0".parse().unwrap(),
        ListenerMode::AutoPassthrough,
    )]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    cfg.routes = RouteTable {
        services: services.into_iter().map(Arc::new).collect(),
        ..Default::default()
    };
    cfg
}

/// GET `path` from the admin server that serves it: (status, body).
pub async fn admin_get(proxy: &Proxy, path: &str) -> (u16, String) {
    let addr = match path {
        "/healthz/ready" => proxy.status_addr(),
        "/metrics" => proxy.metrics_addr(),
        _ => proxy.debug_addr(),
    };
    http_get(addr, path).await
}

/// GET `path` from `addr` on a new connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// The value of one metric series (exact label set as rendered), or 0.
pub async fn metric(proxy: &Proxy, series: &str) -> f64 {
    let (_, body) = admin_get(proxy, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Polls `metric` until it reaches `want` (bounded by DEADLINE).
pub async fn wait_metric(proxy: &Proxy, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = metric(proxy, series).await;
        if got >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed at {got}, wanted {want}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True when the proxy closed the connection without relaying (EOF or reset on read).
pub async fn closed_by_proxy(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("proxy neither closed nor answered"),
    }
}

/// The exact bytes a rustls client sends as its first flight (the ClientHello record).
pub fn client_hello_bytes(client: &Identity, sni: &str) -> Vec<u8> {
    let cfg = client
        .client_config_with_alpn(
            PeerPolicy::TrustDomain(TD.into()),
            ISTIO_ALPN.iter().map(|p| p.to_vec()).collect(),
        )
        .unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Re-frames a single-record hello into records carrying at most `max` payload bytes each.
pub fn split_records(hello: &[u8], max: usize) -> Vec<u8> {
    let payload = &hello[5..];
    let mut out = Vec::new();
    for chunk in payload.chunks(max) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A plain TCP backend that records what it receives (until EOF) and replies `reply`.
pub async fn raw_backend(
    reply: &'static [u8],
) -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
                let _ = tx.send(got).await;
            });
        }
    });
    (addr, rx)
}

/// Writes `parts` to the gateway, half-closes, and reads until the gateway closes: what a
/// client that sends its whole request before reading gets back.
pub async fn half_closed_exchange(gw: SocketAddr, parts: &[&[u8]]) -> Vec<u8> {
    let mut s = TcpStream::connect(gw).await.unwrap();
    for part in parts {
        s.write_all(part).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    got
}

/// Fails unless `promtool check metrics` accepts `body` (a `/metrics` page).
pub fn promtool_check(body: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool not found: apt-get install prometheus (scripts/test.sh does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Accepts any server certificate, still checking the handshake's signatures: for tests about
/// the gateway refusing a client (which needs to get as far as presenting its certificate), or
/// that check what the gateway served themselves.
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl Default for AnyServer {
    fn default() -> Self {
        AnyServer(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
