//! Starting a control against in-process API servers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use eastwest_control::{Control, ControlConfig, RemoteCluster};
use eastwest_proxy::{control_client, Proxy};
use eastwest_routes::{ListenerConfig, ListenerMode, ProxyConfig};

use super::apiserver::ApiServer;

/// A control for cluster fra / network1 whose local API server is `fra`; plain text on
/// loopback, 10 ms debounce, no remote secrets unless `tweak` says otherwise.
pub async fn start_control(
    fra: &ApiServer,
    dir: &Path,
    tweak: impl FnOnce(&mut ControlConfig),
) -> Control {
    let kc = dir.join("fra-local.yaml");
    std::fs::write(&kc, fra.kubeconfig("fra")).unwrap();
    let mut cfg = ControlConfig::new("fra", "network1");
    cfg.kubeconfig = Some(kc);
    cfg.secret_namespace = None;
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.admin = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.debounce = Duration::from_millis(10);
    tweak(&mut cfg);
    Control::start(cfg).await.unwrap()
}

/// [`start_control`], plus the API server `ash` as the `--remote` cluster ash.
pub async fn start_control_with_remote(fra: &ApiServer, ash: &ApiServer, dir: &Path) -> Control {
    start_control_with_remote_and(fra, ash, dir, |_| {}).await
}

/// [`start_control_with_remote`], with `tweak` applied to the config last.
pub async fn start_control_with_remote_and(
    fra: &ApiServer,
    ash: &ApiServer,
    dir: &Path,
    tweak: impl FnOnce(&mut ControlConfig),
) -> Control {
    let kubeconfig = dir.join("ash-remote.yaml");
    std::fs::write(&kubeconfig, ash.kubeconfig("ash")).unwrap();
    start_control(fra, dir, |c| {
        c.remotes.push(RemoteCluster {
            name: "ash".into(),
            kubeconfig,
        });
        tweak(c);
    })
    .await
}

/// fra's gateway: a real proxy (one auto-passthrough listener "gw") fed by control_client,
/// which asks for deltas.
pub async fn gateway_following(control: &Control) -> Proxy {
    let proxy = gateway().await;
    let applier = proxy.clone();
    tokio::spawn(control_client::run(
        control_client::ControlClientConfig::plain_text(
            format!("http://{}", control.routes_addr()),
            "fra",
            "network1",
        ),
        move |t| applier.apply_routes(t),
    ));
    proxy
}

/// A real proxy with one auto-passthrough listener "gw" on loopback, and no routes.
pub async fn gateway() -> Proxy {
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        "gw",
        "127.0.0.1:0".parse().unwrap(),
        ListenerMode::AutoPassthrough,
    )]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    Proxy::start(cfg).await.unwrap()
}
