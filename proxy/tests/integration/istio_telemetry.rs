//! Istio's standard TCP metrics from the gateway, as Kiali reads them.

use std::sync::Arc;

use eastwest_proxy::Proxy;
use eastwest_routes::{TelemetryConfig, Workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

fn gateway_telemetry() -> TelemetryConfig {
    TelemetryConfig {
        workload: Some("istio-eastwestgateway".into()),
        namespace: Some("istio-system".into()),
        cluster: Some("ash".into()),
        ..TelemetryConfig::default()
    }
}

fn sglang_workload(namespace: &str) -> Arc<Workload> {
    Arc::new(Workload {
        name: "sglang".into(),
        namespace: namespace.into(),
        app: Some("sglang".into()),
        version: Some("v1".into()),
        service_account: Some("sglang".into()),
        cluster: Some("ash".into()),
    })
}

/// The value of the one series of `family` whose labels include every `labels` pair.
fn sample(body: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = body.lines().filter_map(|line| {
        let rest = line.strip_prefix(family)?.strip_prefix('{')?;
        let (set, value) = rest.rsplit_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| {
                set.split("\",")
                    .any(|p| p.trim_end_matches('"') == format!("{k}=\"{v}"))
            })
            .then(|| value.trim().parse::<f64>().unwrap())
    });
    let first = found.next();
    assert!(
        found.next().is_none(),
        "several {family} series match {labels:?}"
    );
    first
}

/// Polls /metrics until `family{labels}` reaches `want` (bounded by DEADLINE).
async fn wait_sample(proxy: &Proxy, family: &str, labels: &[(&str, &str)], want: f64) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, body) = admin_get(proxy, "/metrics").await;
        if sample(&body, family, labels) >= Some(want) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{family}{labels:?} never reached {want}"
        );
        // Poll interval, as support::wait_metric polls: the condition above is the sync.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn istio_tcp_metrics_name_gateway_service_and_endpoint_workload() {
    let pki = pki();
    let host = "sglang.istio-labels.svc.cluster.local";
    let backend = tls_echo_backend("b", &pki.server).await;
    let mut svc = service(host, 8000, &[(backend, &[])]);
    svc.ports[0].endpoints[0].workload = Some(sglang_workload("istio-labels"));
    let mut cfg = passthrough_config("istio-labels", vec![svc]);
    cfg.telemetry = gateway_telemetry();
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("istio-labels").unwrap();

    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", host))
        .await
        .unwrap();
    assert!(greeting(&mut tls).await.starts_with("b "));
    tls.write_all(b"a prompt").await.unwrap();
    let mut echo = [0u8; 8];
    tls.read_exact(&mut echo).await.unwrap();
    drop(tls);

    let edge = [
        ("reporter", "source"),
        ("source_workload", "istio-eastwestgateway"),
        ("source_workload_namespace", "istio-system"),
        ("source_canonical_service", "istio-eastwestgateway"),
        ("source_principal", "unknown"),
        ("source_cluster", "ash"),
        ("destination_service", host),
        ("destination_service_name", "sglang"),
        ("destination_service_namespace", "istio-labels"),
        ("destination_workload", "sglang"),
        ("destination_workload_namespace", "istio-labels"),
        ("destination_app", "sglang"),
        ("destination_version", "v1"),
        ("destination_canonical_service", "sglang"),
        ("destination_canonical_revision", "v1"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/istio-labels/sa/sglang",
        ),
        ("destination_cluster", "ash"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ];
    let body = wait_sample(&proxy, "istio_tcp_connections_closed_total", &edge, 1.0).await;
    assert_eq!(
        sample(&body, "istio_tcp_connections_opened_total", &edge),
        Some(1.0)
    );
    // The same bytes as eastwest's own counters, direction by direction.
    let route = format!("{host}:8000");
    for (istio, direction) in [
        ("istio_tcp_received_bytes_total", "to_upstream"),
        ("istio_tcp_sent_bytes_total", "to_downstream"),
    ] {
        let istio_bytes = sample(&body, istio, &edge).unwrap();
        let ours = sample(
            &body,
            "eastwest_bytes_total",
            &[("route", &route), ("direction", direction)],
        )
        .unwrap();
        assert!(istio_bytes > 0.0, "{istio} is 0");
        assert_eq!(
            istio_bytes, ours,
            "{istio} differs from eastwest_bytes_total"
        );
    }
    promtool_check(&body);
}

