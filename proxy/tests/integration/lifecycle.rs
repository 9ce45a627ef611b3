//! Reload, drain and metrics as an operator sees them.

use std::time::Duration;

use crate::support::*;
use eastwest_proxy::Proxy;
use eastwest_routes::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_roundtrip(tls: &mut Tls, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, msg);
}

async fn wait_for(mut cond: impl AsyncFnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_config(path: &std::path::Path, listener_port: u16, backend: std::net::SocketAddr) {
    let yaml = format!(
        "admin: {{status_address: 127.0.0.1:0, metrics_address: 127.0.0.1:0, debug_address: 127.0.0.1:0}}\nlisteners:\n  - name: reload\n    address: 127.0.0.1:{listener_port}\n\
         routes:\n  services:\n    - hostname: {SGLANG}\n      ports:\n        - port: 8000\n          endpoints:\n            - address: {backend}\n"
    );
    // Write then rename, as editors and Kubernetes do, so the watcher never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn file_reload_under_traffic_keeps_established_connections() {
    let pki = pki();
    let old = tls_echo_backend("old", &pki.server).await;
    let new = tls_echo_backend("new", &pki.server).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let port = free_port();
    write_config(&path, port, old);
    let proxy = Proxy::start(eastwest_routes::load_proxy_config(&path).unwrap())
        .await
        .unwrap();
    eastwest_proxy::watch_config_file(proxy.clone(), path.clone()).unwrap();
    let gw = proxy.listener_addr("reload").unwrap();
    let sni = istio_sni(8000, "", SGLANG);

    let mut established = istio_connect(gw, &pki.client, &sni).await.unwrap();
    assert!(greeting(&mut established).await.starts_with("old "));
    echo_roundtrip(&mut established, b"before").await;
    // Traffic keeps flowing on it while the reloads happen.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let traffic = tokio::spawn(async move {
        let mut roundtrips = 0u32;
        while stop_rx.try_recv().is_err() && roundtrips < 100_000 {
            echo_roundtrip(&mut established, b"tick").await;
            roundtrips += 1;
        }
        (established, roundtrips)
    });

    // A broken file is refused and counted; the old config keeps routing.
    std::fs::write(&path, "listeners: [{name: reload, address: nope}]\n").unwrap();
    wait_metric(&proxy, "eastwest_config_reload_failures_total", 1.0).await;
    let mut tls = istio_connect(gw, &pki.client, &sni).await.unwrap();
    assert!(greeting(&mut tls).await.starts_with("old "));

    // A good file moves new connections to the new endpoint.
    write_config(&path, port, new);
    wait_for(
        async || proxy.config().routes.services[0].ports[0].endpoints[0].address == new,
        "the reload",
    )
    .await;
    let mut tls = istio_connect(gw, &pki.client, &sni).await.unwrap();
    assert!(greeting(&mut tls).await.starts_with("new "));
    assert!(metric(&proxy, "eastwest_config_reloads_total").await >= 1.0);
    let (_, dump) = admin_get(&proxy, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert!(dump["config_version"].as_u64().unwrap() >= 2);

    // The connection made before both reloads flowed throughout and still does.
    stop_tx.send(()).unwrap();
    let (mut established, roundtrips) = traffic.await.unwrap();
    assert!(roundtrips > 0);
    echo_roundtrip(&mut established, b"after two reloads").await;
}

/// A gateway on listener `name` routing SGLANG:8000 to an echo backend (its config changed by
/// `tweak` first), and one stream established through it.
struct WithStream {
    proxy: Proxy,
    cfg: ProxyConfig,
    gw: std::net::SocketAddr,
    established: Tls,
    pki: Pki,
}

async fn gateway_with_a_stream(name: &str, tweak: impl FnOnce(&mut ProxyConfig)) -> WithStream {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let mut cfg = passthrough_config(name, vec![service(SGLANG, 8000, &[(backend, &[])])]);
    tweak(&mut cfg);
    let proxy = Proxy::start(cfg.clone()).await.unwrap();
    let gw = proxy.listener_addr(name).unwrap();
    let mut established = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    assert!(greeting(&mut established).await.starts_with("b "));
    WithStream {
        proxy,
        cfg,
        gw,
        established,
        pki,
    }
}

