//! The seed's two-region path, in-process on 127.0.0.1:
//! fra client --(WAN link, RTT)--> ash east-west gateway (eastwest-proxy, AUTO_PASSTHROUGH)
//! --> ash model server (mTLS, SPIFFE certs from one mesh root, per-cluster intermediates);
//! and the ambient path through the same gateway's `hbone` listener ([`super::ambient`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use eastwest_certs::{Mesh, PeerPolicy, SpiffeId};
use eastwest_routes::{
    Endpoint, ListenerConfig, ListenerMode, ProxyConfig, RouteTable, Service, ServicePort,
    TelemetryConfig, Workload,
};

use super::ambient::{AmbientDestination, AmbientTopology};
use crate::run::TlsClient;
use crate::serve::{ModelServer, ServeConfig};
use crate::wan::{WanLink, WanOptions};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const SERVICE_HOST: &str = "sglang.demo.svc.cluster.local";
pub const SERVICE_PORT: u16 = 8000;
/// What an Istio sidecar in fra sends to the remote east-west gateway.
pub const GATEWAY_SNI: &str = "outbound_.8000_._.sglang.demo.svc.cluster.local";

/// What the demo's model behaves like and how far away it is.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    pub rtt: Duration,
    pub ttft: Duration,
    pub itl: Duration,
}

pub struct Topology {
    pub server: ModelServer,
    pub proxy: eastwest_proxy::Proxy,
    pub wan: WanLink,
    /// fra's open-webui identity, verifying the server's SPIFFE ID (not its name).
    pub client_tls: TlsClient,
    pub server_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub wan_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub server_id: SpiffeId,
    pub client_id: SpiffeId,
    /// Double HBONE through the gateway's `hbone` listener to the ambient pod.
    pub ambient: AmbientTopology,
}

/// The demo's gateway as Istio's east-west gateway in ash names itself in `istio_tcp_*`
/// (`source_*` labels): the `istio-eastwestgateway` workload, pods labelled
/// `app: istio-eastwestgateway` (deploy/base), no `version` label.
pub fn gateway_telemetry() -> TelemetryConfig {
    TelemetryConfig {
        workload: Some("istio-eastwestgateway".into()),
        namespace: Some("istio-system".into()),
        cluster: Some("ash".into()),
        app: Some("istio-eastwestgateway".into()),
        version: None,
        ..TelemetryConfig::default()
    }
}

/// The model server's pod as eastwest-control describes it (`destination_*` labels): the
/// `sglang` Deployment in `demo`, `app: sglang`, `version: v1`, service account `sglang`
/// (its SPIFFE ID is the one the server's certificate carries), in cluster ash.
pub fn server_workload() -> Workload {
    Workload {
        name: "sglang".into(),
        namespace: "demo".into(),
        app: Some("sglang".into()),
        version: Some("v1".into()),
        service_account: Some("sglang".into()),
        cluster: Some("ash".into()),
    }
}

