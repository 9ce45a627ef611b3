//! The demo's ambient path: Istio ambient across networks, double HBONE through the
//! gateway's `hbone` listener (Istio's 15008).
//!
//! ```text
//! fra app --plain TCP--> source ztunnel (open-webui's certificate)
//!   --outer HBONE: mTLS + h2 CONNECT sglang.demo.svc.cluster.local:8000-->
//!   WAN link --> ash east-west gateway, `hbone` listener (gateway identity from files)
//!   --TCP to the endpoint's hbone_port--> destination ztunnel (sglang's certificate)
//!   <==inner HBONE, end to end: mTLS + h2 CONNECT <pod ip>:<port>==>
//!   --plain TCP--> model server (the ambient pod's plaintext port)
//! ```
//!
//! The gateway sees only the outer layer; the inner mTLS is between the two ztunnels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eastwest_certs::{files, Identity, Mesh, PeerPolicy, SpiffeId};
use eastwest_routes::{IdentityConfig, IdentityFiles};

use super::report::ScenarioResult;
use super::topology::{Topology, SERVICE_HOST, SERVICE_PORT, TRUST_DOMAIN};
use crate::ambient::{DestinationZtunnel, OuterConnection, SourceZtunnel, SourceZtunnelConfig};
use crate::run::{run_benchmark, BenchResult, ConnectionMode, ProgressSink, RunConfig};
use crate::serve::{ModelServer, ServeConfig};
use crate::wan::{WanLink, WanOptions};

/// The east-west gateway's SPIFFE ID, as Istio's `istio-eastwestgateway` has it.
pub fn gateway_id() -> SpiffeId {
    SpiffeId::workload(TRUST_DOMAIN, "istio-system", "istio-eastwestgateway")
}

/// The ambient half of the ash side, started before the gateway (whose route table and
/// identity point at it).
pub struct AmbientDestination {
    /// The ambient pod's model server: plaintext, as ztunnel delivers to the app.
    server: ModelServer,
    ztunnel: DestinationZtunnel,
    /// The gateway's `identity.files`, as `eastwest-certs` writes them; removed on drop.
    identity_dir: tempfile::TempDir,
    identity_files: IdentityFiles,
}

impl AmbientDestination {
    /// `server_identity` is the destination workload's (its ztunnel presents it);
    /// `client_id` the only source identity its ztunnel accepts.
    pub async fn start(
        mesh: &Mesh,
        server_identity: &Identity,
        client_id: &SpiffeId,
        serve: ServeConfig,
    ) -> anyhow::Result<AmbientDestination> {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let server = ModelServer::start(loopback, ServeConfig { tls: None, ..serve })
            .await
            .context("starting the ash ambient model server")?;
        let ztunnel_tls = server_identity
            .server_config_tls13(
                PeerPolicy::Exact(vec![client_id.clone()]),
                vec![b"h2".to_vec()],
            )
            .context("destination ztunnel TLS config")?;
        let ztunnel = DestinationZtunnel::start(loopback, ztunnel_tls, vec![server.local_addr()])
            .await
            .context("starting the ash destination ztunnel")?;

        let gateway = mesh
            .workload("ash", &gateway_id())
            .context("issuing the ash east-west gateway certificate")?;
        let identity_dir = tempfile::Builder::new()
            .prefix("eastwest-demo-gateway-")
            .tempdir()
            .context("creating a directory for the gateway's identity files")?;
        let prefix = identity_dir.path().join("gateway");
        files::write_all(&files::identity_files(&gateway, &prefix), false)
            .context("writing the gateway's identity files")?;
        let [cert_chain, key, roots] = files::identity_paths(&prefix);
        Ok(AmbientDestination {
            server,
            ztunnel,
            identity_dir,
            identity_files: IdentityFiles {
                cert_chain,
                key,
                roots,
            },
        })
    }

    /// The destination ztunnel's port: the model server endpoint's `hbone_port`.
    pub fn hbone_port(&self) -> u16 {
        self.ztunnel.local_addr().port()
    }

