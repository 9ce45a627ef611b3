use super::*;
use crate::destination_rules::subsets;
use kube::api::DynamicObject;
use serde_json::json;

const DOMAIN: &str = "cluster.local";
const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

fn service(name: &str) -> K8sService {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"ports": [{"name": "http", "port": 9080}]}}))
    .unwrap()
}

fn rule() -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "bookinfo"},
        "spec": {"host": REVIEWS, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}))
    .unwrap()
}

fn list_services(c: &mut ClusterState, names: &[&str]) {
    c.services
        .apply(watcher::Event::<K8sService>::Init, ServiceDef::from_k8s);
    for n in names {
        c.services
            .apply(watcher::Event::InitApply(service(n)), ServiceDef::from_k8s);
    }
    c.services
        .apply(watcher::Event::<K8sService>::InitDone, ServiceDef::from_k8s);
}

fn list_rules(c: &mut ClusterState, rules: &[DynamicObject]) {
    let drs = &mut c.destination_rules;
    drs.apply("ash", watcher::Event::Init, DOMAIN, &[]);
    for r in rules {
        drs.apply("ash", watcher::Event::InitApply(r.clone()), DOMAIN, &[]);
    }
    drs.apply("ash", watcher::Event::InitDone, DOMAIN, &[]);
}

/// Lists (empty) EndpointSlices, Pods and Namespaces, and the `reviews` rule: with Services
/// listed, the cluster is synced.
fn list_the_rest(c: &mut ClusterState) {
    c.slices
        .apply(watcher::Event::<EndpointSlice>::Init, SliceDef::from_k8s);
    c.slices.apply(
        watcher::Event::<EndpointSlice>::InitDone,
        SliceDef::from_k8s,
    );
    c.pods.apply(watcher::Event::Init, &[], "fra");
    c.namespaces.apply(watcher::Event::Init);
    c.pods.apply(watcher::Event::InitDone, &[], "fra");
    c.namespaces.apply(watcher::Event::InitDone);
    list_rules(c, &[rule()]);
}

fn synced_cluster() -> ClusterState {
    let mut c = ClusterState::new(1);
    c.network = Some("network1".into());
    list_services(&mut c, &["reviews"]);
    list_the_rest(&mut c);
    assert!(c.synced());
    c
}

fn reviews_subsets(c: ClusterState) -> (ClusterState, Vec<String>) {
    let mut m = Model::default();
    m.clusters.insert("ash".into(), c);
    let key = ("bookinfo".to_string(), "reviews".to_string());
    let names = subsets(&m, "network1", &key, REVIEWS)
        .into_iter()
        .map(|s| s.name)
        .collect();
    (m.clusters.remove("ash").unwrap(), names)
}

#[test]
fn a_restart_keeps_objects_reported_synced_until_the_new_watch_lists() {
    let mut c = synced_cluster();
    c.restart(2);
    assert_eq!(c.id, 2);
    assert!(!c.synced(), "the flags now say what watch 2 listed");
    assert!(c.reported_synced(), "the previous watch's objects stand in");
    assert_eq!(c.services.objects.len(), 1);
    let (c, names) = reviews_subsets(c);
    assert_eq!(names, ["v1"]);
    assert!(c.reported_synced());
}

#[test]
fn past_the_sync_timeout_unlisted_objects_stay_until_the_new_watch_lists() {
    let mut c = synced_cluster();
    c.restart(2);
    // Watch 2 is half-way through listing Services and has listed nothing else.
    c.services
        .apply(watcher::Event::<K8sService>::Init, ServiceDef::from_k8s);
    c.services.apply(
        watcher::Event::InitApply(service("ratings")),
        ServiceDef::from_k8s,
    );

    assert!(c.stop_standing_in());
    assert!(!c.reported_synced(), "tables are partial from now on");
    assert_eq!(c.services.objects.len(), 1, "nothing is withdrawn");
    let (mut c, names) = reviews_subsets(c);
    assert_eq!(names, ["v1"], "the rules stay too");

    // The list in progress completes with what it had received: the new list replaces the old.
    c.services
        .apply(watcher::Event::<K8sService>::InitDone, ServiceDef::from_k8s);
    let listed: Vec<&ObjKey> = c.services.objects.keys().collect();
    assert_eq!(listed, [&("bookinfo".to_string(), "ratings".to_string())]);
    list_the_rest(&mut c);
    assert!(c.synced() && c.reported_synced());
    assert!(!c.stop_standing_in());
    let (_, names) = reviews_subsets(c);
    assert_eq!(names, ["v1"]);
}

#[test]
fn a_pods_endpoints_in_every_port_share_one_workload() {
    use k8s_openapi::api::core::v1::Pod;
    let mut c = ClusterState::new(1);
    c.network = Some("network1".into());
    let svc: K8sService = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "bookinfo"},
        "spec": {"ports": [{"name": "http", "port": 9080}, {"name": "grpc", "port": 9090}]}}))
    .unwrap();
    c.services
        .apply(watcher::Event::Apply(svc), ServiceDef::from_k8s);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1", "namespace": "bookinfo",
                     "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9080}, {"name": "grpc", "port": 9090}],
        "endpoints": [{"addresses": ["10.0.0.1"],
                       "targetRef": {"kind": "Pod", "namespace": "bookinfo", "name": "reviews-0"}}]}))
    .unwrap();
    c.slices
        .apply(watcher::Event::Apply(slice), SliceDef::from_k8s);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reviews-0", "namespace": "bookinfo", "labels": {"app": "reviews"}}}))
    .unwrap();
    c.pods.apply(watcher::Event::Apply(pod), &[], "fra");
    let mut model = Model::default();
    model.clusters.insert("fra".into(), c);
    let table = crate::compute::route_table(&model, "network1", DOMAIN);
    let ports = &table.service(REVIEWS).unwrap().ports;
    let (a, b) = (&ports[0].endpoints[0], &ports[1].endpoints[0]);
    assert_eq!(a.workload.as_ref().unwrap().name, "reviews-0");
    assert!(Arc::ptr_eq(
        a.workload.as_ref().unwrap(),
        b.workload.as_ref().unwrap()
    ));
}