impl Topology {
    /// The gateway's `/metrics` on any free loopback port.
    pub async fn start(opts: &TopologyOptions) -> anyhow::Result<Topology> {
        Self::start_with_metrics_at(opts, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// With the gateway's `/metrics` (Istio's 15020) on `metrics_address`, so a Prometheus
    /// configured before the demo starts can scrape it.
    pub async fn start_with_metrics_at(
        opts: &TopologyOptions,
        metrics_address: SocketAddr,
    ) -> anyhow::Result<Topology> {
        let mesh = Mesh::generate(TRUST_DOMAIN, &["fra", "ash"]).context("generating mesh PKI")?;
        let workload = server_workload();
        let server_id = SpiffeId::workload(
            TRUST_DOMAIN,
            &workload.namespace,
            workload.service_account.as_deref().unwrap_or("default"),
        );
        let client_id = SpiffeId::workload(TRUST_DOMAIN, "demo", "open-webui");
        let server_identity = mesh
            .workload("ash", &server_id)
            .context("issuing the ash sglang certificate")?;
        let client_identity = mesh
            .workload("fra", &client_id)
            .context("issuing the fra open-webui certificate")?;
        let server_tls = server_identity
            .server_config(PeerPolicy::Exact(vec![client_id.clone()]))
            .context("server TLS config")?;
        let mut client_config = client_identity
            .client_config(PeerPolicy::Exact(vec![server_id.clone()]))
            .context("client TLS config")?;
        std::sync::Arc::make_mut(&mut client_config).alpn_protocols = vec![b"http/1.1".to_vec()];

        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let server = ModelServer::start(
            loopback,
            ServeConfig {
                ttft: opts.ttft,
                itl: opts.itl,
                model: "demo-model".into(),
                tls: Some(server_tls),
                ..ServeConfig::default()
            },
        )
        .await
        .context("starting the ash model server")?;
        let server_addr = server.local_addr();
        let ambient = AmbientDestination::start(
            &mesh,
            &server_identity,
            &client_id,
            ServeConfig {
                ttft: opts.ttft,
                itl: opts.itl,
                model: "demo-model".into(),
                ..ServeConfig::default()
            },
        )
        .await?;

        let mut cfg = ProxyConfig::with_listeners(vec![
            ListenerConfig::new("tls", loopback, ListenerMode::AutoPassthrough),
            ListenerConfig::new("hbone", loopback, ListenerMode::Hbone),
        ]);
        cfg.identity = Some(ambient.gateway_identity());
        cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
        cfg.admin.metrics_address = metrics_address;
        cfg.telemetry = gateway_telemetry();
        // No load balancer to take the gateway out of rotation, and the demo's clients are
        // done when it stops: Istio's 5 s accept period would only make every run longer.
        cfg.drain_accept_period = Duration::ZERO;
        cfg.drain_period = Duration::from_secs(5);
        cfg.routes = RouteTable {
            services: vec![Service {
                hostname: SERVICE_HOST.into(),
                subsets: vec![],
                ports: vec![ServicePort {
                    port: SERVICE_PORT,
                    name: None,
                    waypoint: Vec::new(),
                    endpoints: vec![Endpoint {
                        address: server_addr,
                        labels: Default::default(),
                        // The pod is ambient-captured: its ztunnel takes HBONE here.
                        hbone_port: Some(ambient.hbone_port()),
                        workload: Some(std::sync::Arc::new(workload)),
                    }],
                }],
            }
            .into()],
            ..Default::default()
        };
        let proxy = match eastwest_proxy::Proxy::start(cfg).await {
            Ok(proxy) => proxy,
            Err(err) => {
                ambient.shutdown().await;
                return Err(err).context("starting the ash east-west gateway");
            }
        };
        let gateway_addr = proxy
            .listener_addr("tls")
            .context("gateway has no \"tls\" listener")?;
        let hbone_addr = proxy
            .listener_addr("hbone")
            .context("gateway has no \"hbone\" listener")?;
        let ambient = ambient
            .connect(hbone_addr, opts.rtt, &client_identity, &server_id)
            .await?;
        let metrics_addr = proxy.metrics_addr();

        let wan = WanLink::start(
            loopback,
            gateway_addr,
            WanOptions {
                rtt: opts.rtt,
                ..WanOptions::default()
            },
        )
        .await
        .context("starting the fra->ash WAN link")?;
        let wan_addr = wan.local_addr();

        Ok(Topology {
            server,
            proxy,
            wan,
            client_tls: TlsClient {
                config: client_config,
            },
            server_addr,
            gateway_addr,
            wan_addr,
            metrics_addr,
            server_id,
            client_id,
            ambient,
        })
    }

    /// Gateway drains first (clients are done), then the link and the server.
    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.wan.shutdown().await;
        self.ambient.shutdown().await;
        self.server.shutdown().await;
    }
}