    /// The gateway's `identity:`, from the files written at start.
    pub fn gateway_identity(&self) -> IdentityConfig {
        IdentityConfig {
            trust_domain: TRUST_DOMAIN.into(),
            extra_trust_domains: vec![],
            files: Some(self.identity_files.clone()),
            istiod: None,
        }
    }

    /// With the gateway's `hbone` listener up: the fra->ash WAN link to it and the source
    /// side's TLS (the fra workload's certificate).
    pub async fn connect(
        self,
        gateway_hbone: SocketAddr,
        rtt: Duration,
        client_identity: &Identity,
        server_id: &SpiffeId,
    ) -> anyhow::Result<AmbientTopology> {
        let h2 = || vec![b"h2".to_vec()];
        let outer_tls = client_identity
            .client_config_with_alpn(PeerPolicy::Exact(vec![gateway_id()]), h2())
            .context("outer HBONE TLS config")?;
        let inner_tls = client_identity
            .client_config_with_alpn(PeerPolicy::Exact(vec![server_id.clone()]), h2())
            .context("inner HBONE TLS config")?;
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let wan = WanLink::start(
            loopback,
            gateway_hbone,
            WanOptions {
                rtt,
                ..WanOptions::default()
            },
        )
        .await
        .context("starting the fra->ash WAN link to the gateway's hbone listener")?;
        Ok(AmbientTopology {
            wan_addr: wan.local_addr(),
            gateway_hbone_addr: gateway_hbone,
            ztunnel_addr: self.ztunnel.local_addr(),
            server_addr: self.server.local_addr(),
            server: self.server,
            ztunnel: self.ztunnel,
            wan,
            outer_tls,
            inner_tls,
            _identity_dir: self.identity_dir,
        })
    }

    /// Stops what `start` started (when the gateway failed to start).
    pub async fn shutdown(self) {
        self.ztunnel.shutdown().await;
        self.server.shutdown().await;
    }
}

/// The running ambient path (see the module docs).
pub struct AmbientTopology {
    /// The ambient pod's model server (plaintext).
    pub server: ModelServer,
    pub ztunnel: DestinationZtunnel,
    /// fra -> ash gateway `hbone` listener.
    pub wan: WanLink,
    pub server_addr: SocketAddr,
    pub ztunnel_addr: SocketAddr,
    pub gateway_hbone_addr: SocketAddr,
    pub wan_addr: SocketAddr,
    outer_tls: Arc<rustls::ClientConfig>,
    inner_tls: Arc<rustls::ClientConfig>,
    _identity_dir: tempfile::TempDir,
}

impl AmbientTopology {
    /// The source ztunnel for the fra app: outer CONNECT to the service through the WAN
    /// and the gateway, inner CONNECT to the ambient pod.
    pub fn source_config(&self, outer: OuterConnection) -> SourceZtunnelConfig {
        SourceZtunnelConfig {
            gateway: self.wan_addr,
            outer_tls: self.outer_tls.clone(),
            inner_tls: self.inner_tls.clone(),
            service: format!("{SERVICE_HOST}:{SERVICE_PORT}"),
            workload: self.server_addr,
            outer,
        }
    }

    /// Gateway first (by the caller), then the link, the ztunnel and the server.
    pub async fn shutdown(self) {
        self.wan.shutdown().await;
        self.ztunnel.shutdown().await;
        self.server.shutdown().await;
    }
}

/// The ambient path's lines of the demo's topology summary.
pub fn print_topology(ambient: &AmbientTopology) {
    println!(
        "  gateway hbone        {}  {}, WAN link fra->ash {}",
        ambient.gateway_hbone_addr,
        gateway_id(),
        ambient.wan_addr
    );
    println!(
        "  ztunnel (ash)        {}  -> ambient model server {} (plaintext, as ztunnel delivers)",
        ambient.ztunnel_addr, ambient.server_addr
    );
}

/// The demo's ambient scenarios: warm and cold outer connection.
pub struct AmbientScenario {
    pub name: &'static str,
    pub description: &'static str,
    pub outer: OuterConnection,
    /// Round trips over the WAN before the first token can arrive (see [`rtt_budget`]).
    pub round_trips: u32,
}

