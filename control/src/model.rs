//! What control knows about every cluster, reduced from Kubernetes objects to the few fields
//! routing needs (so 100 000 endpoints stay small), and the per-resource stores that follow
//! kube-runtime's watcher events (`Init` .. `InitDone` replaces the store atomically).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::ResourceExt;

use crate::destination_rules::DestinationRules;
use crate::pods::{AmbientNamespaces, Pods};

/// `(namespace, name)` of an object.
pub type ObjKey = (String, String);

/// Label on a Service that marks it as an east-west gateway (Istio's convention).
pub const GATEWAY_LABEL: (&str, &str) = ("istio", "eastwestgateway");
/// Port on which east-west gateways accept AUTO_PASSTHROUGH mTLS.
pub const GATEWAY_PORT: u16 = 15443;
/// Label EndpointSlices carry naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortDef {
    pub port: u16,
    pub name: Option<String>,
}

/// A Service, as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub ports: Vec<ServicePortDef>,
    /// `host:15443` addresses when this Service is an east-west gateway with a load balancer.
    pub gateway_addresses: Vec<String>,
    /// Its own `istio.io/use-waypoint` label (the namespace's applies when absent).
    pub use_waypoint: Option<crate::waypoints::UseWaypoint>,
}

/// One ready endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyEndpoint {
    pub ip: IpAddr,
    /// The Pod behind the endpoint (same namespace as the slice): its labels for subsets, its
    /// ambient capture and workload.
    pub pod: Option<Arc<str>>,
}

/// An EndpointSlice, as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceDef {
    /// Name of the Service (same namespace) the slice belongs to.
    pub service: String,
    /// `(port name, target port)`; an unnamed port has name `None`.
    pub ports: Vec<(Option<String>, u16)>,
    /// Endpoints whose `ready` condition is true or unset.
    pub endpoints: Vec<ReadyEndpoint>,
}

impl ServiceDef {
    /// None for Services that have nothing to route to (ExternalName).
    pub fn from_k8s(svc: &K8sService) -> Option<ServiceDef> {
        let spec = svc.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some(ServicePortDef {
                    port: u16::try_from(p.port).ok().filter(|&p| p != 0)?,
                    name: p.name.clone().filter(|n| !n.is_empty()),
                })
            })
            .collect();
        let is_gateway =
            svc.labels().get(GATEWAY_LABEL.0).map(String::as_str) == Some(GATEWAY_LABEL.1);
        let gateway_addresses = if is_gateway {
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|ing| {
                    // Empty fields are unset ones: an `ip: ""` must not hide the hostname.
                    let set = |f: &Option<String>| f.clone().filter(|s| !s.is_empty());
                    set(&ing.ip).or_else(|| set(&ing.hostname))
                })
                .map(|host| host_port(&host, GATEWAY_PORT))
                .collect()
        } else {
            Vec::new()
        };
        Some(ServiceDef {
            ports,
            gateway_addresses,
            use_waypoint: crate::waypoints::UseWaypoint::from_labels(svc.labels()),
        })
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl SliceDef {
    /// None for slices that name no Service or carry FQDN addresses.
    pub fn from_k8s(slice: &EndpointSlice) -> Option<SliceDef> {
        if slice.address_type == "FQDN" {
            return None;
        }
        let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|&p| p != 0)?;
                Some((p.name.clone().filter(|n| !n.is_empty()), port))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter(|ep| {
                // Route on `ready`, unset meaning ready (discovery.k8s.io/v1). The EndpointSlice
                // controller sets it false for terminating endpoints, and true for every
                // endpoint of a Service with publishNotReadyAddresses (whose `serving` still
                // follows Pod readiness, so it must not be used).
                ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
            })
            .flat_map(|ep| {
                let pod: Option<Arc<str>> = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.as_deref())
                    .map(Arc::from);
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(move |ip| ReadyEndpoint {
                        ip,
                        pod: pod.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Some(SliceDef {
            service,
            ports,
            endpoints,
        })
    }
}

/// Objects of one kind, following the watcher's event protocol, indexed by the Service each
/// belongs to so a change recomputes only that Service.
#[derive(Debug)]
pub struct Store<T> {
    pub objects: HashMap<ObjKey, T>,
    /// Service key -> keys of the objects that belong to it.
    pub by_service: HashMap<ObjKey, HashSet<ObjKey>>,
    /// Filled between `Init` and `InitDone` of a (re)list, then swapped in.
    pending: Option<HashMap<ObjKey, T>>,
    pub synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            objects: HashMap::new(),
            by_service: HashMap::new(),
            pending: None,
            synced: false,
        }
    }
}

