//! The `hbone` listener (Istio ambient's 15008) end to end: a ztunnel-like client doing
//! double HBONE through the real gateway to destination-ztunnel stand-ins, over real mTLS and
//! HTTP/2 on loopback.
//!
//! Routing and refusals here; many streams, flow control, drain and rotation in
//! `hbone_streams.rs`. The mesh stand-ins are in `support/ambient.rs`.

use std::sync::Arc;

use eastwest_certs::{Mesh, SpiffeId};
use eastwest_proxy::hbone::client::HboneClient;
use eastwest_routes::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{metric, wait_metric, DEADLINE, TD};

use crate::support::ambient::*;

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
        &format!("eastwest_hbone_streams_closed_total{{listener=\"{LISTENER}\",route=\"{route}\",result=\"routed\"}}"),
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
        &format!("eastwest_hbone_streams_closed_total{{listener=\"{LISTENER}\",route=\"\",result=\"unknown_route\"}}"),
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
    let cfg = reviews_echo_config(&a, LISTENER).await;
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
        &format!("eastwest_hbone_streams_closed_total{{listener=\"{LISTENER}\",route=\"\",result=\"bad_request\"}}"),
        4.0,
    )
    .await;
}

#[tokio::test]
async fn client_certificates_of_another_ca_or_trust_domain_are_refused() {
    const LISTENER: &str = "hbone-certs";
    let a = ambient();
    let cfg = reviews_echo_config(&a, LISTENER).await;
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
