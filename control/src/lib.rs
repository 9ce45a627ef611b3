//! eastwest-control: watches Services and EndpointSlices in the local and remote clusters
//! (kube-runtime watchers) and streams per-network route tables to eastwest-proxy over HTTP/2.
//!
//! [`Control::start`] runs everything; `main.rs` only turns flags into a [`ControlConfig`].

mod admin;
mod backoff;
mod cluster;
pub mod compute;
mod destination_rules;
mod encode;
mod metrics;
pub mod model;
pub mod pods;
mod publish;
mod secrets;
mod server;
mod state;
mod tls;
mod valid;
pub mod waypoints;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use eastwest_routes::RouteTable;
use kube::Config;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use cluster::NETWORK_LABEL;
pub use secrets::{client_from_kubeconfig, ClusterClient, MULTICLUSTER_LABEL, NETWORK_ANNOTATION};
pub use tls::TlsFiles;

use cluster::{ClusterWatch, NetworkSource};
use model::Model;
use secrets::SecretClusters;
use state::{Settings, Shared};

/// A remote cluster given on the command line (`--remote NAME=KUBECONFIG`).
#[derive(Debug, Clone)]
pub struct RemoteCluster {
    pub name: String,
    pub kubeconfig: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// This cluster's name and network.
    pub cluster: String,
    pub network: String,
    /// Kubeconfig of the local cluster; `None` infers (KUBECONFIG, ~/.kube/config, in-cluster).
    pub kubeconfig: Option<PathBuf>,
    pub remotes: Vec<RemoteCluster>,
    /// `--remote-network NAME=NETWORK`, for `--remote` and secret clusters alike.
    pub remote_networks: BTreeMap<String, String>,
    /// Namespace of remote secrets; `None` disables them.
    pub secret_namespace: Option<String>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// mTLS identity of the control channel; `None` is plain text (loopback only).
    pub tls: Option<TlsFiles>,
    pub debounce: Duration,
    pub sync_timeout: Duration,
    /// `--gateway NETWORK=HOST:PORT`.
    pub gateways: BTreeMap<String, Vec<String>>,
    pub cluster_domain: String,
    /// Pod label keys copied onto endpoints so subsets can select them (`--subset-labels`);
    /// empty: none.
    pub subset_labels: Vec<String>,
    /// How often a cluster that serves no DestinationRules (no Istio CRD) is asked again.
    pub destination_rule_recheck: Duration,
}

impl ControlConfig {
    /// Defaults for everything but the names and the local cluster.
    pub fn new(cluster: &str, network: &str) -> ControlConfig {
        ControlConfig {
            cluster: cluster.to_string(),
            network: network.to_string(),
            kubeconfig: None,
            remotes: Vec::new(),
            remote_networks: BTreeMap::new(),
            secret_namespace: Some("istio-system".to_string()),
            listen: SocketAddr::from(([0, 0, 0, 0], 15010)),
            admin: SocketAddr::from(([0, 0, 0, 0], 15014)),
            tls: None,
            debounce: Duration::from_millis(100),
            sync_timeout: Duration::from_secs(60),
            gateways: BTreeMap::new(),
            cluster_domain: "cluster.local".to_string(),
            subset_labels: vec!["version".to_string()],
            destination_rule_recheck: destination_rules::watch::DEFAULT_RECHECK,
        }
    }
}

/// A running control plane.
pub struct Control {
    routes_addr: SocketAddr,
    admin_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    _clusters: Vec<ClusterWatch>,
}