/// Which Service an object belongs to.
pub trait BelongsTo {
    fn service_key(&self, key: &ObjKey) -> ObjKey;
}

impl BelongsTo for ServiceDef {
    fn service_key(&self, key: &ObjKey) -> ObjKey {
        key.clone()
    }
}

impl BelongsTo for SliceDef {
    fn service_key(&self, key: &ObjKey) -> ObjKey {
        (key.0.clone(), self.service.clone())
    }
}

impl<T: PartialEq + BelongsTo> Store<T> {
    /// Applies one watcher event; returns the keys of the Services whose objects changed (and
    /// whether the store just synced, which matters to readiness even when nothing changed).
    pub fn apply<K: kube::Resource>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl Fn(&K) -> Option<T>,
    ) -> Vec<ObjKey> {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            watcher::Event::Init => {
                self.pending = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                if let (Some(pending), Some(v)) = (self.pending.as_mut(), convert(&o)) {
                    pending.insert(key(&o), v);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let fresh = self.pending.take().unwrap_or_default();
                let mut changed = HashSet::new();
                for (k, v) in &self.objects {
                    if fresh.get(k) != Some(v) {
                        changed.insert(v.service_key(k));
                    }
                }
                for (k, v) in &fresh {
                    if self.objects.get(k) != Some(v) {
                        changed.insert(v.service_key(k));
                    }
                }
                self.objects = fresh;
                self.by_service.clear();
                for (k, v) in &self.objects {
                    self.by_service
                        .entry(v.service_key(k))
                        .or_default()
                        .insert(k.clone());
                }
                self.synced = true;
                changed.into_iter().collect()
            }
            watcher::Event::Apply(o) => {
                let k = key(&o);
                match convert(&o) {
                    Some(v) if self.objects.get(&k) == Some(&v) => Vec::new(),
                    Some(v) => {
                        let mut changed = self.remove(&k);
                        let owner = v.service_key(&k);
                        self.by_service
                            .entry(owner.clone())
                            .or_default()
                            .insert(k.clone());
                        self.objects.insert(k, v);
                        if !changed.contains(&owner) {
                            changed.push(owner);
                        }
                        changed
                    }
                    None => self.remove(&k),
                }
            }
            watcher::Event::Delete(o) => self.remove(&key(&o)),
        }
    }

    /// Forgets every object but keeps a list in progress; returns whether there were any.
    pub fn forget_objects(&mut self) -> bool {
        let had = !self.objects.is_empty();
        self.objects.clear();
        self.by_service.clear();
        had
    }

    fn remove(&mut self, k: &ObjKey) -> Vec<ObjKey> {
        let Some(old) = self.objects.remove(k) else {
            return Vec::new();
        };
        let owner = old.service_key(k);
        if let Some(set) = self.by_service.get_mut(&owner) {
            set.remove(k);
            if set.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        vec![owner]
    }

    /// The objects belonging to Service `svc`.
    pub fn of_service<'a>(&'a self, svc: &ObjKey) -> impl Iterator<Item = &'a T> + 'a {
        self.by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|k| self.objects.get(k))
    }
}

/// One cluster's state.
#[derive(Debug)]
pub struct ClusterState {
    /// Identifies the watch task that owns this state, so a stopped task's late writes are
    /// ignored after the cluster was removed or restarted.
    pub id: u64,
    pub network: Option<String>,
    pub services: Store<ServiceDef>,
    pub slices: Store<SliceDef>,
    pub pods: Pods,
    pub namespaces: AmbientNamespaces,
    pub destination_rules: DestinationRules,
    pub watch_restarts: u64,
    pub last_error: Option<String>,
    /// A remote cluster that did not sync within the sync timeout: it no longer holds
    /// readiness back (it still shows as unsynced in `/metrics`).
    pub sync_timed_out: bool,
    /// The watch was restarted (a rotated remote secret) after the previous one had synced,
    /// and the new one has not relisted everything yet: the previous watch's objects stand in
    /// (the cluster counts as synced) until it has; after the sync timeout they still stand in,
    /// but the cluster counts as unsynced.
    pub relist_pending: bool,
}