#[tokio::test]
async fn a_route_no_endpoint_accepts_counts_with_response_flags_uf() {
    let host = "down.istio-uf.svc.cluster.local";
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let mut cfg = passthrough_config("istio-uf", vec![service(host, 8000, &[(dead, &[])])]);
    cfg.upstream.connect_attempts = 1;
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("istio-uf").unwrap();
    let pki = pki();
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&client_hello_bytes(&pki.client, &istio_sni(8000, "", host)))
        .await
        .unwrap();
    assert!(closed_by_proxy(s).await);
    let labels = [
        ("destination_service", host),
        ("destination_workload", "unknown"),
        ("response_flags", "UF"),
    ];
    let body = wait_sample(&proxy, "istio_tcp_connections_closed_total", &labels, 1.0).await;
    assert_eq!(
        sample(&body, "istio_tcp_connections_opened_total", &labels),
        Some(1.0)
    );
}

/// The metrics registry is per process: thousands of routes in it would slow every other
/// test's scrape, so the measurement runs in a process of its own (this test binary again,
/// running only `cardinality_child`), and this test reads its verdict.
#[test]
fn istio_series_stay_four_per_route_and_workload_however_many_services() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "istio_telemetry::cardinality_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the measurement failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(line) = stdout.lines().find(|l| l.contains("istio_tcp_* series")) {
        println!("{line}");
    }
}

const CHILD: &str = "EASTWEST_CARDINALITY_CHILD";

/// Routes one connection to each of `EASTWEST_CARDINALITY_SERVICES` services (default 1 000;
/// docs/telemetry.md has the 10 000 run),
/// each with its own workload, and counts the Istio series and the size of /metrics. The
/// figure goes in docs/telemetry.md; the assertion is the bound: four series per
/// (route, workload), nothing per connection.
/// Does nothing unless started by the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cardinality_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let services: usize = std::env::var("EASTWEST_CARDINALITY_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let domain = "istio-card";
    // A backend that drains each connection and answers a few bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
                let _ = s.write_all(b"tokens").await;
            });
        }
    });
    let host = |i: usize| format!("s{i:05}.{domain}.svc.cluster.local");
    let table = (0..services)
        .map(|i| {
            let mut svc = service(&host(i), 8000, &[(backend, &[])]);
            let mut wl = (*sglang_workload(domain)).clone();
            wl.name = format!("w{i:05}");
            svc.ports[0].endpoints[0].workload = Some(Arc::new(wl));
            svc
        })
        .collect();
    let mut cfg = passthrough_config("istio-card", table);
    cfg.telemetry = gateway_telemetry();
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("istio-card").unwrap();

    // One ClientHello, its SNI rewritten in place for each service (same length).
    let pki = pki();
    let template_sni = istio_sni(8000, "", &host(0));
    let hello = client_hello_bytes(&pki.client, &template_sni);
    let at = hello
        .windows(template_sni.len())
        .position(|w| w == template_sni.as_bytes())
        .unwrap();
    let hello = Arc::new(hello);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..services {
        if tasks.len() >= 32 {
            tasks.join_next().await.unwrap().unwrap();
        }
        let mut hello = (*hello).clone();
        hello[at..at + template_sni.len()]
            .copy_from_slice(istio_sni(8000, "", &host(i)).as_bytes());
        tasks.spawn(async move {
            assert_eq!(half_closed_exchange(gw, &[&hello]).await, b"tokens");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // Every connection was relayed (each read its answer to EOF), so all its series are
    // registered; only their number is asserted. One scrape, with a deadline for a big page.
    let scrape_started = std::time::Instant::now();
    let body = big_scrape(&proxy).await;
    let scrape_time = scrape_started.elapsed();
    let ours = format!("destination_service_namespace=\"{domain}\"");
    let istio_series = body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_") && l.contains(&ours))
        .count();
    let route_series = body
        .lines()
        .filter(|l| {
            !l.starts_with('#') && l.contains(&format!(".{domain}.svc.cluster.local:8000\""))
        })
        .count();
    let istio_bytes: usize = body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_") && l.contains(&ours))
        .map(|l| l.len() + 1)
        .sum();
    println!(
        "{services} services, one connection each: {istio_series} istio_tcp_* series \
         ({istio_bytes} bytes of /metrics), {route_series} eastwest_* per-route series; \
         /metrics is {} bytes in all, scraped in {scrape_time:?} (debug build)",
        body.len()
    );
    assert_eq!(istio_series, 4 * services);
    proxy.shutdown().await;
}

/// GET /metrics allowing a minute: a page with tens of thousands of series in a debug build.
async fn big_scrape(proxy: &Proxy) -> String {
    let mut s = TcpStream::connect(proxy.metrics_addr()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        s.read_to_string(&mut out),
    )
    .await
    .unwrap()
    .unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}
