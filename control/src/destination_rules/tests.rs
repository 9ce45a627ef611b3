use super::*;
use crate::model::ClusterState;
use serde_json::json;

const DOMAIN: &str = "cluster.local";
const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

fn rule(ns: &str, name: &str, host: &str, subsets: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"host": host, "subsets": subsets}}))
    .unwrap()
}

fn version_subsets(versions: &[&str]) -> serde_json::Value {
    versions
        .iter()
        .map(|v| json!({"name": v, "labels": {"version": v}}))
        .collect()
}

fn keep() -> Vec<String> {
    vec!["version".to_string()]
}

fn names(subsets: &[Subset]) -> Vec<&str> {
    subsets.iter().map(|s| s.name.as_str()).collect()
}

/// A model whose clusters (name, network) hold `rules`.
fn model(clusters: &[(&str, &str, Vec<DynamicObject>)]) -> Model {
    let mut m = Model::default();
    for (name, net, rules) in clusters {
        let mut c = ClusterState::new(1);
        c.network = Some(net.to_string());
        let drs = &mut c.destination_rules;
        drs.apply(name, watcher::Event::Init, DOMAIN, &keep());
        for r in rules {
            drs.apply(name, watcher::Event::InitApply(r.clone()), DOMAIN, &keep());
        }
        drs.apply(name, watcher::Event::InitDone, DOMAIN, &keep());
        m.clusters.insert(name.to_string(), c);
    }
    m
}

fn reviews_subsets(m: &Model) -> Vec<Subset> {
    subsets(
        m,
        "network1",
        &("bookinfo".into(), "reviews".into()),
        REVIEWS,
    )
}

#[test]
fn hosts_resolve_like_istio() {
    let r = |h| Host::resolve(h, "bookinfo", DOMAIN);
    assert_eq!(r("reviews"), Host::Exact(REVIEWS.into()));
    assert_eq!(
        r("Reviews.bookinfo.svc.cluster.local."),
        Host::Exact(REVIEWS.into())
    );
    // Istio does not expand a name with a dot.
    assert_eq!(
        r("reviews.bookinfo"),
        Host::Exact("reviews.bookinfo".into())
    );
    assert_eq!(r("*"), Host::Wildcard(String::new()));
    assert_eq!(
        r("*.bookinfo.svc.cluster.local"),
        Host::Wildcard(".bookinfo.svc.cluster.local".into())
    );
    assert_eq!(
        r("reviews").service_key(DOMAIN),
        Some(("bookinfo".into(), "reviews".into()))
    );
    assert_eq!(r("reviews.bookinfo").service_key(DOMAIN), None);
    assert_eq!(r("a.b.c.svc.cluster.local").service_key(DOMAIN), None);
}

#[test]
fn the_services_namespace_wins_then_the_root_namespace_then_any() {
    let own = rule("bookinfo", "own", "reviews", version_subsets(&["v1"]));
    let root = rule(ROOT_NAMESPACE, "root", REVIEWS, version_subsets(&["v2"]));
    let other = rule("tenant", "other", REVIEWS, version_subsets(&["v3"]));
    let all = model(&[("fra", "network1", vec![own, root.clone(), other.clone()])]);
    assert_eq!(names(&reviews_subsets(&all)), ["v1"]);
    let fallback = model(&[("fra", "network1", vec![root, other.clone()])]);
    assert_eq!(names(&reviews_subsets(&fallback)), ["v2"]);
    let elsewhere = model(&[("fra", "network1", vec![other])]);
    assert_eq!(names(&reviews_subsets(&elsewhere)), ["v3"]);
}

#[test]
fn an_exact_host_beats_wildcards_and_rules_merge_across_clusters() {
    let wide = rule("bookinfo", "wide", "*", version_subsets(&["any"]));
    let narrow = rule(
        "bookinfo",
        "narrow",
        "*.bookinfo.svc.cluster.local",
        version_subsets(&["ns"]),
    );
    let wildcards = model(&[("fra", "network1", vec![wide.clone(), narrow])]);
    assert_eq!(names(&reviews_subsets(&wildcards)), ["ns"]);
    let exact = rule(
        "bookinfo",
        "exact",
        "reviews",
        version_subsets(&["v1", "v2"]),
    );
    // The same subset name in another network's cluster loses to this network's definition.
    let mut remote = rule(
        "bookinfo",
        "exact",
        "reviews",
        json!([
        {"name": "v2", "labels": {"version": "other"}},
        {"name": "v3", "labels": {"version": "v3"}}]),
    );
    remote.metadata.namespace = Some("bookinfo".into());
    let m = model(&[
        ("ash", "network2", vec![remote]),
        ("fra", "network1", vec![exact, wide]),
    ]);
    let got = reviews_subsets(&m);
    assert_eq!(names(&got), ["v1", "v2", "v3"]);
    assert_eq!(got[1].labels["version"], "v2");
}

