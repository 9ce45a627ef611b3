//! Ambient mode: control fills each endpoint's `hbone_port` (15008 when ambient captured the
//! Pod behind it) and `workload` (as Istio's telemetry names the Pod) from watched Pods and
//! Namespaces, republishing when either changes, and never withholds an endpoint whose Pod it
//! does not know yet.

use crate::support::apiserver::ApiServer;
use crate::support::control::start_control;
use crate::support::objects::*;
use crate::support::wait_for;
use eastwest_control::Control;
use eastwest_routes::{Endpoint, Workload};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

/// The endpoints of `host`'s first port in fra's published table.
fn endpoints(control: &Control, host: &str) -> Vec<Endpoint> {
    control
        .current_table("network1")
        .and_then(|t| t.service(host).map(|s| s.ports[0].endpoints.clone()))
        .unwrap_or_default()
}

fn endpoint(control: &Control, host: &str, ip: &str) -> Option<Endpoint> {
    endpoints(control, host)
        .into_iter()
        .find(|e| e.address.ip().to_string() == ip)
}

/// Waits until the endpoint `ip` of `host` satisfies `want`; returns it.
async fn endpoint_when(
    control: &Control,
    host: &str,
    ip: &str,
    what: &str,
    want: impl Fn(&Endpoint) -> bool,
) -> Endpoint {
    wait_for(what, || {
        let ok = endpoint(control, host, ip).is_some_and(|e| want(&e));
        async move { ok }
    })
    .await;
    endpoint(control, host, ip).unwrap()
}

fn with_pod<'a>(ip: &'a str, pod: &'a str) -> Ep<'a> {
    Ep {
        pod: Some(pod),
        ..ready(ip)
    }
}

/// An ambient namespace `amb` and a sidecar namespace `side`, each with a Service `llm` whose
/// Pods are a Deployment's, a StatefulSet's, a bare Pod, an opted-out Pod, an istio-cni
/// annotated one, and one whose Pod object does not exist.
fn populate(api: &ApiServer) {
    api.apply("namespaces", labeled_namespace("amb", &[AMBIENT]));
    api.apply("namespaces", labeled_namespace("side", &[]));
    api.apply(
        "services",
        service("amb", "llm", &[("http", 8000), ("metrics", 9000)]),
    );
    api.apply("services", service("side", "llm", &[("http", 8000)]));
    let amb_eps = [
        with_pod("10.0.0.1", "llm-7d4b9c-x2x9q"),
        with_pod("10.0.0.2", "db-0"),
        with_pod("10.0.0.3", "debug"),
        with_pod("10.0.0.4", "legacy"),
        with_pod("10.0.0.5", "not-yet-seen"),
    ];
    api.apply(
        "endpointslices",
        slice(
            "amb",
            "llm-1",
            "llm",
            &[("http", 8000), ("metrics", 9000)],
            &amb_eps,
        ),
    );
    api.apply(
        "pods",
        owned_pod(
            "amb",
            "llm-7d4b9c-x2x9q",
            Some(("ReplicaSet", "llm-7d4b9c")),
            &[
                ("pod-template-hash", "7d4b9c"),
                ("app", "llm"),
                ("version", "v2"),
                ("service.istio.io/canonical-name", "llm-canonical"),
            ],
            &[],
            "llm-sa",
        ),
    );
    api.apply(
        "pods",
        owned_pod(
            "amb",
            "db-0",
            Some(("StatefulSet", "db")),
            &[
                ("app.kubernetes.io/name", "db"),
                ("app.kubernetes.io/version", "16"),
            ],
            &[],
            "db",
        ),
    );
    api.apply("pods", owned_pod("amb", "debug", None, &[], &[], "default"));
    api.apply(
        "pods",
        owned_pod(
            "amb",
            "legacy",
            None,
            &[("istio.io/dataplane-mode", "none")],
            &[],
            "default",
        ),
    );
    api.apply(
        "endpointslices",
        slice(
            "side",
            "llm-1",
            "llm",
            &[("http", 8000)],
            &[
                with_pod("10.1.0.1", "sidecar"),
                with_pod("10.1.0.2", "captured"),
            ],
        ),
    );
    api.apply(
        "pods",
        owned_pod(
            "side",
            "sidecar",
            None,
            &[("app", "llm")],
            &[("sidecar.istio.io/status", "{}")],
            "llm",
        ),
    );
    api.apply(
        "pods",
        owned_pod(
            "side",
            "captured",
            None,
            &[],
            &[("ambient.istio.io/redirection", "enabled")],
            "llm",
        ),
    );
}

