//! A rotated remote secret (its kubeconfig changed) restarts the cluster's watch without
//! withdrawing the cluster's routes from proxies while the new watch relists. Past
//! `--sync-timeout` the routes still stand (a control plane that does not know never withdraws
//! them), but the cluster is reported unsynced and tables are marked partial until it relists.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eastwest_proxy::control_client::{self, ControlClientConfig};
use eastwest_routes::RouteTable;

use crate::support::apiserver::ApiServer;
use crate::support::control::start_control;
use crate::support::objects::*;
use crate::support::{endpoint_addrs, http_get, wait_for};

const RATINGS: &str = "ratings.sample.svc.cluster.local";
const HELLOWORLD: &str = "helloworld.sample.svc.cluster.local";

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

/// The value of the `/metrics` line of `metric` for cluster ash.
async fn ash_metric(control: &eastwest_control::Control, metric: &str) -> Option<String> {
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    let prefix = format!("{metric}{{cluster=\"ash\"");
    m.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

#[tokio::test]
async fn a_rotated_remote_secret_keeps_routes_until_the_new_watch_lists_marked_partial_past_the_sync_timeout(
) {
    let fra = ApiServer::start().await;
    let ash = ash_api_server(&["10.2.0.1"]).await;
    // Where the rotated kubeconfig points: not reachable yet, so the restarted watch cannot
    // list and the previous watch's objects stand in.
    let ash_new = ash_api_server(&["10.2.0.1", "10.2.0.2"]).await;
    ash_new.go_down().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into());
        // Same network, so ash's endpoints are in network1's table.
        c.remote_networks.insert("ash".into(), "network1".into());
        // Long enough to look at the kept routes on a loaded machine, short enough to see
        // the cluster reported unsynced within wait_for's 20 s.
        c.sync_timeout = Duration::from_secs(5);
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
    let from = seen.lock().unwrap().len();

    // Rotate: the restarted watch fails against the unreachable server.
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash_new.kubeconfig("ash")),
    );
    wait_for("the new watch failed", || async {
        ash_metric(&control, "eastwest_control_watch_restarts_total")
            .await
            .is_some_and(|n| n != "0")
    })
    .await;
    // Meanwhile ash's routes stand: in the first table published after the rotation (a local
    // change triggers one) and as synced in /metrics.
    fra.apply(
        "services",
        service("sample", "helloworld", &[("http", 5000)]),
    );
    wait_for("a table after the rotation", || async {
        seen.lock().unwrap()[from..]
            .iter()
            .any(|t| t.service(HELLOWORLD).is_some())
    })
    .await;
    let first = seen.lock().unwrap()[from].clone();
    assert!(first.service(HELLOWORLD).is_some());
    assert_eq!(endpoint_addrs(&first, RATINGS), ["10.2.0.1:9080"]);
    assert_eq!(
        ash_metric(&control, "eastwest_control_cluster_synced")
            .await
            .as_deref(),
        Some("1")
    );

    // The sync timeout passes without a relist: ash is reported unsynced and the tables are
    // marked partial, but its routes and objects stay.
    wait_for("ash reported unsynced", || async {
        ash_metric(&control, "eastwest_control_cluster_synced")
            .await
            .as_deref()
            == Some("0")
    })
    .await;
    wait_for("a partial table", || async { last().partial }).await;
    assert_eq!(endpoint_addrs(&last(), RATINGS), ["10.2.0.1:9080"]);
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        m.contains("eastwest_control_objects{cluster=\"ash\",kind=\"endpointslices\"} 1"),
        "{m}"
    );
    assert!(
        control.not_synced().is_empty(),
        "readiness stays: control was ready before; {:?}",
        control.not_synced()
    );

    // Reachable: the new watch lists and the routes come back, from the new server.
    ash_new.come_back().await;
    wait_for("the new server's endpoints at the proxy", || async {
        endpoint_addrs(&last(), RATINGS) == ["10.2.0.1:9080", "10.2.0.2:9080"]
    })
    .await;
    // Every kind listed (DestinationRules may finish after the endpoints).
    wait_for("ash synced again", || async {
        ash_metric(&control, "eastwest_control_cluster_synced")
            .await
            .as_deref()
            == Some("1")
    })
    .await;
    client.abort();

    // In order: the old endpoints, then the new ones; never none, never the old ones again.
    let seen = seen.lock().unwrap();
    let counts: Vec<usize> = seen[from..]
        .iter()
        .map(|t| endpoint_addrs(t, RATINGS).len())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]) && !counts.contains(&0),
        "{counts:?}"
    );
    assert!(!seen.last().unwrap().partial);
}
