//! DestinationRule subsets: rules watched in every cluster become `subsets` of the Service they
//! name, and a real eastwest-proxy following control routes `outbound_.<port>_.<subset>_.<fqdn>`
//! only to the endpoints of that subset's Pods. A cluster without Istio's CRD still syncs and
//! routes, and picks rules up once the CRD appears.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::apiserver::ApiServer;
use crate::support::control::{
    gateway_following, start_control, start_control_with_remote, start_control_with_remote_and,
};
use crate::support::objects::*;
use crate::support::{http_get, wait_for};
use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use eastwest_control::Control;
use eastwest_proxy::Proxy;
use eastwest_routes::RouteTable;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "cluster.local";
const FQDN: &str = "sglang.demo.svc.cluster.local";

fn sni(subset: &str) -> String {
    format!("outbound_.8000_.{subset}_.{FQDN}")
}

/// A sidecar-like mTLS backend on `addr` that greets each connection with `name`.
async fn backend(name: &'static str, addr: SocketAddr, id: &Identity) -> SocketAddr {
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
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(format!("{name}\n").as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connects like an Istio sidecar through the gateway with `sni`; the backend's greeting.
async fn greeting(gw: SocketAddr, id: &Identity, sni: &str) -> std::io::Result<String> {
    let cfg = id
        .client_config_with_alpn(PeerPolicy::TrustDomain(TD.into()), vec![b"istio".to_vec()])
        .unwrap();
    let tcp = TcpStream::connect(gw).await?;
    let mut tls = TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut out)).await??;
    Ok(out.trim_end().to_string())
}

/// Waits until control publishes a table whose sglang subsets are `want` and `proxy` applied it.
async fn subsets_applied(control: &Control, proxy: &Proxy, want: &[&str]) -> RouteTable {
    let names = |t: &RouteTable| -> Option<Vec<String>> {
        let s = t.service(FQDN)?;
        Some(s.subsets.iter().map(|s| s.name.clone()).collect())
    };
    let mut table = RouteTable::default();
    wait_for(&format!("sglang subsets {want:?}"), || {
        let current = control.current_table("network1");
        let ok = current
            .as_ref()
            .and_then(|t| names(t))
            .is_some_and(|n| n == want);
        if let (true, Some(t)) = (ok, current) {
            table = (*t).clone();
        }
        async move { ok }
    })
    .await;
    // The incrementally built table is the one computed from scratch.
    let mut recomputed = control.recomputed_table("network1");
    recomputed.version = table.version;
    assert_eq!(recomputed, table);
    wait_for("the proxy applies it", || async {
        proxy.routes().version == table.version
    })
    .await;
    table
}

struct Demo {
    /// A client workload's identity in the mesh the backends trust.
    client: Identity,
}

/// Backends for pods sglang-v1 (127.0.0.1) and sglang-v2 (127.0.0.2) on one port, and the
/// Service, Pods and EndpointSlice that describe them in `api`.
async fn demo(api: &ApiServer) -> Demo {
    let mesh = Mesh::generate(TD, &["fra"]).unwrap();
    let client = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "open-webui"))
        .unwrap();
    let server = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "sglang"))
        .unwrap();
    let v1 = backend("v1", "127.0.0.1:0".parse().unwrap(), &server).await;
    backend(
        "v2",
        SocketAddr::new("127.0.0.2".parse().unwrap(), v1.port()),
        &server,
    )
    .await;
    api.apply("services", service("demo", "sglang", &[("http", 8000)]));
    api.apply("pods", pod("demo", "sglang-v1", &[("version", "v1")]));
    api.apply("pods", pod("demo", "sglang-v2", &[("version", "v2")]));
    let ep = |ip, pod| Ep {
        ip,
        ready: true,
        terminating: false,
        pod: Some(pod),
    };
    api.apply(
        "endpointslices",
        slice(
            "demo",
            "sglang-1",
            "sglang",
            &[("http", v1.port())],
            &[ep("127.0.0.1", "sglang-v1"), ep("127.0.0.2", "sglang-v2")],
        ),
    );
    Demo { client }
}

