//! The proxy's route subscription (control_client) against an in-process HTTP/2 server that
//! speaks eastwest-control's wire protocol, scripted line by line: deltas are applied on top of
//! the full table; a delta for another version, or one failing validation, is refused and
//! counted, the routes in force keep working, and the proxy resubscribes for a full table.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::support::*;
use bytes::Bytes;
use eastwest_proxy::{control_client, Proxy};
use eastwest_routes::{RouteDelta, RouteTable, RouteUpdate, Service};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const OTHER: &str = "other.demo.svc.cluster.local";
const REJECTED: &str = "eastwest_route_tables_rejected_total";

/// A subscription the scripted control received: its query, and where to send its lines.
struct Subscription {
    query: String,
    lines: mpsc::UnboundedSender<Bytes>,
}

/// A response body fed line by line by the test.
struct Lines(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|l| l.map(|l| Ok(Frame::data(l))))
    }
}

/// An HTTP/2 (h2c) server on loopback that hands every route subscription to the test.
async fn scripted_control() -> (SocketAddr, mpsc::UnboundedReceiver<Subscription>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (subs_tx, subs_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let subs_tx = subs_tx.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                let (lines, rx) = mpsc::unbounded_channel();
                let query = req.uri().query().unwrap_or_default().to_string();
                let _ = subs_tx.send(Subscription { query, lines });
                async move { Ok::<_, Infallible>(http::Response::new(Lines(rx))) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, subs_rx)
}

async fn next_subscription(subs: &mut mpsc::UnboundedReceiver<Subscription>) -> Subscription {
    let sub = tokio::time::timeout(DEADLINE, subs.recv())
        .await
        .expect("no subscription in time")
        .unwrap();
    assert!(sub.query.contains("delta=1"), "{}", sub.query);
    sub
}

/// A proxy with no routes, subscribed to `control`.
async fn subscribed_proxy(control: SocketAddr) -> Proxy {
    let proxy = Proxy::start(passthrough_config("gw", vec![]))
        .await
        .unwrap();
    let applier = proxy.clone();
    tokio::spawn(control_client::run(
        control_client::ControlClientConfig::plain_text(
            format!("http://{control}"),
            "fra",
            "network1",
        ),
        move |t| applier.apply_routes(t),
    ));
    proxy
}

/// What every test starts from: two TLS echo backends that greet with their names, and a
/// proxy subscribed to a scripted control.
struct Setup {
    pki: Pki,
    one: SocketAddr,
    two: SocketAddr,
    proxy: Proxy,
    subs: mpsc::UnboundedReceiver<Subscription>,
}

async fn setup() -> Setup {
    let pki = pki();
    let one = tls_echo_backend("one", &pki.server).await;
    let two = tls_echo_backend("two", &pki.server).await;
    let (control, subs) = scripted_control().await;
    let proxy = subscribed_proxy(control).await;
    Setup {
        pki,
        one,
        two,
        proxy,
        subs,
    }
}

/// sglang:8000 served by `backend` alone.
fn sglang_on(backend: SocketAddr) -> Vec<Service> {
    vec![service(SGLANG, 8000, &[(backend, &[])])]
}

fn full(version: u64, services: Vec<Service>) -> Bytes {
    let table = RouteTable {
        version,
        services: services.into_iter().map(Arc::new).collect(),
        ..Default::default()
    };
    line(&RouteUpdate::Full(table))
}

fn delta(version: u64, base: u64, services: Vec<Service>, removed: &[&str]) -> Bytes {
    line(&RouteUpdate::Delta(RouteDelta {
        version,
        base,
        services: services.into_iter().map(Arc::new).collect(),
        removed_services: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }))
}

fn line(update: &RouteUpdate) -> Bytes {
    let mut l = serde_json::to_vec(update).unwrap();
    l.push(b'\n');
    Bytes::from(l)
}

async fn wait_version(proxy: &Proxy, version: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while proxy.routes().version != version {
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy stayed at version {}, wanted {version}",
            proxy.routes().version
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The proxy's first subscription, answered with a full table at `version` that routes SGLANG
/// to `backend`; returns once the proxy has applied it.
async fn first_table(
    proxy: &Proxy,
    subs: &mut mpsc::UnboundedReceiver<Subscription>,
    version: u64,
    backend: SocketAddr,
) -> Subscription {
    let sub = next_subscription(subs).await;
    sub.lines.send(full(version, sglang_on(backend))).unwrap();
    wait_version(proxy, version).await;
    sub
}

/// Which backend a new connection to SGLANG reaches.
async fn routed_to(proxy: &Proxy, pki: &Pki) -> String {
    let gw = proxy.listener_addr("gw").unwrap();
    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    let greeting = greeting(&mut tls).await;
    greeting.split(' ').next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn deltas_apply_on_the_full_table_and_a_wrong_base_resyncs() {
    let Setup {
        pki,
        one,
        two,
        proxy,
        mut subs,
    } = setup().await;
    let sub = first_table(&proxy, &mut subs, 10, one).await;
    assert_eq!(routed_to(&proxy, &pki).await, "one");

    // A changed service and an added one.
    sub.lines
        .send(delta(
            11,
            10,
            vec![
                service(SGLANG, 8000, &[(two, &[])]),
                service(OTHER, 80, &[(one, &[])]),
            ],
            &[],
        ))
        .unwrap();
    wait_version(&proxy, 11).await;
    assert_eq!(routed_to(&proxy, &pki).await, "two");
    let expected = RouteTable {
        version: 11,
        services: vec![
            Arc::new(service(OTHER, 80, &[(one, &[])])),
            Arc::new(service(SGLANG, 8000, &[(two, &[])])),
        ],
        ..Default::default()
    };
    assert_eq!(proxy.config().routes, expected);

    // A removal.
    sub.lines.send(delta(12, 11, vec![], &[OTHER])).unwrap();
    wait_version(&proxy, 12).await;
    assert!(proxy.routes().service(OTHER).is_none());

    // Version 13 never arrived: a delta from 13 must not be applied to 12.
    sub.lines.send(delta(14, 13, sglang_on(one), &[])).unwrap();
    let resync = next_subscription(&mut subs).await;
    assert_eq!(proxy.routes().version, 12);
    assert_eq!(routed_to(&proxy, &pki).await, "two");
    resync.lines.send(full(14, sglang_on(one))).unwrap();
    wait_version(&proxy, 14).await;
    assert_eq!(routed_to(&proxy, &pki).await, "one");
    // And deltas go on from the resynced table.
    resync
        .lines
        .send(delta(15, 14, vec![service(OTHER, 80, &[(two, &[])])], &[]))
        .unwrap();
    wait_version(&proxy, 15).await;
    assert_eq!(proxy.routes().services.len(), 2);
}

#[tokio::test]
async fn an_invalid_delta_is_refused_counted_and_the_old_routes_keep_working() {
    let Setup {
        pki,
        one,
        two,
        proxy,
        mut subs,
    } = setup().await;
    let sub = first_table(&proxy, &mut subs, 1, one).await;
    let rejected = metric(&proxy, REJECTED).await;

    // The same endpoint twice: the delta fails validation.
    sub.lines
        .send(delta(
            2,
            1,
            vec![service(SGLANG, 8000, &[(two, &[]), (two, &[])])],
            &[],
        ))
        .unwrap();
    let resync = next_subscription(&mut subs).await;
    wait_metric(&proxy, REJECTED, rejected + 1.0).await;
    assert_eq!(proxy.routes().version, 1);
    assert_eq!(routed_to(&proxy, &pki).await, "one");

    // Not JSON at all: refused the same way.
    resync
        .lines
        .send(Bytes::from_static(b"{\"delta\":\n"))
        .unwrap();
    let resync = next_subscription(&mut subs).await;
    assert_eq!(routed_to(&proxy, &pki).await, "one");

    resync.lines.send(full(2, sglang_on(two))).unwrap();
    wait_version(&proxy, 2).await;
    assert_eq!(routed_to(&proxy, &pki).await, "two");
}

/// A delta that is fine on its own but whose table would list a service twice (hostnames
/// differing only in case) is refused like a bad table: the old routes stay, and the stream
/// goes on with control's next delta.
#[tokio::test]
async fn a_delta_making_a_duplicate_hostname_is_refused_and_the_stream_goes_on() {
    let Setup {
        pki,
        one,
        two,
        proxy,
        mut subs,
    } = setup().await;
    let sub = first_table(&proxy, &mut subs, 1, one).await;
    let shouting = SGLANG.to_uppercase();
    sub.lines
        .send(delta(
            2,
            1,
            vec![service(&shouting, 8000, &[(two, &[])])],
            &[],
        ))
        .unwrap();
    // Then control takes it back and changes the real one.
    sub.lines
        .send(delta(3, 2, sglang_on(two), &[&shouting]))
        .unwrap();
    wait_version(&proxy, 3).await;
    assert_eq!(routed_to(&proxy, &pki).await, "two");
    assert_eq!(proxy.routes().services.len(), 1);
    // No resubscription was needed.
    assert!(subs.try_recv().is_err());
}

/// A control from before deltas ignores `&delta=1` and sends bare tables: still applied.
#[tokio::test]
async fn bare_tables_from_an_older_control_are_applied() {
    let Setup {
        pki,
        one,
        two,
        proxy,
        mut subs,
    } = setup().await;
    let sub = next_subscription(&mut subs).await;
    for (version, backend) in [(1, one), (2, two)] {
        let table = RouteTable {
            version,
            services: vec![Arc::new(service(SGLANG, 8000, &[(backend, &[])]))],
            ..Default::default()
        };
        let mut line = serde_json::to_vec(&table).unwrap();
        line.push(b'\n');
        sub.lines.send(Bytes::from(line)).unwrap();
        wait_version(&proxy, version).await;
    }
    assert_eq!(routed_to(&proxy, &pki).await, "two");
    assert!(subs.try_recv().is_err());
}

/// A control that accepts the connection but never answers (wedged, or only its kernel's
/// backlog alive) is given up on after `subscribe_timeout`, and the proxy tries again rather
/// than waiting on it forever with stale routes.
#[tokio::test]
async fn a_control_that_never_answers_is_given_up_on_and_retried() {
    let wedged = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = wedged.local_addr().unwrap();
    let proxy = Proxy::start(passthrough_config("gw-wedged", vec![]))
        .await
        .unwrap();
    let cfg = control_client::ControlClientConfig {
        subscribe_timeout: std::time::Duration::from_millis(200),
        ..control_client::ControlClientConfig::plain_text(
            format!("http://{addr}"),
            "ash",
            "network2",
        )
    };
    let client = tokio::spawn(control_client::run(cfg, move |t| proxy.apply_routes(t)));
    // Accepted and held open, never answered.
    let (_first, _) = tokio::time::timeout(DEADLINE, wedged.accept())
        .await
        .expect("the proxy never connected")
        .unwrap();
    let (_second, _) = tokio::time::timeout(DEADLINE, wedged.accept())
        .await
        .expect("the proxy never gave up on the silent control")
        .unwrap();
    client.abort();
}

/// A table marked partial (some cluster has not synced at control) that would withdraw more
/// than half of the routed services is held: the old routes keep working, the hold is counted
/// (the counter exists at 0 before), and the table is not cached. A partial table that keeps
/// most routes is applied but not cached; a complete one is applied and cached whatever it
/// withdraws.
#[tokio::test]
async fn a_partial_table_withdrawing_most_routes_is_held_and_never_cached() {
    const HELD: &str = "eastwest_route_tables_held_total";
    let pki = pki();
    let one = tls_echo_backend("one", &pki.server).await;
    let (control, mut subs) = scripted_control().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("routes.json");
    let proxy = Proxy::start(passthrough_config("gw", vec![]))
        .await
        .unwrap();
    let applier = proxy.clone();
    tokio::spawn(control_client::run(
        control_client::ControlClientConfig {
            route_cache: Some(cache.clone()),
            ..control_client::ControlClientConfig::plain_text(
                format!("http://{control}"),
                "fra",
                "network1",
            )
        },
        move |t| applier.apply_routes(t),
    ));
    let sub = next_subscription(&mut subs).await;
    let (_, body) = admin_get(&proxy, "/metrics").await;
    assert!(
        body.contains(&format!("# HELP {HELD} ")) && body.contains(&format!("\n{HELD} ")),
        "{HELD} missing before any table: {body}"
    );
    let held = metric(&proxy, HELD).await;
    let cached_version = || {
        control_client::load_route_cache(&cache)
            .ok()
            .flatten()
            .map(|t| t.version)
    };
    let others = ["a", "b", "c"].map(|n| format!("{n}.demo.svc.cluster.local"));
    let other = |i: usize| service(&others[i], 80, &[(one, &[])]);
    let table = |version: u64, services: Vec<Service>, partial: bool| {
        line(&RouteUpdate::Full(RouteTable {
            version,
            services: services.into_iter().map(Arc::new).collect(),
            partial,
            ..Default::default()
        }))
    };

    let four = || {
        vec![
            service(SGLANG, 8000, &[(one, &[])]),
            other(0),
            other(1),
            other(2),
        ]
    };
    sub.lines.send(table(1, four(), false)).unwrap();
    wait_version(&proxy, 1).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cached_version() != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "table 1 not cached");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    // Partial, three of four services gone: held.
    sub.lines.send(table(2, vec![other(0)], true)).unwrap();
    wait_metric(&proxy, HELD, held + 1.0).await;
    assert_eq!(proxy.routes().version, 1);
    assert_eq!(routed_to(&proxy, &pki).await, "one");

    // Partial, half of them gone (deltas on the held table, as control sends them): applied.
    let partial_delta = |version: u64, services: Vec<Service>| {
        let mut d: serde_json::Value =
            serde_json::from_slice(&delta(version, version - 1, services, &[])).unwrap();
        d["delta"]["partial"] = serde_json::Value::Bool(true);
        let mut l = serde_json::to_vec(&d).unwrap();
        l.push(b'\n');
        Bytes::from(l)
    };
    sub.lines
        .send(partial_delta(3, vec![service(SGLANG, 8000, &[(one, &[])])]))
        .unwrap();
    sub.lines.send(partial_delta(4, vec![other(1)])).unwrap();
    wait_version(&proxy, 4).await;
    assert_eq!(routed_to(&proxy, &pki).await, "one");
    assert_eq!(cached_version(), Some(1), "a partial table was cached");

    // Complete: trusted even though it withdraws all but one service, and cached.
    sub.lines
        .send(table(5, vec![service(SGLANG, 8000, &[(one, &[])])], false))
        .unwrap();
    wait_version(&proxy, 5).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cached_version() != Some(5) {
        assert!(tokio::time::Instant::now() < deadline, "table 5 not cached");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&proxy, HELD).await, held + 1.0);
}