#[test]
fn bad_subsets_are_dropped_with_a_reason_and_unkept_label_keys_are_named() {
    let r = rule(
        "bookinfo",
        "r",
        "reviews",
        json!([
        {"name": "V1", "labels": {"version": "v1"}},
        {"name": "all"},
        {"name": "canary", "labels": {"track": "canary"}},
        {"name": "canary", "labels": {"version": "v9"}}]),
    );
    let (def, problems) = convert(&r, DOMAIN, &keep());
    let def = def.unwrap();
    assert_eq!(names(&def.subsets), ["canary"]);
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(problems[0].starts_with("spec.subsets[0].name"));
    assert!(problems[1].contains("has no labels"));
    assert!(problems[2].contains("\"track\"") && problems[2].contains("--subset-labels"));
    assert!(problems[3].contains("defined twice"));

    let no_host: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "x", "namespace": "bookinfo"}, "spec": {"subsets": []}}))
    .unwrap();
    let (def, problems) = convert(&no_host, DOMAIN, &keep());
    assert!(def.is_none());
    assert!(problems[0].contains("host"), "{problems:?}");
    let empty = rule("bookinfo", "e", " ", version_subsets(&["v1"]));
    let (def, problems) = convert(&empty, DOMAIN, &keep());
    assert!(def.is_none());
    assert_eq!(problems, ["spec.host is empty; rule ignored"]);
}

#[test]
fn changes_name_the_services_they_affect() {
    let mut drs = DestinationRules::default();
    let ev = |r: &DynamicObject| watcher::Event::Apply(r.clone());
    let r = rule("bookinfo", "r", "reviews", version_subsets(&["v1"]));
    let got = drs.apply("fra", ev(&r), DOMAIN, &keep());
    assert_eq!(got.services, [("bookinfo".into(), "reviews".into())]);
    assert!(!got.all);
    assert_eq!(
        drs.apply("fra", ev(&r), DOMAIN, &keep()),
        Affected::default()
    );
    // Moving the rule to another host affects both Services.
    let moved = rule("bookinfo", "r", "ratings", version_subsets(&["v1"]));
    let mut got = drs.apply("fra", ev(&moved), DOMAIN, &keep()).services;
    got.sort();
    assert_eq!(
        got,
        [
            ("bookinfo".into(), "ratings".into()),
            ("bookinfo".into(), "reviews".into())
        ]
    );
    let wild = rule("bookinfo", "w", "*", version_subsets(&["v1"]));
    assert!(drs.apply("fra", ev(&wild), DOMAIN, &keep()).all);
    let gone = drs.apply("fra", watcher::Event::Delete(moved), DOMAIN, &keep());
    assert_eq!(gone.services, [("bookinfo".into(), "ratings".into())]);
    let cleared = drs.set_unavailable("404".into(), DOMAIN);
    assert!(cleared.all && drs.objects.is_empty() && drs.synced);
}

#[test]
fn a_rule_for_all_clients_beats_an_older_workload_scoped_one() {
    let mut scoped = rule(
        "bookinfo",
        "a-scoped",
        "reviews",
        json!([
        {"name": "v1", "labels": {"version": "scoped"}}]),
    );
    scoped.data["spec"]["workloadSelector"] = json!({"matchLabels": {"app": "productpage"}});
    scoped.metadata.creation_timestamp = serde_json::from_value(json!("2020-01-01T00:00:00Z")).ok();
    let mut all = rule(
        "bookinfo",
        "b-all",
        "reviews",
        version_subsets(&["v1", "v2"]),
    );
    all.metadata.creation_timestamp = serde_json::from_value(json!("2024-01-01T00:00:00Z")).ok();
    let m = model(&[("fra", "network1", vec![scoped, all])]);
    let got = reviews_subsets(&m);
    assert_eq!(names(&got), ["v1", "v2"]);
    assert_eq!(got[0].labels["version"], "v1");
}

/// What `f` logs.
fn logged(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Arc::default());
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let out = buf.0.lock().unwrap().clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn a_rules_problems_are_logged_once_across_relists_and_unavailability() {
    let no_host = rule("bookinfo", "no-host", " ", version_subsets(&["v1"]));
    let unlabelled = rule("bookinfo", "bare", "reviews", json!([{"name": "all"}]));
    let mut drs = DestinationRules::default();
    let list = |drs: &mut DestinationRules| {
        logged(|| {
            drs.apply("fra", watcher::Event::Init, DOMAIN, &keep());
            for r in [&no_host, &unlabelled] {
                drs.apply("fra", watcher::Event::InitApply(r.clone()), DOMAIN, &keep());
            }
            drs.apply("fra", watcher::Event::InitDone, DOMAIN, &keep());
        })
    };
    let first = list(&mut drs);
    assert!(first.contains("bookinfo/no-host") && first.contains("spec.host is empty"));
    assert!(first.contains("bookinfo/bare") && first.contains("has no labels"));
    // A relist, and the CRD going away and coming back, find the same rules: nothing new to say.
    assert_eq!(list(&mut drs), "");
    drs.set_unavailable("404".into(), DOMAIN);
    assert_eq!(list(&mut drs), "");
    // A rule that is fixed and broken again is reported again.
    let fixed = rule("bookinfo", "no-host", "ratings", version_subsets(&["v1"]));
    let again = logged(|| {
        drs.apply("fra", watcher::Event::Apply(fixed), DOMAIN, &keep());
        drs.apply(
            "fra",
            watcher::Event::Apply(no_host.clone()),
            DOMAIN,
            &keep(),
        );
    });
    assert!(again.contains("spec.host is empty"), "{again}");
}
