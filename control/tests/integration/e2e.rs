//! End to end: Kubernetes API wire server (ash) → eastwest-control (in fra, ash joined through a
//! remote secret) → control_client → a real eastwest-proxy routing Istio mTLS by SNI.
//! An EndpointSlice change in ash's API server moves new connections to the new endpoint while
//! an established connection keeps flowing.

use eastwest_proxy::control_client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support::apiserver::ApiServer;
use crate::support::control::start_control;
use crate::support::objects::*;
use crate::support::{http_get, wait_for};
use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use eastwest_proxy::Proxy;
use eastwest_routes::{ListenerConfig, ListenerMode, ProxyConfig};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const TD: &str = "cluster.local";
pub const SNI: &str = "outbound_.8000_._.sglang.demo.svc.cluster.local";

/// A sidecar-like mTLS backend on `addr`: greets each connection with `name`, then echoes.
pub async fn backend(name: &'static str, addr: SocketAddr, id: &Identity) -> SocketAddr {
    let cfg = id
        .server_config_with_alpn(PeerPolicy::TrustDomain(TD.into()), vec![b"istio".to_vec()])
        .unwrap();
    let acceptor = TlsAcceptor::from(cfg);
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = tls.write_all(format!("{name}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects like an Istio sidecar through the gateway and returns the backend's greeting.
pub async fn connect(gw: SocketAddr, id: &Identity) -> std::io::Result<(Tls, String)> {
    let cfg = id
        .client_config_with_alpn(PeerPolicy::TrustDomain(TD.into()), vec![b"istio".to_vec()])
        .unwrap();
    let tcp = TcpStream::connect(gw).await?;
    let mut tls = TlsConnector::from(cfg)
        .connect(ServerName::try_from(SNI).unwrap(), tcp)
        .await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut b)).await??;
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok((tls, String::from_utf8_lossy(&line).into_owned()))
}

pub async fn echo(tls: &mut Tls, msg: &[u8]) -> Vec<u8> {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

#[tokio::test]
async fn remote_endpoint_change_reaches_the_proxy_without_breaking_connections() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let client_id = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "open-webui"))
        .unwrap();
    let server_id = mesh
        .workload("ash", &SpiffeId::workload(TD, "demo", "sglang"))
        .unwrap();
    // Two pods of the same Service: same target port, different loopback IPs.
    let old = backend("old", "127.0.0.1:0".parse().unwrap(), &server_id).await;
    let new = backend(
        "new",
        SocketAddr::new("127.0.0.2".parse().unwrap(), old.port()),
        &server_id,
    )
    .await;
    assert_eq!(new.port(), old.port());

    let fra = ApiServer::start().await;
    let ash = ApiServer::start().await;
    ash.apply("namespaces", namespace("istio-system", Some("network2")));
    ash.apply("services", service("demo", "sglang", &[("http", 8000)]));
    let sglang = |ip: &str| {
        slice(
            "demo",
            "sglang-1",
            "sglang",
            &[("http", old.port())],
            &[ready(ip)],
        )
    };
    ash.apply("endpointslices", sglang("127.0.0.1"));
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash.kubeconfig("ash")),
    );

    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into())
    })
    .await;

    // ash's east-west gateway, fed by control.
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        "gw",
        "127.0.0.1:0".parse().unwrap(),
        ListenerMode::AutoPassthrough,
    )]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    let proxy = Arc::new(Proxy::start(cfg).await.unwrap());
    let gw = proxy.listener_addr("gw").unwrap();
    let applier = proxy.clone();
    let client = tokio::spawn(control_client::run(
        control_client::ControlClientConfig {
            route_cache: Some(dir.path().join("routes-cache.json")),
            ..control_client::ControlClientConfig::plain_text(
                format!("http://{}", control.routes_addr()),
                "ash",
                "network2",
            )
        },
        move |table| applier.apply_routes(table),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut established, who) = loop {
        match connect(gw, &client_id).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no route to the old endpoint: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!(who, "old");
    assert_eq!(echo(&mut established, b"before").await, b"before");

    // The pod moves: only ash's API server changes.
    ash.apply("endpointslices", sglang("127.0.0.2"));
    wait_for("new connections reach the new endpoint", || async {
        matches!(connect(gw, &client_id).await, Ok((_, who)) if who == "new")
    })
    .await;
    // The connection made before the change still flows to the old endpoint.
    assert_eq!(echo(&mut established, b"still here").await, b"still here");

    // The proxy reports the version it applied.
    let version = control.current_table("network2").unwrap().version;
    let (_, dump) = http_get(proxy.debug_addr(), "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["route_table_version"], serde_json::json!(version));
    assert_eq!(dump["routes_source"], "control");

    // Control goes away: the proxy keeps routing with its last table, which is also cached.
    control.shutdown().await;
    let (_, who) = connect(gw, &client_id).await.unwrap();
    assert_eq!(who, "new");
    wait_for("route cache written", || async {
        control_client::load_route_cache(&dir.path().join("routes-cache.json"))
            .ok()
            .flatten()
            .is_some_and(|t| t.version == version)
    })
    .await;

    client.abort();
    let _ = client.await;
    drop(established);
    if let Ok(proxy) = Arc::try_unwrap(proxy) {
        proxy.shutdown().await;
    }
}
