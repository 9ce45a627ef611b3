//! A control plane that does not know does not withdraw routes: with the local API server
//! unreachable from the start, control publishes nothing, and a gateway that starts from its
//! route cache keeps routing by it (and keeps the cache) until the API server comes up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eastwest_certs::{Mesh, SpiffeId};
use eastwest_proxy::control_client;
use eastwest_routes::{Endpoint, RouteTable, Service, ServicePort};

use crate::e2e::{backend, connect, TD};
use crate::support::apiserver::ApiServer;
use crate::support::control::start_control;
use crate::support::objects::*;
use crate::support::{http_get, wait_for};

const SGLANG: &str = "sglang.demo.svc.cluster.local";

/// An API server holding Service demo/sglang (port 8000) with one endpoint, `ip:target_port`.
async fn sglang_api_server(target_port: u16, ip: &str) -> ApiServer {
    let api = ApiServer::start().await;
    api.apply("services", service("demo", "sglang", &[("http", 8000)]));
    let eps = [ready(ip)];
    let ports = [("http", target_port)];
    api.apply(
        "endpointslices",
        slice("demo", "sglang-1", "sglang", &ports, &eps),
    );
    api
}

#[tokio::test]
async fn an_unreachable_api_server_withdraws_no_routes_and_leaves_the_cache() {
    let mesh = Mesh::generate(TD, &["fra"]).unwrap();
    let client_id = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "open-webui"))
        .unwrap();
    let server_id = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "sglang"))
        .unwrap();
    let cached = backend("cached", "127.0.0.1:0".parse().unwrap(), &server_id).await;
    let new = backend(
        "new",
        SocketAddr::new("127.0.0.2".parse().unwrap(), cached.port()),
        &server_id,
    )
    .await;

    // The cluster has moved sglang to 127.0.0.2, but its API server is down from the start.
    let fra = sglang_api_server(cached.port(), "127.0.0.2").await;
    fra.go_down().await;

    // The gateway's cache, from a control that once saw sglang on 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("routes-cache.json");
    let cached_table = RouteTable {
        version: 7,
        services: vec![Arc::new(Service {
            hostname: SGLANG.into(),
            subsets: vec![],
            ports: vec![ServicePort {
                port: 8000,
                name: Some("http".into()),
                waypoint: Vec::new(),
                endpoints: vec![Endpoint {
                    address: cached,
                    labels: Default::default(),
                    hbone_port: None,
                    workload: None,
                }],
            }],
        })],
        ..Default::default()
    };
    let cache_bytes = serde_json::to_vec(&cached_table).unwrap();
    std::fs::write(&cache, &cache_bytes).unwrap();

    let sync_timeout = Duration::from_millis(200);
    let control = start_control(&fra, dir.path(), |c| c.sync_timeout = sync_timeout).await;

    // The gateway starts as eastwest-proxy's main does with --control and --route-cache:
    // not ready, routes from the cache, then following control.
    let proxy = crate::support::control::gateway().await;
    proxy.set_ready(false);
    let from_cache = control_client::load_route_cache(&cache).unwrap().unwrap();
    proxy.apply_routes(from_cache).unwrap();
    proxy.set_ready(true);
    let applier = proxy.clone();
    let client = tokio::spawn(control_client::run(
        control_client::ControlClientConfig {
            route_cache: Some(cache.clone()),
            ..control_client::ControlClientConfig::plain_text(
                format!("http://{}", control.routes_addr()),
                "fra",
                "network1",
            )
        },
        move |table| {
            applier.apply_routes(table)?;
            applier.set_ready(true);
            Ok(())
        },
    ));
    let gw = proxy.listener_addr("gw").unwrap();
    wait_for("the gateway subscribed", || async {
        let (_, m) = http_get(control.admin_addr(), "/metrics").await;
        m.contains("eastwest_control_connected_proxies 1")
    })
    .await;

    // Well past the sync timeout: control publishes nothing and is not ready (naming the
    // cluster); the gateway relays by its cache, stays ready, and its cache is untouched.
    let until = tokio::time::Instant::now() + sync_timeout * 5;
    while tokio::time::Instant::now() < until {
        assert!(control.current_table("network1").is_none());
        let (status, body) = http_get(control.admin_addr(), "/healthz/ready").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("cluster fra"), "{body}");
        let (mut tls, who) = connect(gw, &client_id).await.unwrap();
        assert_eq!(who, "cached");
        assert_eq!(crate::e2e::echo(&mut tls, b"ping").await, b"ping");
        let (status, _) = http_get(proxy.status_addr(), "/healthz/ready").await;
        assert_eq!(status, 200);
        assert_eq!(std::fs::read(&cache).unwrap(), cache_bytes);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The API server comes up: control syncs, publishes, and the gateway follows and caches.
    fra.come_back().await;
    wait_for("new connections reach the new endpoint", || async {
        matches!(connect(gw, &client_id).await, Ok((_, who)) if who == "new")
    })
    .await;
    let published = control.current_table("network1").unwrap();
    assert!(!published.partial);
    wait_for("the new table cached", || async {
        control_client::load_route_cache(&cache)
            .ok()
            .flatten()
            .is_some_and(|t| t.version == published.version)
    })
    .await;
    client.abort();
    let _ = new;
}

/// A remote cluster that never synced contributes nothing and removes nothing: after the sync
/// timeout control publishes the local cluster's routes, marked partial, and names the remote
/// in readiness and metrics; once it syncs the table is complete.
#[tokio::test]
async fn a_remote_that_never_synced_marks_the_table_partial_and_is_named() {
    let fra = sglang_api_server(8000, "10.1.0.1").await;
    let ash = ApiServer::start().await;
    ash.apply("namespaces", namespace("istio-system", Some("network2")));
    ash.go_down().await;
    let dir = tempfile::tempdir().unwrap();
    let control =
        crate::support::control::start_control_with_remote_and(&fra, &ash, dir.path(), |c| {
            c.sync_timeout = Duration::from_millis(200)
        })
        .await;

    wait_for("a table without ash", || async {
        control.current_table("network1").is_some()
    })
    .await;
    let table = control.current_table("network1").unwrap();
    assert!(table.partial);
    assert_eq!(table.services.len(), 1);
    let (status, body) = http_get(control.admin_addr(), "/healthz/ready").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("partial") && body.contains("cluster ash"),
        "{body}"
    );
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("\neastwest_control_unsynced 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("eastwest_control_cluster_synced{cluster=\"ash\",network=\"\"} 0"),
        "{metrics}"
    );

    ash.come_back().await;
    wait_for("a complete table", || async {
        control
            .current_table("network1")
            .is_some_and(|t| !t.partial)
    })
    .await;
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("\neastwest_control_unsynced 0\n"),
        "{metrics}"
    );
}
