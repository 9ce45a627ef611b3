//! Remote clusters from Istio "remote secrets": Secrets labelled `istio/multiCluster=true` in
//! control's namespace, as `istioctl create-remote-secret` writes them (one data key per cluster
//! name, holding a kubeconfig). Secrets are followed at runtime: a cluster joins when its secret
//! appears, restarts when its kubeconfig changes and leaves when the secret goes.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config, ResourceExt};
use tracing::{debug, error, info, warn};

use crate::backoff::{until_listed, ErrorLog, JitteredBackoff};
use crate::cluster::{ClusterWatch, NetworkSource};
use crate::model::ObjKey;
use crate::state::Shared;

pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster=true";
/// Optional network hint on a remote secret (used when the remote's istio-system namespace
/// carries no `topology.istio.io/network` label).
pub const NETWORK_ANNOTATION: &str = "networking.istio.io/network";

/// Builds a client from the operator's own kubeconfig text (`--kubeconfig`, `--remote` files):
/// everything kube-rs supports is honoured, exec plugins and file references included.
/// A client of one cluster's API server, and that server's URL (for logs).
#[derive(Clone)]
pub struct ClusterClient {
    pub client: Client,
    pub url: String,
}

pub async fn client_from_kubeconfig(yaml: &str) -> anyhow::Result<ClusterClient> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing kubeconfig")?;
    client_from(kubeconfig).await
}

/// Builds a client from a remote secret's kubeconfig, which may only carry its credentials
/// inline. Anyone who can create a labelled Secret in the secret namespace writes these:
/// exec plugins and auth providers would run commands inside control, file references would
/// read its files (its own service-account token, its keys). Istio refuses them by default too.
async fn client_from_secret_kubeconfig(yaml: &str) -> anyhow::Result<ClusterClient> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing kubeconfig")?;
    let refused = refused_fields(&kubeconfig);
    if !refused.is_empty() {
        bail!(
            "refused: {}; a remote secret's kubeconfig may only carry inline credentials \
             (token, client-certificate-data, client-key-data, certificate-authority-data)",
            refused.join(", ")
        );
    }
    client_from(kubeconfig).await
}

async fn client_from(kubeconfig: Kubeconfig) -> anyhow::Result<ClusterClient> {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    ClusterClient::try_from(config)
}

impl TryFrom<Config> for ClusterClient {
    type Error = anyhow::Error;

    fn try_from(config: Config) -> anyhow::Result<ClusterClient> {
        let url = config.cluster_url.to_string();
        let client = Client::try_from(config).context("building Kubernetes client")?;
        Ok(ClusterClient { client, url })
    }
}

/// The fields of `kubeconfig` that run commands or read local files, named as in the YAML.
fn refused_fields(kubeconfig: &Kubeconfig) -> Vec<String> {
    let mut out = Vec::new();
    for user in &kubeconfig.auth_infos {
        let Some(a) = &user.auth_info else { continue };
        let at = format!("users[{}].user", user.name);
        if a.exec.is_some() {
            out.push(format!("{at}.exec (runs a command)"));
        }
        if let Some(p) = &a.auth_provider {
            out.push(format!(
                "{at}.auth-provider {:?} (may run a command)",
                p.name
            ));
        }
        for (field, value) in [
            ("tokenFile", &a.token_file),
            ("client-certificate", &a.client_certificate),
            ("client-key", &a.client_key),
        ] {
            if value.is_some() {
                out.push(format!("{at}.{field} (reads a local file)"));
            }
        }
    }
    for cluster in &kubeconfig.clusters {
        if cluster
            .cluster
            .as_ref()
            .is_some_and(|c| c.certificate_authority.is_some())
        {
            out.push(format!(
                "clusters[{}].cluster.certificate-authority (reads a local file)",
                cluster.name
            ));
        }
    }
    out
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
    pub async fn run(mut self, client: ClusterClient, namespace: String) {
        let api = Api::<Secret>::namespaced(client.client, &namespace);
        let config = watcher::Config::default().labels(MULTICLUSTER_LABEL);
        let stream = until_listed(watcher(api, config), JitteredBackoff::default());
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<Vec<Secret>> = None;
        let mut errors = ErrorLog::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listing = Some(Vec::new()),
                Ok(watcher::Event::InitApply(s)) => listing.get_or_insert_with(Vec::new).push(s),
                Ok(watcher::Event::InitDone) => {
                    let failures = errors.listed();
                    if failures > 0 {
                        info!(%namespace, api_server = %client.url, failures,
                              "remote secrets listed again after failures");
                    }
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
                Err(retry) => {
                    if let Some(not_logged) = errors.error() {
                        warn!(%namespace, api_server = %client.url, error = %retry.error,
                              retry_in = ?retry.delay, not_logged,
                              "watching remote secrets failed; retrying");
                    } else {
                        debug!(%namespace, api_server = %client.url, error = %retry.error,
                               retry_in = ?retry.delay, "watching remote secrets failed; retrying");
                    }
                }
            }
        }
    }

    async fn apply_secret(&mut self, secret: &Secret) {
        let secret_key = key(secret);
        let name = format!("{}/{}", secret_key.0, secret_key.1);
        // An empty annotation is no annotation (as with the namespace label).
        let annotated_network = secret
            .annotations()
            .get(NETWORK_ANNOTATION)
            .filter(|n| !n.is_empty())
            .cloned();
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
                Ok(text) => client_from_secret_kubeconfig(&text).await,
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
            // A changed kubeconfig restarts the watch but keeps the cluster's objects (dropping
            // the old watch does not forget them): its routes stay up across the rotation, for
            // at most the sync timeout if the new watch cannot list.
            match self.running.remove(&cluster) {
                Some(old) => {
                    drop(old);
                    info!(secret = %name, %cluster, "remote secret changed; restarting cluster watch");
                }
                None => info!(secret = %name, %cluster, "adding cluster from remote secret"),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const INLINE: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
        server: https://192.0.2.1\n    certificate-authority-data: Zm9v\ncontexts:\n- name: c\n  \
        context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user:\n    \
        token: t\n";

    fn refused(user: &str, cluster: &str) -> Vec<String> {
        let yaml = INLINE
            .replace("    token: t\n", user)
            .replace("    certificate-authority-data: Zm9v\n", cluster);
        refused_fields(&Kubeconfig::from_yaml(&yaml).unwrap())
    }

    #[test]
    fn inline_credentials_pass_and_commands_or_files_are_named() {
        assert!(refused_fields(&Kubeconfig::from_yaml(INLINE).unwrap()).is_empty());
        let ca = "    certificate-authority-data: Zm9v\n";
        for (user, cluster, expected) in [
            (
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: sh\n",
                ca,
                "users[u].user.exec (runs a command)",
            ),
            (
                "    auth-provider:\n      name: gcp\n      config: {cmd-path: sh}\n",
                ca,
                "users[u].user.auth-provider \"gcp\" (may run a command)",
            ),
            (
                "    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n",
                ca,
                "users[u].user.tokenFile (reads a local file)",
            ),
            (
                "    client-certificate: /etc/c.pem\n",
                ca,
                "users[u].user.client-certificate (reads a local file)",
            ),
            (
                "    client-key: /etc/k.pem\n",
                ca,
                "users[u].user.client-key (reads a local file)",
            ),
            (
                "    token: t\n",
                "    certificate-authority: /etc/ca.pem\n",
                "clusters[c].cluster.certificate-authority (reads a local file)",
            ),
        ] {
            assert_eq!(refused(user, cluster), [expected]);
        }
    }
}
