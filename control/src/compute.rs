//! Route computation: from every cluster's Services and EndpointSlices to the [`RouteTable`] a
//! gateway in one network serves.
//!
//! Istio's AUTO_PASSTHROUGH gateway forwards only to endpoints reachable in its own network, so a
//! gateway in network N gets as `services` every service with endpoints (or a definition) in a
//! cluster of N, with those endpoints only; services living only in other networks become
//! `remote_services`, and the other networks' gateways `network_gateways`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use std::net::SocketAddr;
use std::sync::Arc;

use eastwest_routes::{Endpoint, NetworkGateway, RemoteService, RouteTable, Service, ServicePort};

use crate::model::{ClusterState, Model, ObjKey, ServiceDef, SliceDef};
use crate::pods::HBONE_PORT;
use crate::valid;
use crate::waypoints;

/// What one Service contributes to the table of a network.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Entry {
    pub service: Option<Service>,
    pub remote: Vec<RemoteService>,
}

/// The route table (version 0) for gateways of `network`, computed from scratch (without the
/// items a proxy would refuse, as published), in hostname order (the order published tables have, so that deltas merge in one pass).
pub fn route_table(model: &Model, network: &str, cluster_domain: &str) -> RouteTable {
    let mut entries: Vec<(String, Entry)> = model
        .all_service_keys()
        .into_iter()
        .map(|key| {
            let entry = valid::entry(
                service_entry(model, network, &key, cluster_domain),
                |_, _| {},
            );
            (hostname(&key, cluster_domain), entry)
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut table = RouteTable::default();
    for (_, entry) in entries {
        table.services.extend(entry.service.map(Arc::new));
        table
            .remote_services
            .extend(entry.remote.into_iter().map(Arc::new));
    }
    table.network_gateways = valid::gateways(network_gateways(model, network), |_, _| {});
    table
}

/// The FQDN of Service `key`, as sidecars put it in the SNI.
pub fn hostname(key: &ObjKey, cluster_domain: &str) -> String {
    format!("{}.{}.svc.{}", key.1, key.0, cluster_domain)
}

/// Service `key` as gateways of `network` see it.
pub fn service_entry(model: &Model, network: &str, key: &ObjKey, cluster_domain: &str) -> Entry {
    let in_network = |c: &ClusterState| c.network.as_deref() == Some(network);
    let clusters = || model.clusters.iter().filter(|(_, c)| c.network.is_some());
    // Same-named Services in several clusters are one service (Istio's namespace sameness);
    // prefer a definition from this network for the ports.
    let defs: Vec<(&ClusterState, &ServiceDef)> = clusters()
        .filter_map(|(_, c)| c.services.objects.get(key).map(|d| (c, d)))
        .collect();
    let Some((def_cluster, def)) = defs
        .iter()
        .find(|(c, _)| in_network(c))
        .or_else(|| defs.first())
    else {
        // Endpoints without a Service are not routable (as in Istio).
        return Entry::default();
    };
    if def.ports.is_empty() {
        return Entry::default();
    }
    let hostname = hostname(key, cluster_domain);
    let local: Vec<(&ClusterState, &SliceDef)> = clusters()
        .filter(|(_, c)| in_network(c))
        .flat_map(|(_, c)| c.slices.of_service(key).map(move |s| (c, s)))
        .collect();
    let defined_here = defs.iter().any(|(c, _)| in_network(c));
    if defined_here || local.iter().any(|(_, s)| !s.endpoints.is_empty()) {
        let local_clusters: Vec<&ClusterState> = clusters()
            .map(|(_, c)| c)
            .filter(|c| in_network(c))
            .collect();
        let waypoint = waypoints::waypoint_of(def_cluster, key, def)
            // A waypoint named but not defined in this network is not used (as istiod does
            // for a waypoint that does not exist): the service is reached directly.
            .filter(|w| {
                local_clusters
                    .iter()
                    .any(|c| c.services.objects.contains_key(w))
            })
            .map(|w| waypoints::endpoints(&local_clusters, &w));
        let mut service = Service {
            subsets: crate::destination_rules::subsets(model, network, key, &hostname),
            hostname,
            ports: def
                .ports
                .iter()
                .map(|p| {
                    let mut endpoints = endpoints_for(&local, &key.0, p.name.as_deref());
                    if waypoint.as_ref().is_some_and(Vec::is_empty) {
                        // Fail closed: the service uses a waypoint without a ready endpoint,
                        // so `hbone` listeners find nothing to send to (503) rather than skip
                        // the waypoint's L7 policy. 15443 (sidecars) never used waypoints.
                        for ep in &mut endpoints {
                            ep.hbone_port = None;
                        }
                    }
                    ServicePort {
                        port: p.port,
                        name: p.name.clone(),
                        waypoint: waypoint.clone().unwrap_or_default(),
                        endpoints,
                    }
                })
                .collect(),
        };
        service.ports.sort_by_key(|p| p.port);
        service.ports.dedup_by_key(|p| p.port);
        return Entry {
            service: Some(service),
            remote: Vec::new(),
        };
    }
    // Reachable only through another network's gateway. No subsets: the SNI (subset included)
    // passes through to that gateway, whose own table has them.
    let remote = clusters()
        .filter(|(_, c)| c.slices.of_service(key).any(|s| !s.endpoints.is_empty()))
        .map(|(name, c)| RemoteService {
            hostname: hostname.clone(),
            ports: def.ports.iter().map(|p| p.port).collect(),
            network: c.network.clone().unwrap_or_default(),
            cluster: Some(name.clone()),
        })
        .collect();
    Entry {
        service: None,
        remote,
    }
}

/// Endpoints of the slices for the service port named `port_name`, each address carrying the
/// slice's port of the same name (targetPort resolution done by the EndpointSlice controller).
fn endpoints_for(
    slices: &[(&ClusterState, &SliceDef)],
    ns: &str,
    port_name: Option<&str>,
) -> Vec<Endpoint> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (cluster, slice) in slices {
        let Some(&(_, target)) = slice.ports.iter().find(|(n, _)| n.as_deref() == port_name) else {
            continue;
        };
        for ep in &slice.endpoints {
            let address = SocketAddr::new(ep.ip, target);
            if seen.insert(address) {
                // A Pod not (yet) known still gets its endpoint, without the Pod's facts; the
                // Pod's arrival republishes it.
                let pod = ep.pod.as_ref().and_then(|pod| cluster.pods.get(ns, pod));
                out.push(Endpoint {
                    address,
                    labels: pod
                        .and_then(|p| p.subset_labels.as_ref())
                        .map(|l| (**l).clone())
                        .unwrap_or_default(),
                    hbone_port: pod
                        .filter(|p| p.ambient(cluster.namespaces.contains(ns)))
                        .map(|_| HBONE_PORT),
                    workload: pod.map(|p| p.workload.clone()),
                });
            }
        }
    }
    out.sort_by_key(|e| e.address);
    out
}

/// Gateways of every network other than `network`: configured ones win, else the load-balancer
/// addresses of the `istio=eastwestgateway` Services in that network's clusters.
pub fn network_gateways(model: &Model, network: &str) -> Vec<NetworkGateway> {
    let mut by_network: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for cluster in model.clusters.values() {
        let Some(net) = cluster.network.as_deref().filter(|n| *n != network) else {
            continue;
        };
        if model.configured_gateways.contains_key(net) {
            continue;
        }
        let addrs = by_network.entry(net).or_default();
        for def in cluster.services.objects.values() {
            addrs.extend(def.gateway_addresses.iter().map(String::as_str));
        }
    }
    for (net, addrs) in &model.configured_gateways {
        if net != network {
            by_network
                .entry(net)
                .or_default()
                .extend(addrs.iter().map(String::as_str));
        }
    }
    by_network
        .into_iter()
        .flat_map(|(net, addrs)| {
            addrs.into_iter().map(move |a| NetworkGateway {
                network: net.to_string(),
                address: a.to_string(),
            })
        })
        .collect()
}
