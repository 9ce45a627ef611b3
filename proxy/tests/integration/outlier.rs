//! Passive outlier detection seen from outside: which endpoint serves each client, and the
//! proxy's connect-failure and ejection metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use eastwest_proxy::Proxy;
use eastwest_routes::{ProxyConfig, RouteTable, Service};
use tokio::net::TcpListener;

// Metrics are process-wide: each test routes to its own service, `<listener>.demo.svc`, so
// the tests' series stay apart.

fn host(listener: &str) -> String {
    format!("{listener}.demo.svc.cluster.local")
}

fn failures(listener: &str) -> String {
    let route = host(listener);
    format!("eastwest_upstream_connect_failures_total{{route=\"{route}:8000\"}}")
}

fn ejections(listener: &str, reason: &str) -> String {
    let route = host(listener);
    format!("eastwest_endpoint_ejections_total{{route=\"{route}:8000\",reason=\"{reason}\"}}")
}

fn ejected(listener: &str) -> String {
    let route = host(listener);
    format!("eastwest_endpoints_ejected{{route=\"{route}:8000\"}}")
}

/// A loopback port where connecting is refused, held for the test: a socket bound there but
/// not listening refuses connections and keeps the port, so no other test's socket can take
/// it (as one could the moment a probed port is closed again).
struct RefusingPort {
    socket: socket2::Socket,
    addr: SocketAddr,
}

impl RefusingPort {
    fn new() -> Self {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        RefusingPort { socket, addr }
    }

    /// The endpoint comes back: the same socket starts accepting on the port.
    fn listen(self) -> TcpListener {
        self.socket.listen(1024).unwrap();
        self.socket.set_nonblocking(true).unwrap();
        TcpListener::from_std(self.socket.into()).unwrap()
    }
}

fn config(name: &str, endpoints: &[SocketAddr], base_ejection: Duration) -> ProxyConfig {
    let eps: Vec<(SocketAddr, &[(&str, &str)])> = endpoints.iter().map(|a| (*a, &[][..])).collect();
    let mut cfg = passthrough_config(name, vec![service(&host(name), 8000, &eps)]);
    cfg.upstream.outlier_detection.base_ejection_time = base_ejection;
    cfg.upstream.outlier_detection.max_ejection_time = base_ejection * 4;
    cfg
}

/// Opens a routed connection and returns the name of the backend that answered.
async fn served_by(proxy: &Proxy, listener: &str) -> String {
    let gw = proxy.listener_addr(listener).unwrap();
    let mut tls = istio_connect(gw, &pki_client(), &istio_sni(8000, "", &host(listener)))
        .await
        .unwrap();
    let greeting = greeting(&mut tls).await;
    greeting.split(' ').next().unwrap_or_default().to_string()
}

/// One mesh for the whole file: clients and backends must share its root.
fn mesh() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(pki)
}

fn pki_client() -> eastwest_certs::Identity {
    mesh().client.clone()
}

fn server_identity() -> eastwest_certs::Identity {
    mesh().server.clone()
}

#[tokio::test]
async fn a_dead_endpoint_is_tried_at_most_twice_in_200_connections() {
    let live = tls_echo_backend("live", &server_identity()).await;
    let dead_port = RefusingPort::new();
    let dead = dead_port.addr;
    let cfg = config("dead", &[dead, live], Duration::from_secs(60));
    let proxy = Proxy::start(cfg).await.unwrap();
    for _ in 0..100 {
        assert_eq!(served_by(&proxy, "dead").await, "live");
    }
    // A route update that changes the service (one more endpoint) keeps the ejection.
    let other = tls_echo_backend("other", &server_identity()).await;
    let svc = service(
        &host("dead"),
        8000,
        &[(dead, &[]), (live, &[]), (other, &[])],
    );
    proxy.apply_routes(table(svc, 2)).unwrap();
    for _ in 0..100 {
        assert_ne!(served_by(&proxy, "dead").await, "");
    }
    // Every attempt at the dead endpoint is a connect failure.
    let dead_attempts = metric(&proxy, &failures("dead")).await;
    eprintln!("dead endpoint attempts in 200 connections: {dead_attempts}");
    assert!(
        (1.0..=2.0).contains(&dead_attempts),
        "{dead_attempts} of 200 connections tried the dead endpoint"
    );
    assert_eq!(metric(&proxy, &ejections("dead", "refused")).await, 1.0);
    assert_eq!(metric(&proxy, &ejected("dead")).await, 1.0);
    let (_, body) = admin_get(&proxy, "/metrics").await;
    assert!(body.contains("# HELP eastwest_endpoint_ejections_total"));
    assert!(body.contains("# HELP eastwest_endpoints_ejected"));
    promtool_check(&body);
}

