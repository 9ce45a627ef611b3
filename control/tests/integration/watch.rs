//! eastwest-control against in-process Kubernetes API servers: sync, endpoint changes, watch
//! failures (cut streams, 410 Gone, server down), and the route tables that result.

use std::sync::Arc;
use std::time::Duration;

use crate::support::apiserver::ApiServer;
use crate::support::control::start_control_with_remote;
use crate::support::objects::*;
use crate::support::{http_get, wait_for};
use eastwest_control::Control;
use eastwest_routes::RouteTable;

struct Fixture {
    fra: ApiServer,
    ash: ApiServer,
    control: Control,
    _dir: tempfile::TempDir,
}

/// fra (network1) is local; ash (network2) is a `--remote` whose network comes from its
/// istio-system namespace label.
async fn fixture(seed: impl FnOnce(&ApiServer, &ApiServer)) -> Fixture {
    let fra = ApiServer::start_with(Duration::from_millis(100)).await;
    let ash = ApiServer::start_with(Duration::from_millis(100)).await;
    ash.apply("namespaces", namespace("istio-system", Some("network2")));
    ash.apply(
        "services",
        gateway_service("istio-system", "istio-eastwestgateway", "192.0.2.20"),
    );
    seed(&fra, &ash);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote(&fra, &ash, dir.path()).await;
    Fixture {
        fra,
        ash,
        control,
        _dir: dir,
    }
}

/// helloworld's one EndpointSlice in sample, port http 5000, with `eps`.
fn hw1(eps: &[Ep]) -> serde_json::Value {
    slice("sample", "hw-1", "helloworld", &[("http", 5000)], eps)
}

fn endpoints(table: &RouteTable, host: &str, port: u16) -> Vec<String> {
    table
        .service(host)
        .and_then(|s| s.ports.iter().find(|p| p.port == port))
        .map(|p| p.endpoints.iter().map(|e| e.address.to_string()).collect())
        .unwrap_or_default()
}

impl Fixture {
    fn table(&self) -> Arc<RouteTable> {
        self.control
            .current_table("network1")
            .unwrap_or_else(|| Arc::new(RouteTable::default()))
    }

    /// Waits for a published table satisfying `cond`, then checks the incrementally built
    /// table equals one computed from scratch.
    async fn wait_table(&self, what: &str, cond: impl Fn(&RouteTable) -> bool) -> Arc<RouteTable> {
        wait_for(what, || async { cond(&self.table()) }).await;
        let published = self.table();
        wait_for("published table matches a full recompute", || async {
            let mut full = self.control.recomputed_table("network1");
            let published = self.table();
            full.version = published.version;
            full == *published
        })
        .await;
        published
    }
}

const HELLO: &str = "helloworld.sample.svc.cluster.local";

