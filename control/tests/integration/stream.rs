//! The route stream between eastwest-control and the proxy's subscription client
//! (proxy/src/control_client.rs): versions, refused tables, the route cache, control restarts,
//! mTLS.

use eastwest_proxy::control_client;

use std::sync::Arc;
use std::time::Duration;

use crate::support::apiserver::ApiServer;
use crate::support::control::start_control;
use crate::support::objects::*;
use crate::support::{endpoint_addrs, subscribe_h2c, wait_for};
use control_client::{load_route_cache, ControlClientConfig};
use eastwest_certs::{Mesh, PeerPolicy, SpiffeId};
use eastwest_routes::RouteTable;
use tokio::sync::mpsc;

const HELLO: &str = "helloworld.sample.svc.cluster.local";

fn hello(fra: &ApiServer, ips: &[&str]) {
    let eps: Vec<Ep> = ips.iter().map(|ip| ready(ip)).collect();
    fra.apply(
        "endpointslices",
        slice("sample", "hw-1", "helloworld", &[("http", 5000)], &eps),
    );
}

/// An API server holding helloworld with one ready endpoint, 10.1.0.1.
async fn helloworld_api_server() -> ApiServer {
    let fra = ApiServer::start().await;
    fra.apply(
        "services",
        service("sample", "helloworld", &[("http", 5000)]),
    );
    hello(&fra, &["10.1.0.1"]);
    fra
}

/// Runs the client; every table it is offered goes to the channel, and `refuse` decides
/// whether apply accepts it.
fn subscribe(
    cfg: ControlClientConfig,
    refuse: impl Fn(&RouteTable) -> bool + Send + Sync + 'static,
) -> (
    mpsc::UnboundedReceiver<(RouteTable, bool)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(control_client::run(cfg, move |t: RouteTable| {
        let refused = refuse(&t);
        let _ = tx.send((t, !refused));
        if refused {
            Err("refused by test".to_string())
        } else {
            Ok(())
        }
    }));
    (rx, task)
}

fn plain(url: String, cache: Option<std::path::PathBuf>) -> ControlClientConfig {
    ControlClientConfig {
        route_cache: cache,
        ..ControlClientConfig::plain_text(url, "fra", "network1")
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(RouteTable, bool)>) -> (RouteTable, bool) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no table within 20 s")
        .expect("client stopped")
}

#[tokio::test]
async fn client_gets_full_table_then_new_versions_and_caches_them() {
    let fra = helloworld_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |_| {}).await;
    let cache = dir.path().join("routes.json");
    let url = format!("http://{}", control.routes_addr());
    // Refuse any table routing to 10.1.0.66 (stands in for a table failing validation).
    let (mut rx, client) = subscribe(plain(url, Some(cache.clone())), |t| {
        endpoint_addrs(t, HELLO)
            .iter()
            .any(|a| a.starts_with("10.1.0.66"))
    });

    let (t1, applied) = next(&mut rx).await;
    assert!(applied);
    assert_eq!(endpoint_addrs(&t1, HELLO), ["10.1.0.1:5000"]);

    hello(&fra, &["10.1.0.1", "10.1.0.2"]);
    let (t2, _) = next(&mut rx).await;
    assert!(t2.version > t1.version, "versions must increase");
    assert_eq!(
        endpoint_addrs(&t2, HELLO),
        ["10.1.0.1:5000", "10.1.0.2:5000"]
    );
    wait_for("cache holds t2", || async {
        load_route_cache(&cache)
            .ok()
            .flatten()
            .is_some_and(|c| c.version == t2.version)
    })
    .await;

    // A refused table leaves the cache (the proxy's last-known-good) alone...
    hello(&fra, &["10.1.0.66"]);
    let (t3, applied) = next(&mut rx).await;
    assert!(!applied && t3.version > t2.version);
    // ...and the stream goes on with the next version.
    hello(&fra, &["10.1.0.3"]);
    let (t4, applied) = next(&mut rx).await;
    assert!(applied && t4.version > t3.version);
    wait_for("cache holds t4", || async {
        load_route_cache(&cache)
            .ok()
            .flatten()
            .is_some_and(|c| c.version == t4.version)
    })
    .await;
    assert_eq!(
        endpoint_addrs(&load_route_cache(&cache).unwrap().unwrap(), HELLO),
        ["10.1.0.3:5000"]
    );
    client.abort();
}

#[tokio::test]
async fn client_rides_out_a_control_restart() {
    let fra = helloworld_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |_| {}).await;
    let addr = control.routes_addr();
    let (mut rx, client) = subscribe(plain(format!("http://{addr}"), None), |_| false);
    let (t1, _) = next(&mut rx).await;

    control.shutdown().await;
    // While control is down the endpoints change; the proxy keeps its table meanwhile.
    hello(&fra, &["10.1.0.9"]);
    let control = start_control(&fra, dir.path(), |c| c.listen = addr).await;
    let (t2, _) = next(&mut rx).await;
    assert_eq!(endpoint_addrs(&t2, HELLO), ["10.1.0.9:5000"]);
    assert!(
        t2.version > t1.version,
        "a restarted control still moves versions forward"
    );
    client.abort();
    control.shutdown().await;
}

