//! The `hbone` listener (Istio ambient's 15008) end to end: a ztunnel-like client doing
//! double HBONE through the real gateway to destination-ztunnel stand-ins, over real mTLS and
//! HTTP/2 on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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

use crate::support::{metric, wait_metric, DEADLINE, TD};

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

/// The mesh as ambient sees it: a source ztunnel, the gateway, destination ztunnels.
struct Ambient {
    mesh: Mesh,
    source: Identity,
    destination: Identity,
    gateway_files: IdentityFiles,
    _dir: tempfile::TempDir,
}

fn ambient() -> Ambient {
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

fn h2_client_tls(id: &Identity) -> Arc<rustls::ClientConfig> {
    id.client_config_with_alpn(PeerPolicy::TrustDomain(TD.into()), vec![b"h2".to_vec()])
        .unwrap()
}

/// An ambient endpoint: `address` as the route table has it, HBONE on `hbone` (the stand-in).
fn ambient_endpoint(hbone: SocketAddr) -> Endpoint {
    Endpoint {
        address: SocketAddr::new(hbone.ip(), 9080),
        labels: Default::default(),
        hbone_port: Some(hbone.port()),
        workload: None,
    }
}

fn sidecar_endpoint(address: SocketAddr) -> Endpoint {
    Endpoint {
        address,
        labels: Default::default(),
        hbone_port: None,
        workload: None,
    }
}

fn service(host: &str, ports: Vec<(u16, Vec<Endpoint>)>) -> Service {
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
fn hbone_config(ambient: &Ambient, listener: &str, services: Vec<Service>) -> ProxyConfig {
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

/// A destination ztunnel stand-in: mTLS (its own identity, ALPN h2), HTTP/2, and per CONNECT
/// a 200, a greeting `<name> <authority> <client SPIFFE ID>\n`, then an echo.
async fn destination_ztunnel(name: &'static str, id: &Identity) -> SocketAddr {
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
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, greeting: String) {
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
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(echo(tcp, String::new()));
        }
    });
    addr
}

fn no_sni() -> ServerName<'static> {
    // An IP name: rustls sends no SNI, as ztunnel.
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// An outer HBONE connection to the gateway, as a source ztunnel opens it.
async fn outer(gw: SocketAddr, id: &Identity) -> HboneClient {
    let tcp = TcpStream::connect(gw).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    HboneClient::connect(tcp, h2_client_tls(id), no_sni())
        .await
        .unwrap()
}

async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
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

async fn roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .expect("no echo in time")
        .unwrap();
    assert_eq!(back, msg);
}

async fn start(cfg: ProxyConfig) -> (Proxy, SocketAddr) {
    let name = cfg.listeners[0].name.clone();
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr(&name).unwrap();
    (proxy, gw)
}