fn table(svc: Service, version: u64) -> RouteTable {
    RouteTable {
        version,
        services: vec![Arc::new(svc)],
        ..Default::default()
    }
}

/// A listener whose accept queue (backlog 0: one connection) is full and never drained: a
/// SYN to it gets no answer, like a blackholed address. Returns it with what fills it.
fn blackhole() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => fill.push(c),
            Err(_) => return (s, fill, addr),
        }
    }
    panic!("the backlog never filled");
}

#[tokio::test]
async fn a_blackholed_endpoint_costs_one_connect_timeout_then_none() {
    let live = tls_echo_backend("live", &server_identity()).await;
    let (_hole, _fill, hole) = blackhole();
    let mut cfg = config("hole", &[hole, live], Duration::from_secs(60));
    cfg.upstream.connect_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(cfg).await.unwrap();
    // Until the blackhole is first tried, each connection picks it with even odds (50 coin
    // flips); from then on it is ejected and nobody waits for it.
    for _ in 0..50 {
        assert_eq!(served_by(&proxy, "hole").await, "live");
    }
    let timeouts = metric(&proxy, &failures("hole")).await;
    eprintln!("connect timeouts in 50 connections with a blackholed endpoint: {timeouts}");
    assert_eq!(timeouts, 1.0);
    assert_eq!(metric(&proxy, &ejections("hole", "timeout")).await, 1.0);
    assert_eq!(metric(&proxy, &ejected("hole")).await, 1.0);
}

#[tokio::test]
async fn an_ejected_endpoint_is_probed_after_the_interval_and_recovers() {
    let live = tls_echo_backend("live", &server_identity()).await;
    let dead = RefusingPort::new();
    let cfg = config("revive", &[dead.addr, live], Duration::from_millis(200));
    let proxy = Proxy::start(cfg).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metric(&proxy, &ejected("revive")).await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never ejected");
        assert_eq!(served_by(&proxy, "revive").await, "live");
    }
    // The endpoint comes back on its address; once the ejection is over, a probe finds it.
    tls_echo_backend_on(dead.listen(), "revived", &server_identity());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while served_by(&proxy, "revive").await != "revived" {
        assert!(tokio::time::Instant::now() < deadline, "never probed again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&proxy, &ejected("revive")).await, 0.0);
    // Back in the pool: it takes its share of new connections again.
    let mut revived = 0;
    for _ in 0..40 {
        if served_by(&proxy, "revive").await == "revived" {
            revived += 1;
        }
    }
    assert!(revived > 0);
}

#[tokio::test]
async fn the_last_endpoint_left_is_never_ejected() {
    let (a, b) = (RefusingPort::new(), RefusingPort::new());
    let proxy = Proxy::start(config("last", &[a.addr, b.addr], Duration::from_secs(60)))
        .await
        .unwrap();
    let gw = proxy.listener_addr("last").unwrap();
    // Both endpoints refuse: one is ejected, the other stays a candidate.
    for _ in 0..10 {
        assert!(
            istio_connect(gw, &pki_client(), &istio_sni(8000, "", &host("last")))
                .await
                .is_err()
        );
    }
    assert!(metric(&proxy, &failures("last")).await >= 2.0);
    assert_eq!(metric(&proxy, &ejections("last", "refused")).await, 1.0);
    assert_eq!(metric(&proxy, &ejected("last")).await, 1.0);
}
