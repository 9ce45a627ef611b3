//! Delta route streams (`&delta=1`): a full table first, then per version only what changed.
//! A real eastwest-proxy following the deltas through a sequence of adds, changes and removals
//! (local services, remote services, gateways) ends with exactly the table a fresh subscription
//! gets; streams without `&delta=1` still get whole tables.

use std::sync::Arc;
use std::time::Duration;

use crate::support::apiserver::ApiServer;
use crate::support::control::{gateway_following, start_control_with_remote};
use crate::support::objects::*;
use crate::support::{http_get, subscribe_h2c, wait_for};
use bytes::{Bytes, BytesMut};
use eastwest_control::Control;
use eastwest_proxy::Proxy;
use eastwest_routes::{RouteTable, RouteUpdate};
use http_body_util::BodyExt;

const HELLO: &str = "helloworld.sample.svc.cluster.local";
const DETAILS: &str = "details.sample.svc.cluster.local";
const RATINGS: &str = "ratings.sample.svc.cluster.local";
const REVIEWS: &str = "reviews.sample.svc.cluster.local";

fn svc_with_slice(api: &ApiServer, name: &str, ips: &[&str]) {
    api.apply("services", service("sample", name, &[("http", 80)]));
    let eps: Vec<Ep> = ips.iter().map(|ip| ready(ip)).collect();
    api.apply(
        "endpointslices",
        slice(
            "sample",
            &format!("{name}-1"),
            name,
            &[("http", 8080)],
            &eps,
        ),
    );
}

fn current(control: &Control) -> Arc<RouteTable> {
    control
        .current_table("network1")
        .unwrap_or_else(|| Arc::new(RouteTable::default()))
}

/// Waits until control publishes a table satisfying `cond` and `proxy` has applied it.
async fn step(control: &Control, proxy: &Proxy, what: &str, cond: impl Fn(&RouteTable) -> bool) {
    wait_for(what, || async { cond(&current(control)) }).await;
    let version = current(control).version;
    wait_for(&format!("proxy applies {what}"), || async {
        proxy.routes().version == version
    })
    .await;
}

#[tokio::test]
async fn a_delta_subscriber_ends_with_the_table_a_fresh_subscriber_gets() {
    let fra = ApiServer::start().await;
    let ash = ApiServer::start().await;
    ash.apply("namespaces", namespace("istio-system", Some("network2")));
    ash.apply(
        "services",
        gateway_service("istio-system", "istio-eastwestgateway", "192.0.2.20"),
    );
    svc_with_slice(&fra, "helloworld", &["10.1.0.1"]);
    svc_with_slice(&fra, "ratings", &["10.1.1.1", "10.1.1.2"]);
    svc_with_slice(&ash, "reviews", &["10.2.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote(&fra, &ash, dir.path()).await;
    let follower = gateway_following(&control).await;
    step(&control, &follower, "the first table", |t| {
        t.service(HELLO).is_some() && t.remote_services.iter().any(|r| r.hostname == REVIEWS)
    })
    .await;

    svc_with_slice(&fra, "details", &["10.1.2.1"]);
    step(&control, &follower, "details added", |t| {
        t.service(DETAILS).is_some()
    })
    .await;
    svc_with_slice(&fra, "helloworld", &["10.1.0.1", "10.1.0.2"]);
    step(&control, &follower, "helloworld changed", |t| {
        t.service(HELLO)
            .is_some_and(|s| s.ports[0].endpoints.len() == 2)
    })
    .await;
    fra.delete("endpointslices", "sample", "ratings-1");
    fra.delete("services", "sample", "ratings");
    step(&control, &follower, "ratings removed", |t| {
        t.service(RATINGS).is_none()
    })
    .await;
    ash.apply(
        "services",
        gateway_service("istio-system", "istio-eastwestgateway", "192.0.2.21"),
    );
    step(&control, &follower, "the gateway moved", |t| {
        t.network_gateways
            .iter()
            .any(|g| g.address.starts_with("192.0.2.21"))
    })
    .await;
    ash.delete("endpointslices", "sample", "reviews-1");
    step(&control, &follower, "reviews gone", |t| {
        t.remote_services.is_empty()
    })
    .await;

    let (_, metrics) = http_get(follower.metrics_addr(), "/metrics").await;
    let deltas: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("eastwest_route_updates_total{kind=\"delta\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        deltas >= 5.0,
        "the follower applied {deltas} deltas\n{metrics}"
    );

    let fresh = gateway_following(&control).await;
    let version = follower.routes().version;
    wait_for("the fresh subscriber's table", || async {
        fresh.routes().version == version
    })
    .await;
    let followed = follower.config().routes.clone();
    assert_eq!(followed, fresh.config().routes);
    assert_eq!(followed, *current(&control));
    let mut recomputed = control.recomputed_table("network1");
    recomputed.version = version;
    assert_eq!(followed, recomputed);
    assert_eq!(followed.service(HELLO).unwrap().ports[0].endpoints.len(), 2);
    // What an operator sees: /config_dump shows the whole table at that version.
    let (status, dump) = http_get(follower.debug_addr(), "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["route_table_version"], serde_json::json!(version));
    let dumped: RouteTable = serde_json::from_value(dump["config"]["routes"].clone()).unwrap();
    assert_eq!(dumped, followed);
}

/// Reads NDJSON lines of a raw route subscription.
struct RawStream {
    body: hyper::body::Incoming,
    buf: BytesMut,
}

impl RawStream {
    async fn open(control: &Control, query: &str) -> RawStream {
        let resp = subscribe_h2c(control.routes_addr(), query).await;
        assert_eq!(resp.status(), 200);
        RawStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
        }
    }

    async fn line(&mut self) -> Bytes {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                return self.buf.split_to(pos + 1).freeze();
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), self.body.frame())
                .await
                .expect("no line within 20 s")
                .expect("stream ended")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}

#[tokio::test]
async fn delta_lines_only_for_those_who_ask() {
    let fra = ApiServer::start().await;
    let ash = ApiServer::start().await;
    svc_with_slice(&fra, "helloworld", &["10.1.0.1"]);
    svc_with_slice(&fra, "ratings", &["10.1.1.1"]);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote(&fra, &ash, dir.path()).await;
    let mut plain = RawStream::open(&control, "cluster=fra&network=network1").await;
    let mut delta = RawStream::open(&control, "cluster=fra&network=network1&delta=1").await;

    let table: RouteTable = serde_json::from_slice(&plain.line().await).unwrap();
    let Ok(RouteUpdate::Full(first)) = serde_json::from_slice(&delta.line().await) else {
        panic!("a delta stream starts with a full table");
    };
    assert_eq!(first, table);

    svc_with_slice(&fra, "helloworld", &["10.1.0.2"]);
    let next: RouteTable = serde_json::from_slice(&plain.line().await).unwrap();
    let line = delta.line().await;
    let Ok(RouteUpdate::Delta(d)) = serde_json::from_slice(&line) else {
        panic!("then deltas: {}", String::from_utf8_lossy(&line));
    };
    assert_eq!((d.base, d.version), (table.version, next.version));
    // Only the changed service travels.
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].hostname, HELLO);
    assert!(d.network_gateways.is_none());
    assert_eq!(d.apply_to(&first).unwrap(), next);
}