#[tokio::test]
async fn double_hbone_through_the_gateway_reaches_the_destination_ztunnel() {
    const LISTENER: &str = "hbone-double";
    let (log, _subscriber) = crate::access_log::Captured::install();
    let a = ambient();
    let dest = destination_ztunnel("east-ztunnel", &a.destination).await;
    // A workload of its own: Istio's series are process-wide and other tests use REVIEWS.
    let endpoint = Endpoint {
        workload: Some(Arc::new(eastwest_routes::Workload {
            name: "reviews-double-hbone".into(),
            namespace: "bookinfo".into(),
            app: Some("reviews".into()),
            version: Some("v1".into()),
            service_account: Some("bookinfo-reviews".into()),
            cluster: Some("east".into()),
        })),
        ..ambient_endpoint(dest)
    };
    let mut cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(REVIEWS, vec![(9080, vec![endpoint])])],
    );
    cfg.access_log = true;
    let (proxy, gw) = start(cfg).await;

    // Outer: to the gateway, naming the service; inner: end to end with the destination.
    let outer = outer(gw, &a.source).await;
    let tunnel = outer.open(&format!("{REVIEWS}:9080")).await.unwrap();
    let inner = HboneClient::connect(tunnel, h2_client_tls(&a.source), no_sni())
        .await
        .unwrap();
    // ztunnel names the service (hostname and service port) in both layers.
    let mut stream = inner.open(&format!("{REVIEWS}:9080")).await.unwrap();
    // The destination saw the inner CONNECT and the source ztunnel's own certificate: the
    // gateway relayed the inner TLS unopened.
    assert_eq!(
        read_line(&mut stream).await,
        format!("east-ztunnel {REVIEWS}:9080 spiffe://cluster.local/ns/istio-system/sa/ztunnel")
    );
    roundtrip(&mut stream, b"GET /reviews/0 HTTP/1.1\r\n\r\n").await;
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    drop((stream, inner));

    let route = format!("{REVIEWS}:9080");
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"{LISTENER}\",route=\"{route}\",result=\"routed\"}}"),
        1.0,
    )
    .await;
    let to_upstream = metric(
        &proxy,
        &format!("eastwest_bytes_total{{route=\"{route}\",direction=\"to_upstream\"}}"),
    )
    .await;
    assert!(to_upstream > 0.0, "inner TLS bytes counted per route");
    // Istio's standard series, one "TCP connection" per CONNECT stream, name the source
    // ztunnel's verified identity (Kiali's edge into the service).
    let (_, body) = crate::support::admin_get(&proxy, "/metrics").await;
    let istio = |family: &str| -> f64 {
        let line = body
            .lines()
            .find(|l| {
                l.starts_with(&format!("{family}{{"))
                    && l.contains("destination_workload=\"reviews-double-hbone\"")
                    && l.contains(
                        "destination_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\"",
                    )
                    && l.contains(
                        "source_principal=\"spiffe://cluster.local/ns/istio-system/sa/ztunnel\"",
                    )
            })
            .unwrap_or_else(|| panic!("no {family} series for the stream in\n{body}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    assert_eq!(istio("istio_tcp_connections_opened_total"), 1.0);
    assert_eq!(istio("istio_tcp_connections_closed_total"), 1.0);
    // The route's eastwest_bytes_total also counts other tests' streams on REVIEWS.
    let received = istio("istio_tcp_received_bytes_total");
    assert!(
        received > 0.0 && received <= to_upstream,
        "{received} vs {to_upstream}"
    );
    assert!(istio("istio_tcp_sent_bytes_total") > 0.0);

    // One access-log line per stream, with the source ztunnel's SPIFFE ID.
    let lines = log.access_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    for field in [
        format!("listener={LISTENER}"),
        "peer_id=spiffe://cluster.local/ns/istio-system/sa/ztunnel".to_string(),
        format!("authority={route}"),
        format!("route=\"{route}\""),
        format!("endpoint={dest}"),
        "status=200".to_string(),
        "result=\"routed\"".to_string(),
    ] {
        assert!(lines[0].contains(&field), "{field} not in {}", lines[0]);
    }
}

#[tokio::test]
async fn the_authority_port_picks_the_service_port() {
    const LISTENER: &str = "hbone-ports";
    let a = ambient();
    let http = destination_ztunnel("http", &a.destination).await;
    let grpc = destination_ztunnel("grpc", &a.destination).await;
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![
                (9080, vec![ambient_endpoint(http)]),
                (9090, vec![ambient_endpoint(grpc)]),
            ],
        )],
    );
    let (_proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    for (port, want) in [(9080, "http"), (9090, "grpc"), (9080, "http")] {
        let tunnel = outer.open(&format!("{REVIEWS}:{port}")).await.unwrap();
        let inner = HboneClient::connect(tunnel, h2_client_tls(&a.source), no_sni())
            .await
            .unwrap();
        let mut s = inner.open("10.1.2.3:1").await.unwrap();
        let line = read_line(&mut s).await;
        assert!(line.starts_with(&format!("{want} ")), "port {port}: {line}");
    }
}