/// eastwest-proxy as a process (killed when dropped), routing SGLANG:8000 to `backend` on
/// `port`, its status server on `status`, with `extra` config lines.
struct Binary(Running);

impl Binary {
    fn start(
        dir: &std::path::Path,
        port: u16,
        status: u16,
        backend: std::net::SocketAddr,
        extra: &str,
    ) -> Binary {
        let config = dir.join("gw.yaml");
        std::fs::write(
            &config,
            format!(
                "admin: {{status_address: 127.0.0.1:{status}, metrics_address: 127.0.0.1:0, debug_address: 127.0.0.1:0}}\n{extra}\
                 listeners:\n  - name: tls\n    address: 127.0.0.1:{port}\n\
                 routes:\n  services:\n    - hostname: {SGLANG}\n      ports:\n        - port: 8000\n          endpoints:\n            - address: {backend}\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_eastwest-proxy"))
            .arg("--config")
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Binary(Running(child))
    }

    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .args([name, &self.0 .0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// The exit status, once the process has exited (bounded by DEADLINE).
    async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.0 .0.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The binary routing SGLANG:8000 to an echo backend, ready, with one stream through it.
struct BinaryWithStream {
    proxy: Binary,
    gw: std::net::SocketAddr,
    status: u16,
    established: Tls,
    pki: Pki,
    _dir: tempfile::TempDir,
}

async fn binary_with_a_stream(extra: &str) -> BinaryWithStream {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let dir = tempfile::tempdir().unwrap();
    let (port, status) = (free_port(), free_port());
    let proxy = Binary::start(dir.path(), port, status, backend, extra);
    wait_for(async || status_code(status).await == Some(200), "ready").await;
    let gw = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut established = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    assert!(greeting(&mut established).await.starts_with("b "));
    BinaryWithStream {
        proxy,
        gw,
        status,
        established,
        pki,
        _dir: dir,
    }
}

async fn status_code(status: u16) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], status));
    TcpStream::connect(addr).await.ok()?;
    Some(http_get(addr, "/healthz/ready").await.0)
}