#[tokio::test]
async fn subset_sni_reaches_only_that_subsets_pods_until_the_rule_goes() {
    let fra = ApiServer::start().await;
    let d = demo(&fra).await;
    fra.apply(
        "destinationrules",
        destination_rule("demo", "sglang", "sglang", &[("v1", "v1"), ("v2", "v2")]),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |_| {}).await;
    let proxy = gateway_following(&control).await;
    let gw = proxy.listener_addr("gw").unwrap();

    let table = subsets_applied(&control, &proxy, &["v1", "v2"]).await;
    let svc = table.service(FQDN).unwrap();
    assert_eq!(svc.subsets[1].labels["version"], "v2");
    assert_eq!(svc.ports[0].endpoints.len(), 2);
    for _ in 0..8 {
        assert_eq!(greeting(gw, &d.client, &sni("v2")).await.unwrap(), "v2");
        assert_eq!(greeting(gw, &d.client, &sni("v1")).await.unwrap(), "v1");
    }
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..8 {
        seen.push(greeting(gw, &d.client, &sni("")).await.unwrap());
    }
    assert!(seen.iter().all(|w| w == "v1" || w == "v2"), "{seen:?}");
    // A subset no rule defines is refused.
    assert!(greeting(gw, &d.client, &sni("v3")).await.is_err());

    // The rule goes: the subsets are withdrawn, the service itself still routes.
    fra.delete("destinationrules", "demo", "sglang");
    subsets_applied(&control, &proxy, &[]).await;
    assert!(greeting(gw, &d.client, &sni("v2")).await.is_err());
    assert!(greeting(gw, &d.client, &sni("")).await.is_ok());
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("eastwest_control_objects{cluster=\"fra\",kind=\"destinationrules\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_cluster_without_the_crd_syncs_routes_and_picks_rules_up_later() {
    let fra = ApiServer::start().await;
    let ash = ApiServer::start().await;
    fra.stop_serving("destinationrules");
    ash.apply("namespaces", namespace("istio-system", Some("network2")));
    let d = demo(&fra).await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote_and(&fra, &ash, dir.path(), |c| {
        c.destination_rule_recheck = Duration::from_millis(200);
    })
    .await;
    let proxy = gateway_following(&control).await;
    let gw = proxy.listener_addr("gw").unwrap();

    // No CRD in fra: ready all the same, and the service routes without subsets.
    subsets_applied(&control, &proxy, &[]).await;
    assert!(
        control.not_synced().is_empty(),
        "{:?}",
        control.not_synced()
    );
    let (status, _) = http_get(control.admin_addr(), "/healthz/ready").await;
    assert_eq!(status, 200);
    assert!(greeting(gw, &d.client, &sni("")).await.is_ok());
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("eastwest_control_watch_restarts_total{cluster=\"fra\"} 0"),
        "a missing CRD is not a watch failure\n{metrics}"
    );

    // A rule in the remote cluster's root namespace applies to fra's Service.
    ash.apply(
        "destinationrules",
        destination_rule("istio-system", "sglang", FQDN, &[("v2", "v2")]),
    );
    subsets_applied(&control, &proxy, &["v2"]).await;
    assert_eq!(greeting(gw, &d.client, &sni("v2")).await.unwrap(), "v2");

    // fra installs the CRD; its rule in the Service's own namespace adds its subsets to the
    // root one's (clients that see either rule send its subsets).
    fra.apply(
        "destinationrules",
        destination_rule("demo", "sglang", "sglang", &[("v1", "v1")]),
    );
    fra.start_serving("destinationrules");
    subsets_applied(&control, &proxy, &["v1", "v2"]).await;
    assert_eq!(greeting(gw, &d.client, &sni("v1")).await.unwrap(), "v1");
    assert_eq!(greeting(gw, &d.client, &sni("v2")).await.unwrap(), "v2");

    // The CRD is replaced while watched (an Istio upgrade): its passing 404 is a watch error,
    // retried, and fra's rule stays published meanwhile.
    let version = control.current_table("network1").unwrap().version;
    let refused = fra.refused_count("destinationrules");
    fra.stop_serving("destinationrules");
    // Four refused relists: more than one per served version, so the old handling would have
    // given up on fra's rules by now.
    wait_for("four refused relists", || async {
        fra.refused_count("destinationrules") >= refused + 4
    })
    .await;
    assert!(watch_restarts(&control, "fra").await > 0);
    assert_eq!(control.current_table("network1").unwrap().version, version);
    assert_eq!(greeting(gw, &d.client, &sni("v1")).await.unwrap(), "v1");
    assert!(
        control.not_synced().is_empty(),
        "{:?}",
        control.not_synced()
    );
    // Served again: the watch resumes and follows changes.
    fra.start_serving("destinationrules");
    fra.delete("destinationrules", "demo", "sglang");
    subsets_applied(&control, &proxy, &["v2"]).await;
    assert!(greeting(gw, &d.client, &sni("v1")).await.is_err());
}