#[tokio::test]
async fn a_service_behind_a_waypoint_is_reached_through_the_waypoint() {
    const LISTENER: &str = "hbone-waypoint";
    let a = ambient();
    let pod = destination_ztunnel("pod-ztunnel", &a.destination).await;
    let waypoint = destination_ztunnel("waypoint", &a.destination).await;
    let mut svc = service(REVIEWS, vec![(9080, vec![ambient_endpoint(pod)])]);
    // As control publishes it: the waypoint pod's IP with HBONE on its own port.
    svc.ports[0].waypoint = vec![ambient_endpoint(waypoint)];
    let cfg = hbone_config(&a, LISTENER, vec![svc]);
    let (_proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    for _ in 0..3 {
        let tunnel = outer.open(&format!("{REVIEWS}:9080")).await.unwrap();
        let inner = HboneClient::connect(tunnel, h2_client_tls(&a.source), no_sni())
            .await
            .unwrap();
        let mut s = inner.open(&format!("{REVIEWS}:9080")).await.unwrap();
        // The inner CONNECT arrives at the waypoint, never at the pod's ztunnel.
        assert_eq!(
            read_line(&mut s).await,
            format!("waypoint {REVIEWS}:9080 spiffe://cluster.local/ns/istio-system/sa/ztunnel")
        );
        roundtrip(&mut s, b"through the waypoint").await;
    }
}

#[tokio::test]
async fn unknown_services_and_services_without_ambient_endpoints_get_503() {
    const LISTENER: &str = "hbone-503";
    let a = ambient();
    let sidecar = tcp_echo().await;
    let ambient_dest = tcp_echo().await;
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![
            service(REVIEWS, vec![(9080, vec![ambient_endpoint(ambient_dest)])]),
            // Sidecar pods only: served on 15443, never over HBONE.
            service(
                "ratings.bookinfo.svc.cluster.local",
                vec![(9080, vec![sidecar_endpoint(sidecar)])],
            ),
        ],
    );
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    for authority in [
        "nope.bookinfo.svc.cluster.local:9080",
        "ratings.bookinfo.svc.cluster.local:9080",
        &format!("{REVIEWS}:1234"),
    ] {
        let err = outer.open(authority).await.err().expect(authority);
        assert_eq!(
            err.status(),
            Some(http::StatusCode::SERVICE_UNAVAILABLE),
            "{authority}: {err}"
        );
    }
    // The connection serves on after refusals.
    let mut ok = outer.open(&format!("{REVIEWS}:9080")).await.unwrap();
    roundtrip(&mut ok, b"still here").await;
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"{LISTENER}\",route=\"\",result=\"unknown_route\"}}"),
        2.0,
    )
    .await;
}

#[tokio::test]
async fn ip_authorities_and_requests_other_than_connect_get_400() {
    const LISTENER: &str = "hbone-400";
    let a = ambient();
    // Something that would answer if the gateway were an open relay.
    let open_relay_target = tcp_echo().await;
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
        )],
    );
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    for authority in [
        open_relay_target.to_string(),
        "[::1]:9080".into(),
        format!("{REVIEWS}:0"),
    ] {
        let err = outer.open(&authority).await.err().expect(&authority);
        assert_eq!(
            err.status(),
            Some(http::StatusCode::BAD_REQUEST),
            "{authority}: {err}"
        );
    }

    // A GET on the same kind of connection, with plain h2.
    let tcp = TcpStream::connect(gw).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(h2_client_tls(&a.source))
        .connect(no_sni(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("https://{REVIEWS}:9080/"))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"{LISTENER}\",route=\"\",result=\"bad_request\"}}"),
        4.0,
    )
    .await;
}