pub const SCENARIOS: [AmbientScenario; 2] = [
    AmbientScenario {
        name: "ambient cross-region warm",
        description: "fra app -> source ztunnel -> WAN -> ash gateway hbone listener (pooled outer HBONE connection) -> destination ztunnel -> model server; new app connection (inner HBONE) per request",
        outer: OuterConnection::Pooled,
        round_trips: 4,
    },
    AmbientScenario {
        name: "ambient cross-region cold",
        description: "fra app -> source ztunnel -> WAN -> ash gateway hbone listener (new outer TCP+TLS+HTTP/2 connection per request) -> destination ztunnel -> model server",
        outer: OuterConnection::PerConnection,
        round_trips: 6,
    },
];

/// What each WAN round trip before the first token is for. ztunnel (and this client)
/// waits for every CONNECT's 200 before sending on the stream, and for each TLS handshake
/// to finish before the HTTP/2 preface, so nothing is pipelined across layers.
pub fn rtt_budget(outer: OuterConnection) -> &'static str {
    match outer {
        OuterConnection::Pooled => "outer CONNECT + inner TLS 1.3 + inner CONNECT + request",
        OuterConnection::PerConnection => {
            "TCP + outer TLS 1.3 + outer CONNECT + inner TLS 1.3 + inner CONNECT + request"
        }
    }
}

/// Runs `load` (its target and connection handling are set here) through a source ztunnel over the ambient path:
/// the app opens a new plain connection per request, as bench_serving does, so each
/// request sets up its own inner HBONE; `outer` decides whether the outer one is reused.
pub async fn run_ambient(
    topo: &Topology,
    outer: OuterConnection,
    load: &mut RunConfig,
    progress: Option<&ProgressSink>,
) -> anyhow::Result<BenchResult> {
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let source = SourceZtunnel::start(loopback, topo.ambient.source_config(outer))
        .await
        .context("starting the fra source ztunnel")?;
    load.base_url = format!("http://{SERVICE_HOST}:{SERVICE_PORT}");
    load.connect_to = Some(source.local_addr().to_string());
    load.connection = ConnectionMode::New;
    load.tls = None;
    load.sni = None;
    let result = run_benchmark(load, progress).await;
    source.shutdown().await;
    result
}

/// Prints each ambient scenario's TTFT over the direct one in RTTs (mean and p50) and what
/// those round trips are; returns the same as JSON for results.json's `checks`.
pub fn print_checks(scenarios: &[ScenarioResult], rtt_ms: f64) -> serde_json::Value {
    let Some(direct) = scenarios.first() else {
        return serde_json::Value::Null;
    };
    // null in results.json when there is no WAN delay to count round trips in.
    let rtts = |ms: f64| (rtt_ms > 0.0).then(|| ms / rtt_ms);
    let mut checks = serde_json::Map::new();
    for sc in &SCENARIOS {
        let Some(result) = scenarios.iter().find(|r| r.name == sc.name) else {
            continue;
        };
        let mean = result.metrics.mean_ttft_ms - direct.metrics.mean_ttft_ms;
        let p50 = result.metrics.median_ttft_ms - direct.metrics.median_ttft_ms;
        println!(
            "  {} TTFT - direct = {mean:>7.1} ms = {}, p50 {} (expected ~{}: {})",
            sc.name,
            super::in_rtts(mean, rtt_ms),
            super::in_rtts(p50, rtt_ms),
            sc.round_trips,
            rtt_budget(sc.outer)
        );
        checks.insert(
            sc.name.to_string(),
            serde_json::json!({
                "ttft_delta_ms": mean,
                "ttft_delta_rtts": rtts(mean),
                "p50_ttft_delta_ms": p50,
                "p50_ttft_delta_rtts": rtts(p50),
                "expected_rtts": sc.round_trips,
                "round_trips": rtt_budget(sc.outer),
            }),
        );
    }
    serde_json::Value::Object(checks)
}