impl Control {
    pub async fn start(cfg: ControlConfig) -> anyhow::Result<Control> {
        let tls = match &cfg.tls {
            Some(files) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(files)?)),
            None if cfg.listen.ip().is_loopback() => None,
            None => bail!(
                "plain text is only allowed on loopback; --listen {} needs --tls-cert/--tls-key/--tls-ca",
                cfg.listen
            ),
        };
        if let Err(e) = valid::cluster_domain(&cfg.cluster_domain) {
            bail!("--cluster-domain: {e}");
        }
        for (net, addrs) in &cfg.gateways {
            for a in addrs {
                let mut errors = Vec::new();
                let gateway = eastwest_routes::NetworkGateway {
                    network: net.clone(),
                    address: a.clone(),
                };
                gateway.validate("gateway", &mut errors);
                if let Some(e) = errors.first() {
                    bail!("--gateway {net}={a}: {}", e.message);
                }
            }
        }
        let local_client = match &cfg.kubeconfig {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                client_from_kubeconfig(&text)
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            None => {
                let config = Config::infer()
                    .await
                    .context("no --kubeconfig and no in-cluster or default kubeconfig")?;
                ClusterClient::try_from(config)?
            }
        };
        let mut remotes = Vec::new();
        for r in &cfg.remotes {
            if r.name == cfg.cluster {
                bail!("--remote {}: that is the local cluster's name", r.name);
            }
            let text = std::fs::read_to_string(&r.kubeconfig).with_context(|| {
                format!("--remote {}: reading {}", r.name, r.kubeconfig.display())
            })?;
            let client = client_from_kubeconfig(&text)
                .await
                .with_context(|| format!("--remote {}: {}", r.name, r.kubeconfig.display()))?;
            remotes.push((r.name.clone(), client));
        }

        let model = Model {
            configured_gateways: cfg.gateways.clone(),
            ..Model::default()
        };
        let settings = Settings {
            cluster: cfg.cluster.clone(),
            network: cfg.network.clone(),
            cluster_domain: cfg.cluster_domain.clone(),
            debounce: cfg.debounce,
            sync_timeout: cfg.sync_timeout,
            watch_secrets: cfg.secret_namespace.is_some(),
            subset_labels: cfg.subset_labels.clone(),
            destination_rule_recheck: cfg.destination_rule_recheck,
        };
        let shared = Arc::new(Shared::new(settings, model));

        let routes_listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding --listen {}", cfg.listen))?;
        let admin_listener = TcpListener::bind(cfg.admin)
            .await
            .with_context(|| format!("binding --admin {}", cfg.admin))?;
        let routes_addr = routes_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let mut clusters = vec![ClusterWatch::start(
            shared.clone(),
            cfg.cluster.clone(),
            local_client.clone(),
            NetworkSource::Fixed(cfg.network.clone()),
        )];
        for (name, client) in remotes {
            let network = match cfg.remote_networks.get(&name) {
                Some(n) => NetworkSource::Fixed(n.clone()),
                None => NetworkSource::Discover {
                    fallback: cfg.network.clone(),
                },
            };
            clusters.push(ClusterWatch::start(shared.clone(), name, client, network));
        }
        let mut tasks = vec![
            tokio::spawn(publish::run(shared.clone())),
            tokio::spawn(server::serve(shared.clone(), routes_listener, tls)),
            tokio::spawn(admin::serve(shared.clone(), admin_listener)),
        ];
        if let Some(ns) = &cfg.secret_namespace {
            let mut reserved: HashSet<String> =
                cfg.remotes.iter().map(|r| r.name.clone()).collect();
            reserved.insert(cfg.cluster.clone());
            let secrets =
                SecretClusters::new(shared.clone(), reserved, cfg.remote_networks.clone());
            tasks.push(tokio::spawn(secrets.run(local_client, ns.clone())));
            tasks.push(tokio::spawn(state::secrets_sync_deadline(shared.clone())));
        }
        info!(%routes_addr, %admin_addr, cluster = %cfg.cluster, network = %cfg.network,
              "eastwest-control started");
        Ok(Control {
            routes_addr,
            admin_addr,
            shared,
            tasks,
            _clusters: clusters,
        })
    }

    /// Where proxies subscribe.
    pub fn routes_addr(&self) -> SocketAddr {
        self.routes_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The newest table published for `network`, if any.
    pub fn current_table(&self, network: &str) -> Option<Arc<RouteTable>> {
        self.shared
            .publisher
            .current(network)
            .and_then(|p| p.table())
            .map(Arc::new)
    }

    /// The table of `network` computed from scratch from the current model (version 0); the
    /// published one is built incrementally and must always equal this.
    pub fn recomputed_table(&self, network: &str) -> RouteTable {
        let model = self.shared.model();
        let mut table = compute::route_table(&model, network, &self.shared.settings.cluster_domain);
        table.partial = !state::unsynced(&self.shared, &model).is_empty();
        table
    }

    /// What has not synced yet (empty when `/healthz/ready` says ready).
    pub fn not_synced(&self) -> Vec<String> {
        self.shared.not_synced()
    }

    /// Stops every task (watches, servers, publisher).
    pub async fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
