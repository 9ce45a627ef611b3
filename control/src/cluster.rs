//! Watching one cluster: its network, Services, EndpointSlices, Pods and Namespaces, through kube-runtime's
//! watcher (list+watch, resume from the last resourceVersion or bookmark, relist on 410 Gone,
//! backoff on errors).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::Api;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::backoff::{until_listed, ErrorLog, JitteredBackoff, Retry};
use crate::model::{Affected, ClusterState, ObjKey, ServiceDef, SliceDef};
use crate::secrets::ClusterClient;
use crate::state::Shared;

/// Istio's label on a cluster's `istio-system` namespace naming the cluster's network.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
const ISTIO_NAMESPACE: &str = "istio-system";

/// How a cluster's network is determined.
#[derive(Debug, Clone)]
pub enum NetworkSource {
    /// Given on the command line.
    Fixed(String),
    /// From the `topology.istio.io/network` label of the cluster's `istio-system` namespace,
    /// else `fallback` (a secret annotation, or the local network).
    Discover { fallback: String },
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A running cluster watch. Dropping it stops the watch but keeps the cluster's objects (for a
/// restart); [`ClusterWatch::stop`] also forgets them.
#[derive(Debug)]
pub struct ClusterWatch {
    pub id: u64,
    task: AbortHandle,
}

impl ClusterWatch {
    /// Starts watching `name`. A restart (a rotated remote secret: the previous watch was
    /// dropped, not stopped) keeps the cluster's objects, so its routes stay up until the new
    /// watch's first list replaces them atomically (`Init`..`InitDone`); past the sync timeout
    /// they still stand, with the cluster reported unsynced (see [`sync_deadline`]). The
    /// previous task's late writes are ignored since it no longer owns the state (`id`).
    pub fn start(
        shared: Arc<Shared>,
        name: String,
        client: ClusterClient,
        network: NetworkSource,
    ) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        shared.update(|m| {
            match m.clusters.get_mut(&name) {
                Some(c) => c.restart(id),
                None => {
                    m.clusters.insert(name.clone(), ClusterState::new(id));
                }
            }
            // A new, unsynced cluster makes the tables partial: republish them so marked.
            true
        });
        let deadline = sync_deadline(shared.clone(), name.clone(), id);
        let watch = run(shared, name, id, client, network);
        let task = tokio::spawn(futures::future::join(watch, deadline)).abort_handle();
        ClusterWatch { id, task }
    }