const AMB: &str = "llm.amb.svc.cluster.local";
const SIDE: &str = "llm.side.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_pods_get_hbone_15008_and_every_pod_its_workload() {
    let api = ApiServer::start().await;
    populate(&api);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&api, dir.path(), |_| {}).await;

    let llm = endpoint_when(
        &control,
        AMB,
        "10.0.0.1",
        "the Deployment pod's workload",
        |e| e.workload.is_some(),
    )
    .await;
    assert_eq!(llm.hbone_port, Some(15008), "ambient namespace");
    assert_eq!(
        llm.workload.as_deref(),
        Some(&Workload {
            name: "llm".into(),
            namespace: "amb".into(),
            app: Some("llm".into()),
            version: Some("v2".into()),
            service_account: Some("llm-sa".into()),
            cluster: Some("fra".into()),
        })
    );
    let db = endpoint(&control, AMB, "10.0.0.2").unwrap();
    assert_eq!(db.hbone_port, Some(15008));
    let w = db.workload.unwrap();
    assert_eq!(
        (w.name.as_str(), w.app.as_deref(), w.version.as_deref()),
        ("db", Some("db"), Some("16"))
    );
    let bare = endpoint(&control, AMB, "10.0.0.3").unwrap();
    assert_eq!(bare.hbone_port, Some(15008));
    assert_eq!(
        bare.workload.unwrap().name,
        "debug",
        "a bare pod is its own workload"
    );
    let opted_out = endpoint(&control, AMB, "10.0.0.4").unwrap();
    assert_eq!(
        opted_out.hbone_port, None,
        "istio.io/dataplane-mode=none on the pod"
    );
    assert_eq!(opted_out.workload.unwrap().name, "legacy");
    // Its Pod is unknown: still routed, without the Pod's facts.
    let unknown = endpoint(&control, AMB, "10.0.0.5").unwrap();
    assert_eq!((unknown.hbone_port, unknown.workload), (None, None));

    let sidecar = endpoint(&control, SIDE, "10.1.0.1").unwrap();
    assert_eq!(
        sidecar.hbone_port, None,
        "sidecar pod in a sidecar namespace"
    );
    assert_eq!(sidecar.workload.unwrap().app.as_deref(), Some("llm"));
    let captured = endpoint(&control, SIDE, "10.1.0.2").unwrap();
    assert_eq!(
        captured.hbone_port,
        Some(15008),
        "istio-cni's redirection annotation"
    );

    // A Pod's endpoints in every port carry its workload.
    let table = control.current_table("network1").unwrap();
    let ports = &table.service(AMB).unwrap().ports;
    let (http, metrics) = (&ports[0].endpoints[0], &ports[1].endpoints[0]);
    assert_eq!(http.address.ip(), metrics.address.ip());
    assert_eq!(http.workload, metrics.workload);
    // The compact route JSON: an endpoint without Pod facts is just its address.
    let json = serde_json::to_value(endpoint(&control, AMB, "10.0.0.5").unwrap()).unwrap();
    assert_eq!(json, serde_json::json!({"address": "10.0.0.5:8000"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_labels_and_late_pods_republish_endpoints() {
    let api = ApiServer::start().await;
    populate(&api);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&api, dir.path(), |_| {}).await;
    endpoint_when(&control, SIDE, "10.1.0.2", "the captured pod", |e| {
        e.hbone_port.is_some()
    })
    .await;
    assert_eq!(
        endpoint(&control, AMB, "10.0.0.3").unwrap().hbone_port,
        Some(15008)
    );

    // `side` joins ambient: its unannotated, sidecar-less pods would be captured; the sidecar
    // pod never is.
    api.apply("pods", owned_pod("side", "plain", None, &[], &[], "llm"));
    api.apply(
        "endpointslices",
        slice(
            "side",
            "llm-1",
            "llm",
            &[("http", 8000)],
            &[
                with_pod("10.1.0.1", "sidecar"),
                with_pod("10.1.0.2", "captured"),
                with_pod("10.1.0.3", "plain"),
            ],
        ),
    );
    endpoint_when(&control, SIDE, "10.1.0.3", "the new endpoint", |e| {
        e.workload.is_some()
    })
    .await;
    assert_eq!(
        endpoint(&control, SIDE, "10.1.0.3").unwrap().hbone_port,
        None
    );
    api.apply("namespaces", labeled_namespace("side", &[AMBIENT]));
    endpoint_when(
        &control,
        SIDE,
        "10.1.0.3",
        "side's plain pod on 15008",
        |e| e.hbone_port == Some(15008),
    )
    .await;
    assert_eq!(
        endpoint(&control, SIDE, "10.1.0.1").unwrap().hbone_port,
        None
    );

    // `amb` leaves ambient: its pods go back to 15443 (hbone_port None).
    api.apply("namespaces", labeled_namespace("amb", &[]));
    endpoint_when(&control, AMB, "10.0.0.3", "amb's bare pod off 15008", |e| {
        e.hbone_port.is_none()
    })
    .await;

    // The Pod that was unknown arrives: its endpoint is republished with its facts.
    api.apply(
        "pods",
        owned_pod(
            "amb",
            "not-yet-seen",
            Some(("ReplicaSet", "web-5f6d7")),
            &[("pod-template-hash", "5f6d7")],
            &[("ambient.istio.io/redirection", "enabled")],
            "web",
        ),
    );
    let late = endpoint_when(&control, AMB, "10.0.0.5", "the late pod's workload", |e| {
        e.workload.is_some()
    })
    .await;
    assert_eq!(late.hbone_port, Some(15008));
    assert_eq!(late.workload.unwrap().name, "web");
}

/// `host`'s first port's waypoint endpoints in fra's published table, as `ip:port` strings.
fn waypoint(control: &Control, host: &str) -> Vec<String> {
    control
        .current_table("network1")
        .and_then(|t| {
            t.service(host).map(|s| {
                s.ports[0]
                    .waypoint
                    .iter()
                    .map(|e| {
                        assert_eq!(e.hbone_port, Some(15008), "{e:?}");
                        e.address.to_string()
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}

async fn waypoint_when(control: &Control, host: &str, want: &[&str]) {
    wait_for(&format!("{host}'s waypoint to be {want:?}"), || {
        let ok = waypoint(control, host) == want;
        async move { ok }
    })
    .await;
}

fn labeled_service(ns: &str, name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let mut s = service(ns, name, &[("http", 8000)]);
    s["metadata"]["labels"] = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    s
}

const USE: &str = "istio.io/use-waypoint";
const USE_NS: &str = "istio.io/use-waypoint-namespace";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_behind_a_waypoint_publish_its_hbone_endpoints() {
    let api = ApiServer::start().await;
    // shop: every Service uses waypoint `wp` (namespace label) but `admin` (opted out) and
    // `pay` (another namespace's waypoint).
    api.apply(
        "namespaces",
        labeled_namespace("shop", &[AMBIENT, (USE, "wp")]),
    );
    api.apply("namespaces", labeled_namespace("infra", &[AMBIENT]));
    api.apply("namespaces", labeled_namespace("plain", &[AMBIENT]));
    api.apply("services", labeled_service("shop", "cart", &[]));
    api.apply(
        "services",
        labeled_service("shop", "admin", &[(USE, "none")]),
    );
    api.apply(
        "services",
        labeled_service("shop", "pay", &[(USE, "edge"), (USE_NS, "infra")]),
    );
    api.apply("services", labeled_service("shop", "wp", &[]));
    api.apply("services", labeled_service("infra", "edge", &[]));
    // plain/solo uses a waypoint with no ready endpoint.
    api.apply(
        "services",
        labeled_service("plain", "solo", &[(USE, "lonely")]),
    );
    api.apply("services", labeled_service("plain", "lonely", &[]));
    for (ns, svc, ip) in [
        ("shop", "cart", "10.4.0.1"),
        ("shop", "admin", "10.4.0.2"),
        ("shop", "pay", "10.4.0.3"),
    ] {
        api.apply(
            "endpointslices",
            slice(
                ns,
                &format!("{svc}-1"),
                svc,
                &[("http", 8000)],
                &[ready(ip)],
            ),
        );
    }
    api.apply(
        "endpointslices",
        slice(
            "plain",
            "solo-1",
            "solo",
            &[("http", 8000)],
            &[with_pod("10.4.0.4", "solo-0")],
        ),
    );
    api.apply(
        "pods",
        owned_pod("plain", "solo-0", None, &[], &[], "default"),
    );
    api.apply(
        "endpointslices",
        slice(
            "shop",
            "wp-1",
            "wp",
            &[("mesh", 15008)],
            &[ready("10.2.0.1")],
        ),
    );
    api.apply(
        "endpointslices",
        slice(
            "infra",
            "edge-1",
            "edge",
            &[("mesh", 15008)],
            &[ready("10.3.0.2"), not_ready("10.3.0.3"), ready("10.3.0.1")],
        ),
    );
    api.apply(
        "endpointslices",
        slice(
            "plain",
            "lonely-1",
            "lonely",
            &[("mesh", 15008)],
            &[not_ready("10.5.0.1")],
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&api, dir.path(), |_| {}).await;

    const CART: &str = "cart.shop.svc.cluster.local";
    const ADMIN: &str = "admin.shop.svc.cluster.local";
    const PAY: &str = "pay.shop.svc.cluster.local";
    const SOLO: &str = "solo.plain.svc.cluster.local";
    // The namespace's waypoint, at its HBONE port.
    waypoint_when(&control, CART, &["10.2.0.1:15008"]).await;
    // Another namespace's waypoint: its ready endpoints only.
    waypoint_when(&control, PAY, &["10.3.0.1:15008", "10.3.0.2:15008"]).await;
    assert!(waypoint(&control, ADMIN).is_empty(), "`none` opts out");
    assert_eq!(endpoints(&control, ADMIN).len(), 1);
    // The waypoint's own Service does not route through itself.
    assert!(waypoint(&control, "wp.shop.svc.cluster.local").is_empty());
    // A waypoint without a ready endpoint: hbone listeners get nothing to send to (fail
    // closed, 503), while the endpoint stays for 15443.
    let solo = endpoint_when(&control, SOLO, "10.4.0.4", "solo's pod", |e| {
        e.workload.is_some()
    })
    .await;
    assert_eq!(solo.hbone_port, None, "no HBONE past an absent waypoint");
    assert!(waypoint(&control, SOLO).is_empty());

    // The waypoint's endpoints come up: the Service using it is republished.
    api.apply(
        "endpointslices",
        slice(
            "plain",
            "lonely-1",
            "lonely",
            &[("mesh", 15008)],
            &[ready("10.5.0.1")],
        ),
    );
    waypoint_when(&control, SOLO, &["10.5.0.1:15008"]).await;
    assert_eq!(
        endpoint(&control, SOLO, "10.4.0.4").unwrap().hbone_port,
        Some(15008)
    );
    // The namespace drops its waypoint label: its Services are reached directly again.
    api.apply("namespaces", labeled_namespace("shop", &[AMBIENT]));
    waypoint_when(&control, CART, &[]).await;
    assert_eq!(
        waypoint(&control, PAY).len(),
        2,
        "its own label still holds"
    );
}
