//! A rotated remote secret (its kubeconfig changed) restarts the cluster's watch without
//! withdrawing the cluster's routes from proxies.

use std::sync::{Arc, Mutex};

use eastwest_proxy::control_client::{self, ControlClientConfig};
use eastwest_routes::RouteTable;

use crate::support::apiserver::ApiServer;
use crate::support::control::start_control;
use crate::support::objects::*;
use crate::support::{endpoint_addrs, http_get, wait_for};

const RATINGS: &str = "ratings.sample.svc.cluster.local";

/// An API server for cluster ash holding ratings with endpoints `ips`.
async fn ash_api_server(ips: &[&str]) -> ApiServer {
    let s = ApiServer::start().await;
    s.apply("services", service("sample", "ratings", &[("http", 9080)]));
    let eps: Vec<Ep> = ips.iter().map(|ip| ready(ip)).collect();
    s.apply(
        "endpointslices",
        slice("sample", "ratings-1", "ratings", &[("http", 9080)], &eps),
    );
    s
}

#[tokio::test]
async fn a_rotated_remote_secret_never_withdraws_the_clusters_routes() {
    let fra = ApiServer::start().await;
    let ash = ash_api_server(&["10.2.0.1"]).await;
    // Where the rotated kubeconfig points: not reachable yet, so the restarted watch cannot
    // list for a while and any withdrawal would be visible.
    let ash_new = ash_api_server(&["10.2.0.1", "10.2.0.2"]).await;
    ash_new.go_down().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into());
        // Same network, so ash's endpoints are in network1's table.
        c.remote_networks.insert("ash".into(), "network1".into());
    })
    .await;
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash.kubeconfig("ash")),
    );

    // What a proxy applies: every table it is offered, in order.
    let seen: Arc<Mutex<Vec<RouteTable>>> = Arc::default();
    let recorder = seen.clone();
    let url = format!("http://{}", control.routes_addr());
    let client = tokio::spawn(control_client::run(
        ControlClientConfig::plain_text(url, "fra", "network1"),
        move |t: RouteTable| {
            recorder.lock().unwrap().push(t);
            Ok(())
        },
    ));
    let last = || seen.lock().unwrap().last().cloned().unwrap_or_default();
    wait_for("ash's endpoints at the proxy", || async {
        endpoint_addrs(&last(), RATINGS) == ["10.2.0.1:9080"]
    })
    .await;
    let from = seen.lock().unwrap().len() - 1;

    // Rotate: the restarted watch fails against the unreachable server.
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash_new.kubeconfig("ash")),
    );
    wait_for("the new watch failed", || async {
        let (_, m) = http_get(control.admin_addr(), "/metrics").await;
        m.lines().any(|l| {
            l.starts_with("eastwest_control_watch_restarts_total{cluster=\"ash\"}")
                && !l.ends_with(" 0")
        })
    })
    .await;
    let (_, debug) = http_get(control.admin_addr(), "/debug/routes?network=network1").await;
    assert!(debug.contains("10.2.0.1:9080"), "{debug}");

    // Reachable: the new watch's list replaces ash's objects.
    ash_new.come_back().await;
    wait_for("the new server's endpoints at the proxy", || async {
        endpoint_addrs(&last(), RATINGS) == ["10.2.0.1:9080", "10.2.0.2:9080"]
    })
    .await;
    client.abort();
    let seen = seen.lock().unwrap();
    for t in &seen[from..] {
        assert!(
            endpoint_addrs(t, RATINGS).contains(&"10.2.0.1:9080".to_string()),
            "version {} lost ash's endpoints: {:?}",
            t.version,
            endpoint_addrs(t, RATINGS)
        );
    }
    assert!(control.not_synced().is_empty());
}