#[tokio::test]
async fn client_certificates_of_another_ca_or_trust_domain_are_refused() {
    const LISTENER: &str = "hbone-certs";
    let a = ambient();
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
        )],
    );
    let (proxy, gw) = start(cfg).await;

    let foreign_mesh = Mesh::generate(TD, &["west"]).unwrap();
    let foreign = foreign_mesh
        .workload("west", &SpiffeId::workload(TD, "istio-system", "ztunnel"))
        .unwrap();
    let other_td = a
        .mesh
        .workload(
            "west",
            &SpiffeId::workload("other.domain", "istio-system", "ztunnel"),
        )
        .unwrap();
    for (i, client) in [&foreign, &other_td].into_iter().enumerate() {
        // The client accepts the gateway; only the gateway may refuse.
        let tls = trusting_gateway(client);
        let tcp = TcpStream::connect(gw).await.unwrap();
        let opened = async {
            let c = HboneClient::connect(tcp, tls, no_sni()).await?;
            c.open(&format!("{REVIEWS}:9080")).await
        };
        let result = tokio::time::timeout(DEADLINE, opened).await.unwrap();
        let err = result.err().expect("a refused client opened a stream");
        assert_eq!(err.status(), None, "refused at TLS, not by a status: {err}");
        wait_metric(
            &proxy,
            &format!("eastwest_connections_closed_total{{listener=\"{LISTENER}\",route=\"\",result=\"tls_failed\"}}"),
            (i + 1) as f64,
        )
        .await;
    }
    // A mesh client still gets through.
    let mut ok = outer(gw, &a.source)
        .await
        .open(&format!("{REVIEWS}:9080"))
        .await
        .unwrap();
    roundtrip(&mut ok, b"mesh member").await;
}

/// Presents `client`'s certificate and accepts any server (so only the gateway can refuse).
fn trusting_gateway(client: &Identity) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_client_auth_cert(client.chain_der(), client.key_der())
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Accepts any server: these tests are about the gateway refusing the client.
#[derive(Debug)]
struct AnyServer;

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
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn two_hundred_concurrent_streams_share_one_connection() {
    const LISTENER: &str = "hbone-200-streams";
    let a = ambient();
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
        )],
    );
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    let authority = format!("{REVIEWS}:9080");
    // All open at once before any finishes.
    let mut streams = Vec::new();
    for _ in 0..200 {
        streams.push(outer.open(&authority).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        tasks.spawn(async move {
            let msg = format!("stream {i}");
            roundtrip(&mut s, msg.as_bytes()).await;
            s.shutdown().await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"{LISTENER}\",route=\"{authority}\",result=\"routed\"}}"),
        200.0,
    )
    .await;
    // One outer connection carried them all.
    assert_eq!(
        metric(
            &proxy,
            &format!("eastwest_connections_opened_total{{listener=\"{LISTENER}\"}}")
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn eight_mib_through_one_stream_while_a_stalled_stream_blocks_nothing() {
    const LISTENER: &str = "hbone-8mib";
    let a = ambient();
    // A destination that accepts but never reads: its stream's windows fill and stay full.
    let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (tcp, _) = stalled.accept().await.unwrap();
        // Hold it open, unread, for the test's life.
        let _ = held_tx.send(tcp).await;
        std::future::pending::<()>().await;
    });
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![
            service(
                REVIEWS,
                vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
            ),
            service(
                "stalled.bookinfo.svc.cluster.local",
                vec![(9080, vec![ambient_endpoint(stalled_addr)])],
            ),
        ],
    );
    let (_proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;

    // A writer pushing far more into the stalled stream than windows and socket buffers
    // hold: it blocks, and the gateway buffers no more than the windows allow.
    let mut slow = outer
        .open("stalled.bookinfo.svc.cluster.local:9080")
        .await
        .unwrap();
    let _held = held_rx.recv().await.unwrap();
    let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pushing = pushed.clone();
    let stalled_writer = tokio::spawn(async move {
        let chunk = vec![7u8; 256 * 1024];
        for _ in 0..256 {
            slow.write_all(&chunk).await.unwrap();
            pushing.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });

    // 8 MiB through another stream on the same connection, both ways, byte for byte.
    let mut fast = outer.open(&format!("{REVIEWS}:9080")).await.unwrap();
    let data: Bytes = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut fast);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::with_capacity(8 * 1024 * 1024);
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("8 MiB did not get through next to a stalled stream");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ");
    // Meanwhile the stalled stream still waits for window: its 64 MiB never got through.
    assert!(!stalled_writer.is_finished());
    let pushed = pushed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        pushed < 32 * 1024 * 1024,
        "the gateway buffered {pushed} bytes"
    );
    stalled_writer.abort();
}

/// Each side's end passes as a half-close while the other direction keeps flowing.
#[tokio::test]
async fn half_close_passes_both_ways() {
    const LISTENER: &str = "hbone-half-close";
    let a = ambient();
    // Reads to EOF, then answers with what it got, then closes: sees the client's FIN.
    let (reads_first, mut got_rx) = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    s.write_all(format!("got {}", got.len()).as_bytes())
                        .await
                        .unwrap();
                    s.shutdown().await.unwrap();
                    let _ = tx.send(got).await;
                });
            }
        });
        (addr, rx)
    };
    // Says goodbye and closes its sending side first, then still reads everything.
    let (closes_first, mut later_rx) = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    s.write_all(b"bye").await.unwrap();
                    s.shutdown().await.unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    let _ = tx.send(got).await;
                });
            }
        });
        (addr, rx)
    };
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![
            service(
                "reads.bookinfo.svc.cluster.local",
                vec![(1, vec![ambient_endpoint(reads_first)])],
            ),
            service(
                "closes.bookinfo.svc.cluster.local",
                vec![(1, vec![ambient_endpoint(closes_first)])],
            ),
        ],
    );
    let (_proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;

    // END_STREAM -> FIN: the destination reads to EOF, and its answer still comes back.
    let mut s = outer
        .open("reads.bookinfo.svc.cluster.local:1")
        .await
        .unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 7");
    assert_eq!(got_rx.recv().await.unwrap(), b"request");

    // FIN -> END_STREAM: the client reads EOF, and what it sends after still arrives.
    let mut s = outer
        .open("closes.bookinfo.svc.cluster.local:1")
        .await
        .unwrap();
    let mut first = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, "bye");
    s.write_all(b"after your FIN").await.unwrap();
    s.shutdown().await.unwrap();
    let later = tokio::time::timeout(DEADLINE, later_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(later, b"after your FIN");
}

