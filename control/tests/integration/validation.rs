//! Objects that would yield items a proxy refuses (and with them the whole table and every
//! later delta) are ignored or left out, so one odd object never freezes a network's updates.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use eastwest_control::{Control, ControlConfig};
use eastwest_proxy::control_client::{self, ControlClientConfig};
use eastwest_routes::RouteTable;
use serde_json::json;

use crate::support::apiserver::ApiServer;
use crate::support::control::{start_control, start_control_with_remote};
use crate::support::objects::*;
use crate::support::{endpoint_addrs, http_get, wait_for};

const HELLO: &str = "helloworld.sample.svc.cluster.local";

fn hello(ip: &str) -> serde_json::Value {
    slice(
        "sample",
        "hw-1",
        "helloworld",
        &[("http", 5000)],
        &[ready(ip)],
    )
}

fn gateway_with_ingress(name: &str, ingress: serde_json::Value) -> serde_json::Value {
    let mut g = gateway_service("istio-system", name, "192.0.2.1");
    g["status"]["loadBalancer"]["ingress"] = ingress;
    g
}

#[tokio::test]
async fn invalid_objects_are_left_out_and_updates_keep_flowing() {
    let fra = ApiServer::start().await;
    fra.apply(
        "services",
        service("sample", "helloworld", &[("http", 5000)]),
    );
    fra.apply("endpointslices", hello("10.1.0.1"));
    // A name no real API server would accept, so its hostname is no DNS name.
    fra.apply("services", service("sample", "bad name", &[("http", 80)]));
    let ash = ApiServer::start().await;
    ash.apply("namespaces", namespace("istio-system", Some("network2")));
    // An empty ip must not hide the hostname; an unusable hostname is left out.
    ash.apply(
        "services",
        gateway_with_ingress(
            "gw-1",
            json!([{"ip": "", "hostname": "gw.ash.example.com"}]),
        ),
    );
    ash.apply(
        "services",
        gateway_with_ingress("gw-2", json!([{"hostname": "not a host"}])),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote(&fra, &ash, dir.path()).await;

    // What a proxy is offered; it refuses any invalid table, as eastwest-proxy does.
    let seen: Arc<Mutex<Vec<(RouteTable, bool)>>> = Arc::default();
    let recorder = seen.clone();
    let url = format!("http://{}", control.routes_addr());
    let client = tokio::spawn(control_client::run(
        ControlClientConfig::plain_text(url, "fra", "network1"),
        move |t: RouteTable| {
            let mut errors = Vec::new();
            t.validate("", &mut errors);
            let valid = errors.is_empty();
            recorder.lock().unwrap().push((t, valid));
            if valid {
                Ok(())
            } else {
                Err(format!("{errors:?}"))
            }
        },
    ));
    let applied = || {
        seen.lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, valid)| *valid)
            .map(|(t, _)| t.clone())
            .unwrap_or_default()
    };
    let endpoint = |t: &RouteTable| endpoint_addrs(t, HELLO);
    wait_for("first table applied", || async {
        endpoint(&applied()) == ["10.1.0.1:5000"]
    })
    .await;
    let t = applied();
    assert_eq!(t.services.len(), 1, "{:?}", t.services);
    assert_eq!(
        t.network_gateways
            .iter()
            .map(|g| g.address.as_str())
            .collect::<Vec<_>>(),
        ["gw.ash.example.com:15443"]
    );
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    let dropped: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("eastwest_control_invalid_routes_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 2, "{m}");

    // Later changes still reach the proxy.
    fra.apply("endpointslices", hello("10.1.0.2"));
    wait_for("change applied", || async {
        endpoint(&applied()) == ["10.1.0.2:5000"]
    })
    .await;
    client.abort();
    let refused: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, valid)| !valid)
        .map(|(t, _)| t.version)
        .collect();
    assert!(refused.is_empty(), "refused versions {refused:?}");
}

#[tokio::test]
async fn an_empty_network_annotation_on_a_secret_is_no_annotation() {
    let fra = ApiServer::start().await;
    // bel's istio-system namespace has no network label.
    let bel = ApiServer::start().await;
    bel.apply("services", service("sample", "ratings", &[("http", 9080)]));
    bel.apply(
        "endpointslices",
        slice(
            "sample",
            "ratings-1",
            "ratings",
            &[("http", 9080)],
            &[ready("10.3.0.1")],
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into())
    })
    .await;
    let mut secret = remote_secret("istio-system", "bel", &bel.kubeconfig("bel"));
    secret["metadata"]["annotations"]["networking.istio.io/network"] = json!("");
    fra.apply("secrets", secret);
    // Like a cluster without any network hint: the local network.
    wait_for("bel's endpoints in network1", || async {
        control
            .current_table("network1")
            .and_then(|t| t.service("ratings.sample.svc.cluster.local").cloned())
            .is_some_and(|s| s.ports[0].endpoints.len() == 1)
    })
    .await;
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        m.contains("eastwest_control_cluster_synced{cluster=\"bel\",network=\"network1\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_bad_cluster_domain_is_refused_at_startup() {
    for domain in ["cluster local", "cluster.local.", ""] {
        let mut cfg = ControlConfig::new("fra", "network1");
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.cluster_domain = domain.to_string();
        let err = match Control::start(cfg).await {
            Ok(_) => panic!("{domain:?} accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.starts_with("--cluster-domain: "), "{err}");
    }
}