    /// Stops the watch and forgets the cluster's objects.
    pub fn stop(self, shared: &Shared, name: &str) {
        self.task.abort();
        shared.update(|m| {
            if m.clusters.get(name).is_some_and(|c| c.id == self.id) {
                m.clusters.remove(name);
                m.all_dirty = true;
                true
            } else {
                false
            }
        });
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits `sync_timeout`, then stops a remote cluster that watch `id` has not synced from
/// holding readiness back (logged once). The local cluster always holds it: see
/// [`Shared::not_synced`]. A restarted watch that has not relisted by then keeps what the
/// previous watch left (a control plane that does not know withdraws nothing), but the cluster
/// is reported unsynced and tables are marked partial until it relists.
async fn sync_deadline(shared: Arc<Shared>, name: String, id: u64) {
    if name == shared.settings.cluster {
        return;
    }
    let timeout = shared.settings.sync_timeout;
    tokio::time::sleep(timeout).await;
    shared.update(|m| {
        let Some(c) = m.cluster_mut(&name, id).filter(|c| !c.synced()) else {
            return false;
        };
        let last_error = c.last_error.clone().unwrap_or_default();
        c.sync_timed_out = true;
        if c.stop_standing_in() {
            warn!(cluster = %name, ?timeout, %last_error,
                  "restarted cluster watch did not relist within the sync timeout; keeping \
                   its last synced objects, tables marked partial until it relists");
        } else {
            warn!(cluster = %name, ?timeout, %last_error,
                  "cluster not synced within the sync timeout; ready without it");
        }
        true
    });
}

async fn run(
    shared: Arc<Shared>,
    name: String,
    id: u64,
    cluster_client: ClusterClient,
    network: NetworkSource,
) {
    let ClusterClient { client, url } = cluster_client;
    let watch = Watch {
        shared: &shared,
        cluster: &name,
        id,
        api_server: &url,
    };
    let network = match network {
        NetworkSource::Fixed(n) => n,
        NetworkSource::Discover { fallback } => discover_network(&watch, &client, fallback).await,
    };
    info!(cluster = %name, %network, api_server = %url, "watching cluster");
    shared.update(|m| {
        if let Some(c) = m.cluster_mut(&name, id) {
            c.network = Some(network);
        }
        m.all_dirty = true;
        true
    });
    let backoff = JitteredBackoff::default;
    let services = watch.follow(
        "Service",
        until_listed(
            watcher(
                Api::<K8sService>::all(client.clone()),
                watcher::Config::default(),
            ),
            backoff(),
        ),
        |c: &mut ClusterState, ev| {
            let mut changed = c.services.apply(ev, ServiceDef::from_k8s);
            changed.extend(crate::waypoints::users_of(c, &changed));
            changed
        },
    );
    let slices = watch.follow(
        "EndpointSlice",
        until_listed(
            watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default(),
            ),
            backoff(),
        ),
        |c: &mut ClusterState, ev| {
            let mut changed = c.slices.apply(ev, SliceDef::from_k8s);
            // A waypoint's endpoints are those of the Services that use it.
            changed.extend(crate::waypoints::users_of(c, &changed));
            changed
        },
    );
    // Pods, whole (the service account is in the spec), reduced at once to what routing keeps:
    // subset labels, ambient capture, workload.
    let keep = shared.settings.subset_labels.clone();
    let pods = watch.follow(
        "Pod",
        until_listed(
            watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
            backoff(),
        ),
        |c: &mut ClusterState, ev| {
            let pods = c.pods.apply(ev, &keep, &name);
            c.services_of_pods(&pods)
        },
    );
    // Namespaces, for their `istio.io/dataplane-mode=ambient` label.
    let namespaces = watch.follow(
        "Namespace",
        until_listed(
            watcher(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
            ),
            backoff(),
        ),
        |c: &mut ClusterState, ev| {
            let changed = c.namespaces.apply(ev);
            c.services_in_namespaces(&changed)
        },
    );
    // DestinationRule subsets (a cluster without Istio's CRD simply has none).
    let rules = crate::destination_rules::watch::run(&watch, client.clone());
    futures::future::join5(services, slices, pods, namespaces, rules).await;
}

/// Reads the network label, retrying with backoff while the API server is unreachable.
async fn discover_network(watch: &Watch<'_>, client: &kube::Client, fallback: String) -> String {
    let (shared, name, id) = (watch.shared, watch.cluster, watch.id);
    let api = Api::<Namespace>::all(client.clone());
    let mut backoff = JitteredBackoff::default();
    let mut errors = ErrorLog::default();
    loop {
        match api.get_opt(ISTIO_NAMESPACE).await {
            Ok(ns) => {
                let label = ns.and_then(|ns| ns.metadata.labels?.remove(NETWORK_LABEL));
                return match label.filter(|l| !l.is_empty()) {
                    Some(n) => n,
                    None => {
                        info!(cluster = %name, network = %fallback,
                              "no {NETWORK_LABEL} label on {ISTIO_NAMESPACE}; using fallback network");
                        fallback
                    }
                };
            }
            Err(e) => {
                let delay = backoff.next().unwrap_or_default();
                if let Some(not_logged) = errors.error() {
                    warn!(cluster = %name, api_server = %watch.api_server, error = %e,
                          retry_in = ?delay, not_logged,
                          "reading the cluster's network failed; retrying with backoff");
                }
                shared.update(|m| {
                    if let Some(c) = m.cluster_mut(name, id) {
                        c.last_error = Some(format!("reading namespace {ISTIO_NAMESPACE}: {e}"));
                    }
                    false
                });
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One cluster watch's identity, for the per-resource loops.
pub struct Watch<'a> {
    pub shared: &'a Shared,
    pub cluster: &'a str,
    /// The watch task owning the cluster's state (see [`ClusterState::id`]).
    pub id: u64,
    pub api_server: &'a str,
}

impl Watch<'_> {
    /// Feeds one resource's watcher events into the cluster's state until the task is aborted.
    async fn follow<K>(
        &self,
        kind: &str,
        stream: impl futures::Stream<Item = Result<watcher::Event<K>, Retry>>,
        apply: impl Fn(&mut ClusterState, watcher::Event<K>) -> Vec<ObjKey>,
    ) {
        let name = self.cluster;
        let mut stream = std::pin::pin!(stream);
        let mut errors = ErrorLog::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        self.listed(kind, &mut errors);
                    }
                    let owned = self.change(|c| Affected {
                        services: apply(c, event),
                        all: false,
                    });
                    if !owned {
                        debug!(cluster = %name, %kind, "cluster removed; watch ends");
                        return;
                    }
                }
                Err(retry) => self.failed(kind, &retry, &mut errors),
            }
        }
    }

    /// Applies `change` to this cluster's state, and wakes the publisher when Services changed
    /// (or all may have) or the cluster just became synced: even without changes, readiness
    /// moved. `false` when this watch no longer owns the state (the cluster was removed or is
    /// watched anew): the watch should end.
    pub fn change(&self, change: impl FnOnce(&mut ClusterState) -> Affected) -> bool {
        let mut owned = true;
        self.shared.update(|m| {
            let Some(c) = m.cluster_mut(self.cluster, self.id) else {
                owned = false;
                return false;
            };
            let was_synced = c.synced();
            let affected = change(c);
            let became_synced = !was_synced && c.synced();
            if became_synced {
                info!(cluster = %self.cluster, objects = c.objects(), "cluster synced");
            }
            m.all_dirty |= affected.all;
            m.services_changed(affected.services) || affected.all || became_synced
        });
        owned
    }

    /// Counts and records a failed list or watch; warns at most once per period per resource.
    pub fn failed(&self, kind: &str, retry: &Retry, errors: &mut ErrorLog) {
        let (cluster, api_server, error) = (self.cluster, self.api_server, &retry.error);
        match errors.error() {
            Some(not_logged) => warn!(%cluster, %api_server, %kind, %error,
                                     retry_in = ?retry.delay, not_logged,
                                     "list/watch failed; retrying with backoff"),
            None => debug!(%cluster, %api_server, %kind, %error, retry_in = ?retry.delay,
                           "list/watch failed; retrying with backoff"),
        }
        self.shared.update(|m| {
            if let Some(c) = m.cluster_mut(cluster, self.id) {
                c.watch_restarts += 1;
                c.last_error = Some(format!("{kind}: {error}"));
            }
            false
        });
    }

    /// A list succeeded: says so if errors preceded it.
    pub fn listed(&self, kind: &str, errors: &mut ErrorLog) {
        let failures = errors.listed();
        if failures > 0 {
            info!(cluster = %self.cluster, api_server = %self.api_server, %kind, failures,
                  "listed again after failures");
        }
    }
}