/// The drain a load balancer in front needs: on SIGTERM readiness fails at once, but
/// connections arriving while the balancer's health check has not noticed yet are still
/// routed; after `drain_accept_period` the port refuses; a stream open all along flows until
/// `drain_period` ends.
#[tokio::test]
async fn sigterm_keeps_routing_new_connections_for_the_accept_period_then_refuses() {
    let BinaryWithStream {
        mut proxy,
        gw,
        status,
        mut established,
        pki,
        _dir,
    } = binary_with_a_stream("drain_accept_period: 5s\ndrain_period: 2s\n").await;
    let sni = istio_sni(8000, "", SGLANG);
    proxy.signal("-TERM");
    let sigterm = tokio::time::Instant::now();
    wait_for(
        async || status_code(status).await == Some(503),
        "readiness to fail",
    )
    .await;
    // Clients that still come, as a load balancer keeps sending them until its health check
    // fails: each opened at its offset after the SIGTERM is routed.
    for offset in [
        Duration::from_millis(50),
        Duration::from_secs(1),
        Duration::from_secs(4),
    ] {
        tokio::time::sleep_until(sigterm + offset).await;
        let mut tls = istio_connect(gw, &pki.client, &sni)
            .await
            .unwrap_or_else(|e| panic!("refused {offset:?} after SIGTERM: {e}"));
        assert!(greeting(&mut tls).await.starts_with("b "), "{offset:?}");
        echo_roundtrip(&mut tls, b"routed while draining").await;
    }
    // After the accept period the port refuses.
    wait_for(
        async || TcpStream::connect(gw).await.is_err(),
        "the port to refuse",
    )
    .await;
    // The stream open since before SIGTERM still flows, until drain_period ends it.
    echo_roundtrip(&mut established, b"still here").await;
    assert!(proxy.exited().await.success());
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(DEADLINE, established.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// An operator who does not want to wait for the drain signals again.
#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    // A drain far longer than DEADLINE: only the second signal can end it in time.
    let BinaryWithStream {
        mut proxy,
        status,
        established: _established,
        _dir,
        ..
    } = binary_with_a_stream("drain_accept_period: 60s\ndrain_period: 60s\n").await;
    proxy.signal("-TERM");
    wait_for(
        async || status_code(status).await == Some(503),
        "the drain to begin",
    )
    .await;
    proxy.signal("-TERM");
    assert!(
        !proxy.exited().await.success(),
        "a cut-short drain is not a clean exit"
    );
}

/// What arrives while draining (a config reload, a route table from control) must not
/// reopen the gateway: its port stays closed and readiness stays false until exit.
#[tokio::test]
async fn a_reload_or_a_route_table_during_drain_does_not_reopen_the_gateway() {
    // A fixed port, as in production: a reload would bind the same address again.
    let port = free_port();
    let WithStream {
        proxy,
        cfg,
        gw,
        mut established,
        ..
    } = gateway_with_a_stream("drain-reload", |cfg| {
        cfg.listeners[0].address = format!("127.0.0.1:{port}").parse().unwrap();
        cfg.drain_accept_period = Duration::ZERO;
        cfg.drain_period = Duration::from_secs(30);
    })
    .await;

    let during = proxy.clone();
    let draining = tokio::spawn(proxy.shutdown());
    wait_for(
        async || tokio::net::TcpStream::connect(gw).await.is_err(),
        "the listener to close",
    )
    .await;

    let refused = during.apply_config(cfg).await;
    assert!(
        matches!(refused, Err(eastwest_proxy::ApplyError::Draining)),
        "{refused:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(gw).await.is_err(),
        "the port was opened again"
    );
    // What the binary does when a table from control is applied.
    during.set_ready(true);
    assert_eq!(admin_get(&during, "/healthz/ready").await.0, 503);

    echo_roundtrip(&mut established, b"still here").await;
    drop(established);
    tokio::time::timeout(DEADLINE, draining)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn drain_period_bounds_the_wait() {
    let WithStream {
        proxy,
        established: mut stuck,
        ..
    } = gateway_with_a_stream("drain-bound", |cfg| {
        cfg.drain_accept_period = Duration::ZERO;
        cfg.drain_period = Duration::from_millis(200)
    })
    .await;
    tokio::time::timeout(DEADLINE, proxy.shutdown())
        .await
        .unwrap();
    // The proxy closed it at the end of the drain period.
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(DEADLINE, stuck.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let proxy = Proxy::start(passthrough_config(
        "promtool",
        vec![service(SGLANG, 8000, &[(backend, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("promtool").unwrap();
    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    assert!(greeting(&mut tls).await.starts_with("b "));
    drop(tls);
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"promtool\",route=\"{SGLANG}:8000\",result=\"routed\"}}"),
        1.0,
    )
    .await;
    let (status, body) = admin_get(&proxy, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "eastwest_connections_opened_total",
        "eastwest_connections_active",
        "eastwest_bytes_total",
        "eastwest_client_hello_duration_seconds_bucket",
        "eastwest_upstream_connect_duration_seconds_bucket",
        "eastwest_connection_duration_seconds_bucket",
        "eastwest_config_version",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    promtool_check(&body);
}

#[tokio::test]
async fn renaming_a_listener_keeps_its_address_and_its_connections() {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let services = vec![service(SGLANG, 8000, &[(backend, &[])])];
    let port = free_port();
    let mut cfg = passthrough_config("before", services.clone());
    cfg.listeners[0].address = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = Proxy::start(cfg.clone()).await.unwrap();
    let gw = proxy.listener_addr("before").unwrap();
    let sni = istio_sni(8000, "", SGLANG);
    let mut established = istio_connect(gw, &pki.client, &sni).await.unwrap();
    assert!(greeting(&mut established).await.starts_with("b "));

    // Same address, new name: applied (binding the address twice would have failed it).
    cfg.listeners[0].name = "after".into();
    proxy.apply_config(cfg).await.unwrap();
    assert_eq!(proxy.listener_addr("after"), Some(gw));
    assert_eq!(proxy.listener_addr("before"), None);

    let mut tls = istio_connect(gw, &pki.client, &sni).await.unwrap();
    assert!(greeting(&mut tls).await.starts_with("b "));
    echo_roundtrip(&mut established, b"across the rename").await;
    wait_metric(
        &proxy,
        "eastwest_connections_opened_total{listener=\"after\"}",
        1.0,
    )
    .await;
}

/// max_connections counts the connections of the listener a reload replaced (renamed, or
/// moved to another address) until they end: a reload is no way around the limit.
#[tokio::test]
async fn a_renamed_or_moved_listener_keeps_counting_its_connections() {
    let port = || free_port();
    let WithStream {
        proxy,
        mut cfg,
        gw,
        mut established,
        pki,
    } = gateway_with_a_stream("full", |cfg| {
        cfg.listeners[0].address = format!("127.0.0.1:{}", port()).parse().unwrap();
        cfg.listeners[0].max_connections = Some(1);
    })
    .await;
    // Renamed on the same address, then moved to another: one connection still open.
    cfg.listeners[0].name = "renamed".into();
    proxy.apply_config(cfg.clone()).await.unwrap();
    let refused_on =
        |listener: &str| format!("eastwest_connections_refused_total{{listener=\"{listener}\"}}");
    assert!(closed_by_proxy(TcpStream::connect(gw).await.unwrap()).await);
    wait_metric(&proxy, &refused_on("renamed"), 1.0).await;

    cfg.listeners[0].address = format!("127.0.0.1:{}", port()).parse().unwrap();
    proxy.apply_config(cfg).await.unwrap();
    let moved = proxy.listener_addr("renamed").unwrap();
    assert_ne!(moved, gw);
    assert!(closed_by_proxy(TcpStream::connect(moved).await.unwrap()).await);
    wait_metric(&proxy, &refused_on("renamed"), 2.0).await;

    // Once it ends, there is room again.
    echo_roundtrip(&mut established, b"still counted").await;
    drop(established);
    let sni = istio_sni(8000, "", SGLANG);
    wait_for(
        async || match istio_connect(moved, &pki.client, &sni).await {
            Ok(mut tls) => greeting(&mut tls).await.starts_with("b "),
            Err(_) => false,
        },
        "room on the moved listener",
    )
    .await;
}

/// Two scrapes list the same series in the same order (families by name, series by labels),
/// even though the exporter keeps them in hash maps.
#[tokio::test]
async fn metrics_come_in_the_same_order_on_every_scrape() {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let services: Vec<_> = (0..6)
        .map(|i| {
            service(
                &format!("svc{i}.demo.svc.cluster.local"),
                8000,
                &[(backend, &[])],
            )
        })
        .collect();
    let proxy = Proxy::start(passthrough_config("order", services))
        .await
        .unwrap();
    let gw = proxy.listener_addr("order").unwrap();
    for i in 0..6 {
        let host = format!("svc{i}.demo.svc.cluster.local");
        let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", &host))
            .await
            .unwrap();
        assert!(greeting(&mut tls).await.starts_with("b "));
    }
    wait_metric(
        &proxy,
        "eastwest_connections_closed_total{listener=\"order\",route=\"svc5.demo.svc.cluster.local:8000\",result=\"routed\"}",
        1.0,
    )
    .await;
    // Series names and labels, without values (those may move between scrapes). Other
    // tests in this process add series of their own meanwhile: compare this test's routes.
    let series = |body: &str| -> Vec<String> {
        body.lines()
            .filter(|l| {
                (0..6).any(|i| l.contains(&format!("\"svc{i}.demo.svc.cluster.local:8000")))
            })
            .map(|l| {
                l.rsplit_once(' ')
                    .map_or(l, |(series, _)| series)
                    .to_string()
            })
            .collect()
    };
    let first_body = admin_get(&proxy, "/metrics").await.1;
    let first = series(&first_body);
    assert!(first.len() >= 6 * 2, "{first:#?}");
    for _ in 0..5 {
        assert_eq!(series(&admin_get(&proxy, "/metrics").await.1), first);
    }
    // And the whole scrape is in order: families by name.
    let families: Vec<&str> = first_body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    let mut sorted = families.clone();
    sorted.sort();
    assert_eq!(families, sorted);
}

/// A gateway that takes its routes from control starts not ready and stays so until they
/// arrive: the load balancer must never see a 200 from a gateway with no routes yet.
#[tokio::test]
async fn a_gateway_started_not_ready_answers_503_until_it_has_routes() {
    let proxy = Proxy::start_with_readiness(passthrough_config("gw", Vec::new()), false)
        .await
        .unwrap();
    assert_eq!(admin_get(&proxy, "/healthz/ready").await.0, 503);
    proxy.set_ready(true);
    assert_eq!(admin_get(&proxy, "/healthz/ready").await.0, 200);
}