#[tokio::test]
async fn initial_sync_builds_the_network_table() {
    let f = fixture(|fra, ash| {
        fra.apply(
            "services",
            service("sample", "helloworld", &[("http", 5000), ("grpc", 7070)]),
        );
        fra.apply(
            "endpointslices",
            slice(
                "sample",
                "helloworld-abc",
                "helloworld",
                &[("http", 5001), ("grpc", 7071)],
                &[
                    ready("10.1.0.1"),
                    not_ready("10.1.0.2"),
                    Ep {
                        ip: "10.1.0.3",
                        ready: true,
                        terminating: true,
                        pod: None,
                    },
                ],
            ),
        );
        // Only in ash (network2): reachable through ash's gateway.
        ash.apply("services", service("sample", "ratings", &[("http", 9080)]));
        ash.apply(
            "endpointslices",
            slice(
                "sample",
                "ratings-x",
                "ratings",
                &[("http", 9080)],
                &[ready("10.2.0.9")],
            ),
        );
    })
    .await;

    wait_for("ready", || async { f.control.not_synced().is_empty() }).await;
    let (status, body) = http_get(f.control.admin_addr(), "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let t = f
        .wait_table("first table", |t| t.service(HELLO).is_some())
        .await;
    assert!(t.version > 0);
    // targetPort resolution by port name; not-ready and terminating endpoints left out.
    assert_eq!(endpoints(&t, HELLO, 5000), ["10.1.0.1:5001"]);
    assert_eq!(endpoints(&t, HELLO, 7070), ["10.1.0.1:7071"]);
    assert!(t.service("ratings.sample.svc.cluster.local").is_none());
    assert_eq!(t.remote_services.len(), 1);
    let r = &t.remote_services[0];
    assert_eq!(
        (
            r.hostname.as_str(),
            r.ports.as_slice(),
            r.network.as_str(),
            r.cluster.as_deref()
        ),
        (
            "ratings.sample.svc.cluster.local",
            &[9080][..],
            "network2",
            Some("ash")
        )
    );
    assert_eq!(t.network_gateways.len(), 1);
    assert_eq!(t.network_gateways[0].network, "network2");
    assert_eq!(t.network_gateways[0].address, "192.0.2.20:15443");
    let mut errors = Vec::new();
    t.validate("", &mut errors);
    assert!(errors.is_empty(), "{errors:?}");

    let (_, metrics) = http_get(f.control.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("eastwest_control_cluster_synced{cluster=\"ash\",network=\"network2\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("eastwest_control_objects{cluster=\"fra\",kind=\"endpointslices\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn endpoint_changes_and_service_deletion_follow() {
    let f = fixture(|fra, _| {
        fra.apply(
            "services",
            service("sample", "helloworld", &[("http", 5000)]),
        );
        fra.apply("endpointslices", hw1(&[ready("10.1.0.1")]));
    })
    .await;
    let t0 = f
        .wait_table("first table", |t| !endpoints(t, HELLO, 5000).is_empty())
        .await;

    // Endpoint added.
    f.fra.apply(
        "endpointslices",
        hw1(&[ready("10.1.0.1"), ready("10.1.0.2")]),
    );
    let t1 = f
        .wait_table("endpoint added", |t| {
            endpoints(t, HELLO, 5000) == ["10.1.0.1:5000", "10.1.0.2:5000"]
        })
        .await;
    assert!(t1.version > t0.version);

    // Endpoint not ready.
    f.fra.apply(
        "endpointslices",
        hw1(&[ready("10.1.0.1"), not_ready("10.1.0.2")]),
    );
    let t2 = f
        .wait_table("endpoint not ready", |t| {
            endpoints(t, HELLO, 5000) == ["10.1.0.1:5000"]
        })
        .await;
    assert!(t2.version > t1.version);

    // Slice removed: the service stays (it is defined here) with no endpoints.
    f.fra.delete("endpointslices", "sample", "hw-1");
    f.wait_table("endpoints removed", |t| {
        t.service(HELLO)
            .is_some_and(|s| s.ports[0].endpoints.is_empty())
    })
    .await;

    // Service deleted.
    f.fra.delete("services", "sample", "helloworld");
    f.wait_table("service deleted", |t| t.service(HELLO).is_none())
        .await;
}

#[tokio::test]
async fn watch_cut_and_410_gone_recover() {
    let f = fixture(|fra, _| {
        fra.apply(
            "services",
            service("sample", "helloworld", &[("http", 5000)]),
        );
        fra.apply("endpointslices", hw1(&[ready("10.1.0.1")]));
    })
    .await;
    f.wait_table("first table", |t| !endpoints(t, HELLO, 5000).is_empty())
        .await;

    // A watch cut mid-stream resumes from the last version: no relist.
    let lists = f.fra.list_count("endpointslices");
    let watches = f.fra.watch_count("endpointslices");
    f.fra.drop_watches();
    wait_for("watch resumed", || async {
        f.fra.watch_count("endpointslices") > watches
    })
    .await;
    f.fra.apply("endpointslices", hw1(&[ready("10.1.0.7")]));
    f.wait_table("change after cut", |t| {
        endpoints(t, HELLO, 5000) == ["10.1.0.7:5000"]
    })
    .await;
    assert_eq!(
        f.fra.list_count("endpointslices"),
        lists,
        "a cut watch must resume, not relist"
    );

    // History expired: the resumed watch gets 410 Gone and kube-runtime lists again.
    f.fra.expire_history();
    wait_for("relist after 410", || async {
        f.fra.list_count("endpointslices") > lists
    })
    .await;
    f.fra.apply("endpointslices", hw1(&[ready("10.1.0.8")]));
    f.wait_table("change after relist", |t| {
        endpoints(t, HELLO, 5000) == ["10.1.0.8:5000"]
    })
    .await;
}

#[tokio::test]
async fn api_server_down_keeps_routes_then_catches_up() {
    let f = fixture(|_, ash| {
        ash.apply("services", service("sample", "ratings", &[("http", 9080)]));
        ash.apply(
            "endpointslices",
            slice(
                "sample",
                "ratings-x",
                "ratings",
                &[("http", 9080)],
                &[ready("10.2.0.9")],
            ),
        );
    })
    .await;
    let before = f
        .wait_table("remote service", |t| t.remote_services.len() == 1)
        .await;

    f.ash.go_down().await;
    // Wait until control has noticed (its watch failed and is being retried).
    wait_for("watch failure seen", || async {
        let (_, m) = http_get(f.control.admin_addr(), "/metrics").await;
        !m.contains("eastwest_control_watch_restarts_total{cluster=\"ash\"} 0")
    })
    .await;
    assert_eq!(
        *f.table(),
        *before,
        "routes must not change while the API server is down"
    );

    // While down, ash's data changes; once back, control catches up.
    f.ash.apply(
        "endpointslices",
        slice("sample", "ratings-x", "ratings", &[("http", 9080)], &[]),
    );
    f.ash.come_back().await;
    f.wait_table("caught up", |t| t.remote_services.is_empty())
        .await;
}

#[tokio::test]
async fn pod_labels_reach_endpoints_for_subsets() {
    let with_pod = |ip: &'static str, pod: &'static str| Ep {
        ip,
        ready: true,
        terminating: false,
        pod: Some(pod),
    };
    let f = fixture(|fra, _| {
        fra.apply(
            "services",
            service("sample", "helloworld", &[("http", 5000)]),
        );
        fra.apply(
            "pods",
            pod(
                "sample",
                "hw-v1",
                &[("version", "v1"), ("app", "helloworld")],
            ),
        );
        fra.apply(
            "pods",
            pod(
                "sample",
                "hw-v2",
                &[("version", "v2"), ("app", "helloworld")],
            ),
        );
        fra.apply(
            "endpointslices",
            hw1(&[with_pod("10.1.0.1", "hw-v1"), with_pod("10.1.0.2", "hw-v2")]),
        );
    })
    .await;
    let versions = |t: &RouteTable| -> Vec<Option<String>> {
        t.service(HELLO)
            .map(|s| {
                s.ports[0]
                    .endpoints
                    .iter()
                    .map(|e| e.labels.get("version").cloned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let t = f
        .wait_table("labels", |t| {
            versions(t) == [Some("v1".into()), Some("v2".into())]
        })
        .await;
    // Only the kept keys (default: version) are copied.
    let ep = &t.service(HELLO).unwrap().ports[0].endpoints[0];
    assert_eq!(ep.labels.len(), 1);

    // A relabelled Pod updates its endpoint.
    f.fra
        .apply("pods", pod("sample", "hw-v2", &[("version", "v3")]));
    f.wait_table("relabelled", |t| {
        versions(t) == [Some("v1".into()), Some("v3".into())]
    })
    .await;
}

#[tokio::test]
async fn routes_follow_the_ready_condition_as_publish_not_ready_addresses_sets_it() {
    let f = fixture(|fra, _| {
        fra.apply(
            "services",
            service("sample", "helloworld", &[("http", 5000)]),
        );
        // A Service with publishNotReadyAddresses: the controller sets `ready` on every
        // endpoint while `serving` follows Pod readiness.
        let mut s = hw1(&[
            not_ready("10.1.0.1"),
            not_ready("10.1.0.2"),
            ready("10.1.0.3"),
        ]);
        s["endpoints"][0]["conditions"]["ready"] = serde_json::json!(true);
        // No conditions at all: ready, per the API.
        s["endpoints"][1]
            .as_object_mut()
            .unwrap()
            .remove("conditions");
        // Terminating (the controller sets ready=false), though still serving.
        s["endpoints"][2]["conditions"]["terminating"] = serde_json::json!(true);
        s["endpoints"][2]["conditions"]["ready"] = serde_json::json!(false);
        fra.apply("endpointslices", s);
    })
    .await;
    f.wait_table("first table", |t| t.service(HELLO).is_some())
        .await;
    assert_eq!(
        endpoints(&f.table(), HELLO, 5000),
        ["10.1.0.1:5000", "10.1.0.2:5000"]
    );
}

/// While the API server answers 503, each watcher backs off exponentially (100 ms doubling,
/// jittered to half or more of each step: at most 8 requests in 10 s) instead of retrying every
/// 50–150 ms; once the server is back, the next attempt syncs.
#[tokio::test]
async fn watchers_back_off_while_the_api_server_fails_and_resync_when_it_is_back() {
    let fra = ApiServer::start().await;
    fra.apply(
        "services",
        service("sample", "helloworld", &[("http", 5000)]),
    );
    let hello_on = |ip: &str| {
        slice(
            "sample",
            "hw-1",
            "helloworld",
            &[("http", 5000)],
            &[ready(ip)],
        )
    };
    fra.apply("endpointslices", hello_on("10.1.0.1"));
    // Failing from the start: every watcher's list fails, which is where kube-runtime's
    // `.backoff()` started over each time (the watcher yields `Init` before each list).
    fra.set_unavailable(true);
    let dir = tempfile::tempdir().unwrap();
    let control = crate::support::control::start_control(&fra, dir.path(), |_| {}).await;

    const RESOURCES: [&str; 4] = ["services", "endpointslices", "pods", "destinationrules"];
    let window = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    // Every watcher has failed at least once...
    wait_for("every watcher failing", || async {
        RESOURCES.iter().all(|r| fra.unavailable_count(r) > 0)
    })
    .await;
    // ...and keeps its distance for the rest of the window.
    tokio::time::sleep_until(start + window).await;
    let counts: Vec<(&str, u64)> = RESOURCES
        .iter()
        .map(|r| (*r, fra.unavailable_count(r)))
        .collect();
    for (resource, n) in &counts {
        assert!(
            *n <= 8,
            "{resource}: {n} requests in {window:?} while the API server failed: {counts:?}"
        );
    }

    // Back up: the next attempt of each watcher succeeds and the change made meanwhile arrives.
    fra.apply("endpointslices", hello_on("10.1.0.2"));
    fra.set_unavailable(false);
    wait_for("the change made while failing published", || async {
        control.current_table("network1").is_some_and(|t| {
            crate::support::endpoint_addrs(&t, "helloworld.sample.svc.cluster.local")
                == ["10.1.0.2:5000"]
        })
    })
    .await;
    for (resource, n) in &counts {
        assert_eq!(
            fra.unavailable_count(resource),
            *n,
            "{resource} failed again after the server was back"
        );
    }
}