#[test]
fn route_cache_missing_and_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.json");
    assert!(load_route_cache(&path).unwrap().is_none());
    std::fs::write(&path, "{\"version\": 3, \"services\": [").unwrap();
    let err = format!("{:#}", load_route_cache(&path).unwrap_err());
    assert!(
        err.contains("cache.json") && err.contains("corrupt"),
        "{err}"
    );
}

#[tokio::test]
async fn mtls_control_channel_accepts_mesh_identities_only() {
    let fra = helloworld_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::generate("cluster.local", &["fra"]).unwrap();
    let server = mesh
        .workload(
            "fra",
            &SpiffeId::workload("cluster.local", "istio-system", "eastwest-control"),
        )
        .unwrap();
    let (cert, key, root) = (
        dir.path().join("c.pem"),
        dir.path().join("k.pem"),
        dir.path().join("r.pem"),
    );
    std::fs::write(&cert, server.chain_pem()).unwrap();
    std::fs::write(&key, server.key_pem()).unwrap();
    std::fs::write(&root, server.root_pem()).unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.tls = Some(eastwest_control::TlsFiles { cert, key, root })
    })
    .await;
    let url = format!("https://localhost:{}", control.routes_addr().port());

    let proxy_id = mesh
        .workload(
            "fra",
            &SpiffeId::workload("cluster.local", "istio-system", "eastwestgateway"),
        )
        .unwrap();
    let tls = proxy_id
        .client_config(PeerPolicy::TrustDomain("cluster.local".into()))
        .unwrap();
    let mut cfg = plain(url.clone(), None);
    cfg.tls = Some(tls);
    let (mut rx, good) = subscribe(cfg, |_| false);
    let (t, _) = next(&mut rx).await;
    assert_eq!(endpoint_addrs(&t, HELLO), ["10.1.0.1:5000"]);

    // A client of another mesh is turned away at the TLS layer.
    let other = Mesh::generate("cluster.local", &["fra"]).unwrap();
    let rogue = other
        .workload(
            "fra",
            &SpiffeId::workload("cluster.local", "default", "rogue"),
        )
        .unwrap();
    let mut rogue_tls = (*rogue
        .client_config(PeerPolicy::TrustDomain("cluster.local".into()))
        .unwrap())
    .clone();
    rogue_tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(control.routes_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let result = async {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(rogue_tls))
            .connect(name, tcp)
            .await?;
        // TLS 1.3 reports a rejected client certificate on the first read.
        let (mut send, conn) =
            hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = http::Request::get(format!(
            "{url}{}?cluster=x&network=network1",
            eastwest_routes::ROUTES_STREAM_PATH
        ))
        .body(http_body_util::Empty::new())
        .unwrap();
        send.send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    assert!(
        result.is_err(),
        "a client from another mesh must be refused"
    );
    good.abort();
}

#[tokio::test]
async fn a_burst_of_changes_is_coalesced_into_few_versions() {
    let fra = helloworld_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.debounce = Duration::from_millis(300)
    })
    .await;
    let url = format!("http://{}", control.routes_addr());
    let (mut rx, client) = subscribe(plain(url, None), |_| false);
    let (first, _) = next(&mut rx).await;

    for i in 2..=40 {
        hello(&fra, &[&format!("10.1.1.{i}")]);
    }
    let mut seen = 0;
    loop {
        let (t, _) = next(&mut rx).await;
        assert!(t.version > first.version);
        seen += 1;
        if endpoint_addrs(&t, HELLO) == ["10.1.1.40:5000"] {
            break;
        }
    }
    assert!(
        seen < 39,
        "39 changes in a burst gave {seen} versions: not coalesced"
    );
    client.abort();
}

#[tokio::test]
async fn subscription_without_network_is_a_bad_request() {
    let fra = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |_| {}).await;
    let resp = subscribe_h2c(control.routes_addr(), "cluster=fra").await;
    assert_eq!(resp.status(), 400);
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("network"));
}

/// A gateway claiming a cluster control does not watch, or a network its cluster is not in,
/// gets 404 and the reason, not an empty table that would make it ready and refuse every SNI.
#[tokio::test]
async fn subscription_for_an_unknown_cluster_or_network_is_not_found() {
    use http_body_util::BodyExt;
    let fra = helloworld_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |_| {}).await;
    wait_for("fra's network known", || async {
        control.current_table("network1").is_some()
    })
    .await;
    for (query, reason) in [
        (
            "cluster=fra2&network=network1",
            "unknown cluster fra2: this control watches fra",
        ),
        (
            "cluster=fra&network=netwrok1",
            "cluster fra is in network network1, not netwrok1",
        ),
    ] {
        let resp = subscribe_h2c(control.routes_addr(), query).await;
        assert_eq!(resp.status(), 404, "{query}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&body).trim(), reason);
    }
    let ok = subscribe_h2c(control.routes_addr(), "cluster=fra&network=network1").await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn plain_text_off_loopback_is_refused_at_startup() {
    let fra = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("fra.yaml");
    std::fs::write(&kc, fra.kubeconfig("fra")).unwrap();
    let mut cfg = eastwest_control::ControlConfig::new("fra", "network1");
    cfg.kubeconfig = Some(kc);
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    let err = eastwest_control::Control::start(cfg).await.err().unwrap();
    assert!(
        format!("{err:#}").contains("only allowed on loopback"),
        "{err:#}"
    );
}