impl ClusterState {
    pub fn new(id: u64) -> ClusterState {
        ClusterState {
            id,
            network: None,
            services: Store::default(),
            slices: Store::default(),
            pods: Pods::default(),
            namespaces: AmbientNamespaces::default(),
            destination_rules: DestinationRules::default(),
            watch_restarts: 0,
            last_error: None,
            sync_timed_out: false,
            relist_pending: false,
        }
    }

    /// Hands the state to watch `id`, keeping the objects (routes stay up while it relists)
    /// but not the synced flags, which from now on say what watch `id` has listed.
    pub fn restart(&mut self, id: u64) {
        self.relist_pending = self.relist_pending || self.synced();
        self.id = id;
        self.services.synced = false;
        self.slices.synced = false;
        self.pods.synced = false;
        self.namespaces.synced = false;
        self.destination_rules.synced = false;
    }

    /// Synced as `/metrics` and readiness report it: by the current watch, or by the previous
    /// one while the current one relists.
    pub fn reported_synced(&self) -> bool {
        self.synced() || self.relist_pending
    }

    /// The sync timeout passed before the restarted watch relisted: the previous watch's
    /// objects stay (a control plane that does not know never withdraws routes; the new list
    /// replaces them when it completes), but the cluster is reported unsynced from now on, so
    /// tables are marked partial. Returns whether objects were standing in.
    pub fn stop_standing_in(&mut self) -> bool {
        std::mem::take(&mut self.relist_pending)
    }

    pub fn synced(&self) -> bool {
        self.network.is_some()
            && self.services.synced
            && self.slices.synced
            && self.pods.synced
            && self.namespaces.synced
            && self.destination_rules.synced
    }

    /// Services with an endpoint backed by one of `pods`.
    pub fn services_of_pods(&self, pods: &HashSet<ObjKey>) -> Vec<ObjKey> {
        if pods.is_empty() {
            return Vec::new();
        }
        let mut out = HashSet::new();
        let mut probe = (String::new(), String::new());
        for ((ns, _), slice) in &self.slices.objects {
            for ep in &slice.endpoints {
                if let Some(pod) = &ep.pod {
                    probe.0.clone_from(ns);
                    probe.1.clear();
                    probe.1.push_str(pod);
                    if pods.contains(&probe) {
                        out.insert((ns.clone(), slice.service.clone()));
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Services with a definition or endpoints in one of `namespaces` (a namespace entered or
    /// left ambient mode: its endpoints' `hbone_port` changed).
    pub fn services_in_namespaces(&self, namespaces: &HashSet<String>) -> Vec<ObjKey> {
        if namespaces.is_empty() {
            return Vec::new();
        }
        self.services
            .by_service
            .keys()
            .chain(self.slices.by_service.keys())
            .filter(|(ns, _)| namespaces.contains(ns))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn objects(&self) -> usize {
        self.services.objects.len() + self.slices.objects.len()
    }
}

/// Which Services a change to a cluster's objects affects.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Affected {
    pub services: Vec<ObjKey>,
    /// E.g. a wildcard DestinationRule changed: every Service may be affected.
    pub all: bool,
}

/// Everything route computation reads.
#[derive(Debug, Default)]
pub struct Model {
    pub clusters: BTreeMap<String, ClusterState>,
    /// `--gateway NETWORK=HOST:PORT`: these win over discovered gateway Services.
    pub configured_gateways: BTreeMap<String, Vec<String>>,
    /// When the oldest change not yet published happened.
    pub dirty_since: Option<Instant>,
    /// Services changed since the last publication.
    pub dirty_services: HashSet<ObjKey>,
    /// Everything must be recomputed (a cluster joined, left or got its network).
    pub all_dirty: bool,
}

impl Model {
    /// The cluster state owned by watch task `id`, if it is still current.
    pub fn cluster_mut(&mut self, name: &str, id: u64) -> Option<&mut ClusterState> {
        self.clusters.get_mut(name).filter(|c| c.id == id)
    }

    pub fn mark_dirty(&mut self) {
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    /// Records changed Services; returns whether there were any.
    pub fn services_changed(&mut self, keys: Vec<ObjKey>) -> bool {
        let any = !keys.is_empty();
        self.dirty_services.extend(keys);
        any
    }

    /// Every Service key known in any cluster.
    pub fn all_service_keys(&self) -> std::collections::BTreeSet<ObjKey> {
        self.clusters
            .values()
            .flat_map(|c| {
                c.services
                    .by_service
                    .keys()
                    .chain(c.slices.by_service.keys())
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests;