/// The drain: GOAWAY refuses new streams on the open connection, while a stream open before
/// keeps flowing; the drain ends as soon as that stream does.
#[tokio::test]
async fn drain_sends_goaway_and_open_streams_keep_flowing() {
    const LISTENER: &str = "hbone-drain";
    let a = ambient();
    let mut cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
        )],
    );
    cfg.drain_accept_period = Duration::ZERO;
    cfg.drain_period = Duration::from_secs(60);
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    let authority = format!("{REVIEWS}:9080");
    let mut open = outer.open(&authority).await.unwrap();
    roundtrip(&mut open, b"before").await;

    let draining = tokio::spawn(proxy.clone().shutdown());
    // GOAWAY reaches the client: new streams on this connection are refused.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match outer.open(&authority).await {
            Err(e) => {
                assert_eq!(e.status(), None, "refused by GOAWAY, not a status: {e}");
                break;
            }
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "no GOAWAY");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    for msg in [&b"during the drain"[..], b"still"] {
        roundtrip(&mut open, msg).await;
    }
    assert!(
        !draining.is_finished(),
        "the drain waits for the open stream"
    );
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(DEADLINE, draining)
        .await
        .expect("the drain ended when the last stream did, not at drain_period")
        .unwrap();
}

/// A route table without the service refuses new streams and leaves open ones alone.
#[tokio::test]
async fn route_updates_never_cut_established_streams() {
    const LISTENER: &str = "hbone-route-update";
    let a = ambient();
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
        )],
    );
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    let authority = format!("{REVIEWS}:9080");
    let mut open = outer.open(&authority).await.unwrap();
    roundtrip(&mut open, b"before").await;
    proxy
        .apply_routes(RouteTable {
            version: 2,
            ..Default::default()
        })
        .unwrap();
    let err = outer.open(&authority).await.err().unwrap();
    assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
    roundtrip(&mut open, b"after the service left the table").await;
}