#[tokio::test]
async fn a_mesh_wide_mtls_default_does_not_hide_a_client_namespaces_subsets() {
    let fra = ApiServer::start().await;
    let d = demo(&fra).await;
    // Istio's usual mesh-wide default (a traffic policy, no subsets) and subsets defined where
    // the clients live.
    fra.apply(
        "destinationrules",
        destination_rule("istio-system", "default", "*.local", &[]),
    );
    fra.apply(
        "destinationrules",
        destination_rule("webui", "sglang", FQDN, &[("v1", "v1"), ("v2", "v2")]),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |_| {}).await;
    let proxy = gateway_following(&control).await;
    let gw = proxy.listener_addr("gw").unwrap();
    subsets_applied(&control, &proxy, &["v1", "v2"]).await;
    assert_eq!(greeting(gw, &d.client, &sni("v2")).await.unwrap(), "v2");
}

/// `eastwest_control_watch_restarts_total` of `cluster`.
async fn watch_restarts(control: &Control, cluster: &str) -> u64 {
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    let prefix = format!("eastwest_control_watch_restarts_total{{cluster=\"{cluster}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn rules_that_may_be_listed_but_not_watched_stay_published() {
    let fra = ApiServer::start().await;
    let d = demo(&fra).await;
    fra.apply(
        "destinationrules",
        destination_rule("demo", "sglang", "sglang", &[("v1", "v1"), ("v2", "v2")]),
    );
    // RBAC grants list but not watch on destinationrules.
    fra.forbid_watch("destinationrules", true);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.destination_rule_recheck = Duration::from_millis(100);
    })
    .await;
    let proxy = gateway_following(&control).await;
    let gw = proxy.listener_addr("gw").unwrap();
    let table = subsets_applied(&control, &proxy, &["v1", "v2"]).await;

    // Refused watches are retried and counted; the subsets are neither withdrawn nor
    // republished in the meantime (the table keeps its version).
    wait_for("four refused watches", || async {
        fra.watch_count("destinationrules") >= 4
    })
    .await;
    assert_eq!(
        control.current_table("network1").unwrap().version,
        table.version
    );
    assert_eq!(greeting(gw, &d.client, &sni("v2")).await.unwrap(), "v2");
    assert!(watch_restarts(&control, "fra").await > 0);

    // Watching allowed again: changes flow.
    fra.forbid_watch("destinationrules", false);
    fra.apply(
        "destinationrules",
        destination_rule("demo", "sglang", "sglang", &[("v1", "v1")]),
    );
    subsets_applied(&control, &proxy, &["v1"]).await;
    assert!(greeting(gw, &d.client, &sni("v2")).await.is_err());
}

#[tokio::test]
async fn an_istio_that_serves_only_v1beta1_still_gives_subsets() {
    let fra = ApiServer::start().await;
    let ash = ApiServer::start().await;
    fra.stop_serving("destinationrules/v1");
    fra.apply("services", service("demo", "sglang", &[("http", 8000)]));
    fra.apply(
        "destinationrules",
        destination_rule("demo", "sglang", "sglang", &[("v1", "v1")]),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote(&fra, &ash, dir.path()).await;
    wait_for("v1beta1 subsets", || async {
        control
            .current_table("network1")
            .and_then(|t| t.service(FQDN).map(|s| s.subsets.len()))
            == Some(1)
    })
    .await;
}

#[tokio::test]
async fn a_zero_destination_rule_recheck_is_refused_at_startup() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_eastwest-control"))
        .args(["--cluster", "fra", "--network", "network1", "--plaintext"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--kubeconfig", "/nonexistent", "--secret-namespace", ""])
        .args(["--destination-rule-recheck", "0s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    let mut pipe = child.stderr.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        pipe.read_to_string(&mut stderr).await.unwrap();
        child.wait().await.unwrap()
    })
    .await
    .expect("eastwest-control kept running with --destination-rule-recheck 0s");
    assert!(!status.success());
    assert!(
        stderr.contains("--destination-rule-recheck") && stderr.contains("more than zero"),
        "{stderr}"
    );
}
