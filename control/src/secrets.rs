//! Remote clusters from Istio "remote secrets": Secrets labelled `istio/multiCluster=true` in
//! control's namespace, as `istioctl create-remote-secret` writes them (one data key per cluster
//! name, holding a kubeconfig). Secrets are followed at runtime: a cluster joins when its secret
//! appears, restarts when its kubeconfig changes and leaves when the secret goes.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, ResourceExt};
use tracing::{error, info, warn};

use crate::backoff::JitteredBackoff;
use crate::cluster::{ClusterWatch, NetworkSource};
use crate::model::ObjKey;
use crate::state::Shared;

pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster=true";
/// Optional network hint on a remote secret (used when the remote's istio-system namespace
/// carries no `topology.istio.io/network` label).
pub const NETWORK_ANNOTATION: &str = "networking.istio.io/network";

/// Builds a client from kubeconfig text (a remote secret's value or a `--remote` file).
pub async fn client_from_kubeconfig(yaml: &str) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing kubeconfig")?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    Client::try_from(config).context("building Kubernetes client")
}

struct Running {
    secret: ObjKey,
    fingerprint: u64,
    watch: ClusterWatch,
}

/// Clusters started from secrets.
pub struct SecretClusters {
    shared: Arc<Shared>,
    /// Cluster names that secrets may not take (the local cluster, `--remote` clusters).
    reserved: HashSet<String>,
    /// `--remote-network NAME=NETWORK`, which wins over discovery.
    networks: BTreeMap<String, String>,
    running: HashMap<String, Running>,
}

impl SecretClusters {
    pub fn new(
        shared: Arc<Shared>,
        reserved: HashSet<String>,
        networks: BTreeMap<String, String>,
    ) -> Self {
        SecretClusters {
            shared,
            reserved,
            networks,
            running: HashMap::new(),
        }
    }

    /// Follows the secrets in `namespace` until aborted; dropping this stops their clusters.
    pub async fn run(mut self, client: Client, namespace: String) {
        let api = Api::<Secret>::namespaced(client, &namespace);
        let config = watcher::Config::default().labels(MULTICLUSTER_LABEL);
        let stream = watcher(api, config).backoff(JitteredBackoff::default());
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<Vec<Secret>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listing = Some(Vec::new()),
                Ok(watcher::Event::InitApply(s)) => listing.get_or_insert_with(Vec::new).push(s),
                Ok(watcher::Event::InitDone) => {
                    let secrets = listing.take().unwrap_or_default();
                    let present: HashSet<ObjKey> = secrets.iter().map(key).collect();
                    let gone: Vec<ObjKey> = self
                        .running
                        .values()
                        .map(|r| r.secret.clone())
                        .filter(|s| !present.contains(s))
                        .collect();
                    for secret in gone {
                        self.remove_secret(&secret);
                    }
                    for secret in &secrets {
                        self.apply_secret(secret).await;
                    }
                    if !self.shared.secrets_synced.swap(true, Ordering::AcqRel) {
                        info!(%namespace, clusters = self.running.len(), "remote secrets synced");
                        self.shared.update(|_| true);
                    }
                }
                Ok(watcher::Event::Apply(s)) => self.apply_secret(&s).await,
                Ok(watcher::Event::Delete(s)) => self.remove_secret(&key(&s)),
                Err(e) => warn!(%namespace, error = %e, "watching remote secrets failed; retrying"),
            }
        }
    }

    async fn apply_secret(&mut self, secret: &Secret) {
        let secret_key = key(secret);
        let name = format!("{}/{}", secret_key.0, secret_key.1);
        let annotated_network = secret.annotations().get(NETWORK_ANNOTATION).cloned();
        let data: BTreeMap<String, Vec<u8>> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        // Clusters this secret no longer lists.
        let dropped: Vec<String> = self
            .running
            .iter()
            .filter(|(c, r)| r.secret == secret_key && !data.contains_key(*c))
            .map(|(c, _)| c.clone())
            .collect();
        for cluster in dropped {
            self.stop(&cluster);
        }
        for (cluster, kubeconfig) in data {
            if self.reserved.contains(&cluster) {
                warn!(secret = %name, %cluster, "remote secret names a cluster configured otherwise; ignored");
                continue;
            }
            if let Some(r) = self.running.get(&cluster) {
                if r.secret != secret_key {
                    warn!(secret = %name, %cluster, "cluster already comes from another secret; ignored");
                    continue;
                }
            }
            let network = match self.networks.get(&cluster) {
                Some(n) => NetworkSource::Fixed(n.clone()),
                None => NetworkSource::Discover {
                    fallback: annotated_network
                        .clone()
                        .unwrap_or_else(|| self.shared.settings.network.clone()),
                },
            };
            let fingerprint = fingerprint(&kubeconfig, &network);
            if self.running.get(&cluster).map(|r| r.fingerprint) == Some(fingerprint) {
                continue;
            }
            let client = match std::str::from_utf8(&kubeconfig)
                .context("kubeconfig is not UTF-8")
                .map(str::to_string)
            {
                Ok(text) => client_from_kubeconfig(&text).await,
                Err(e) => Err(e),
            };
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    error!(secret = %name, key = %cluster, error = format!("{e:#}"),
                           "remote secret has an unusable kubeconfig; cluster not added");
                    self.shared
                        .metrics
                        .secret_errors
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            self.stop(&cluster);
            info!(secret = %name, %cluster, "adding cluster from remote secret");
            let watch = ClusterWatch::start(self.shared.clone(), cluster.clone(), client, network);
            self.running.insert(
                cluster,
                Running {
                    secret: secret_key.clone(),
                    fingerprint,
                    watch,
                },
            );
        }
    }

    fn remove_secret(&mut self, secret: &ObjKey) {
        let clusters: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| &r.secret == secret)
            .map(|(c, _)| c.clone())
            .collect();
        for cluster in clusters {
            info!(secret = %format!("{}/{}", secret.0, secret.1), %cluster, "removing cluster");
            self.stop(&cluster);
        }
    }

    fn stop(&mut self, cluster: &str) {
        if let Some(r) = self.running.remove(cluster) {
            r.watch.stop(&self.shared, cluster);
        }
    }
}

fn key(secret: &Secret) -> ObjKey {
    (secret.namespace().unwrap_or_default(), secret.name_any())
}

fn fingerprint(kubeconfig: &[u8], network: &NetworkSource) -> u64 {
    let mut h = DefaultHasher::new();
    kubeconfig.hash(&mut h);
    format!("{network:?}").hash(&mut h);
    h.finish()
}