/// The gateway certificate a new TLS handshake with the gateway sees (its leaf).
async fn served_gateway_leaf(gw: SocketAddr, client: &Identity) -> Vec<u8> {
    let tcp = TcpStream::connect(gw).await.unwrap();
    let tls = tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(h2_client_tls(client)).connect(no_sni(), tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn rotating_the_gateway_certificate_files_under_load_drops_no_stream() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const LISTENER: &str = "hbone-rotation";
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 10;
    /// Round trips each stream makes after the new certificate is seen.
    const AFTER: usize = 3;
    let a = ambient();
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![service(
            REVIEWS,
            vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
        )],
    );
    let (proxy, gw) = start(cfg).await;
    let authority = format!("{REVIEWS}:9080");
    let old_leaf = served_gateway_leaf(gw, &a.source).await;

    // Load: streams on several outer connections, each echoing until it has gone on for
    // AFTER round trips past the rotation.
    let rotated = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = Vec::new();
    for c in 0..CONNECTIONS {
        let client = outer(gw, &a.source).await;
        for s in 0..STREAMS {
            let mut stream = client.open(&authority).await.unwrap();
            let rotated = rotated.clone();
            let (first_done, first_rx) = tokio::sync::oneshot::channel();
            started.push(first_rx);
            tasks.spawn(async move {
                let msg = format!("connection {c} stream {s}");
                roundtrip(&mut stream, msg.as_bytes()).await;
                let _ = first_done.send(());
                let mut after = 0;
                let mut pace = tokio::time::interval(Duration::from_millis(25));
                // Bounded: a stream that never sees the rotation fails on the deadline below.
                for _ in 0..100_000 {
                    pace.tick().await;
                    roundtrip(&mut stream, msg.as_bytes()).await;
                    if rotated.load(Ordering::SeqCst) {
                        after += 1;
                        if after == AFTER {
                            break;
                        }
                    }
                }
                stream.shutdown().await.unwrap();
            });
        }
    }
    for rx in started {
        rx.await.unwrap();
    }

    // Replace the files (key first, then the chain, as a naive copy would) while they flow.
    let new = a
        .mesh
        .workload(
            "east",
            &SpiffeId::workload(TD, "istio-system", "istio-eastwestgateway"),
        )
        .unwrap();
    std::fs::write(&a.gateway_files.key, new.key_pem()).unwrap();
    std::fs::write(&a.gateway_files.cert_chain, new.chain_pem()).unwrap();
    let new_leaf = new.chain_der()[0].to_vec();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let leaf = served_gateway_leaf(gw, &a.source).await;
        if leaf == new_leaf {
            break;
        }
        assert_eq!(leaf, old_leaf, "a handshake saw neither certificate");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rotated.store(true, Ordering::SeqCst);

    // A new outer connection, on the new certificate, carries streams too.
    let mut fresh = outer(gw, &a.source).await.open(&authority).await.unwrap();
    roundtrip(&mut fresh, b"after the rotation").await;
    fresh.shutdown().await.unwrap();

    let all = tokio::time::timeout(3 * DEADLINE, async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    });
    all.await.expect("streams kept flowing past the rotation");
    let total = (CONNECTIONS * STREAMS + 1) as f64;
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"{LISTENER}\",route=\"{authority}\",result=\"routed\"}}"),
        total,
    )
    .await;
    let (_, body) = crate::support::admin_get(&proxy, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["identity"]["renewals"], 1);
    assert!(dump["identity"]["last_error"].is_null(), "{body}");
}
