//! Route computation: from every cluster's Services and EndpointSlices to the [`RouteTable`] a
//! gateway in one network serves.
//!
//! Istio's AUTO_PASSTHROUGH gateway forwards only to endpoints reachable in its own network, so a
//! gateway in network N gets as `services` every service with endpoints (or a definition) in a
//! cluster of N, with those endpoints only; services living only in other networks become
//! `remote_services`, and the other networks' gateways `network_gateways`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;

use eastwest_routes::{Endpoint, NetworkGateway, RemoteService, RouteTable, Service, ServicePort};

use crate::model::{ClusterState, Model, ObjKey, ServiceDef, SliceDef};

/// The route table (version 0) for gateways of `network`.
pub fn route_table(model: &Model, network: &str, cluster_domain: &str) -> RouteTable {
    // Group every slice by its Service, remembering the cluster it came from.
    let mut by_service: BTreeMap<ObjKey, Vec<(&str, &ClusterState, &SliceDef)>> = BTreeMap::new();
    let mut defs: BTreeMap<ObjKey, Vec<(&str, &ClusterState, &ServiceDef)>> = BTreeMap::new();
    for (name, cluster) in &model.clusters {
        if cluster.network.is_none() {
            continue;
        }
        for ((ns, _), slice) in &cluster.slices.objects {
            by_service
                .entry((ns.clone(), slice.service.clone()))
                .or_default()
                .push((name, cluster, slice));
        }
        for (key, def) in &cluster.services.objects {
            defs.entry(key.clone())
                .or_default()
                .push((name, cluster, def));
        }
    }
    let in_network = |c: &ClusterState| c.network.as_deref() == Some(network);

    let mut table = RouteTable::default();
    for (key, defs) in &defs {
        // Same-named Services in several clusters are one service (Istio's namespace sameness);
        // prefer a definition from this network for the ports.
        let Some((_, _, def)) = defs
            .iter()
            .find(|(_, c, _)| in_network(c))
            .or_else(|| defs.first())
        else {
            continue;
        };
        if def.ports.is_empty() {
            continue;
        }
        let hostname = format!("{}.{}.svc.{}", key.1, key.0, cluster_domain);
        let slices = by_service.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let local: Vec<&SliceDef> = slices
            .iter()
            .filter(|(_, c, _)| in_network(c))
            .map(|(_, _, s)| *s)
            .collect();
        let defined_here = defs.iter().any(|(_, c, _)| in_network(c));
        let has_local_endpoints = local.iter().any(|s| !s.endpoints.is_empty());
        if defined_here || has_local_endpoints {
            table.services.push(Service {
                hostname,
                subsets: Vec::new(),
                ports: def
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        port: p.port,
                        name: p.name.clone(),
                        endpoints: endpoints_for(&local, p.name.as_deref()),
                    })
                    .collect(),
            });
            continue;
        }
        // Reachable only through another network's gateway.
        let mut seen = BTreeSet::new();
        for (cluster_name, cluster, slice) in slices {
            if slice.endpoints.is_empty() || !seen.insert(*cluster_name) {
                continue;
            }
            table.remote_services.push(RemoteService {
                hostname: hostname.clone(),
                ports: def.ports.iter().map(|p| p.port).collect(),
                network: cluster.network.clone().unwrap_or_default(),
                cluster: Some(cluster_name.to_string()),
            });
        }
    }
    table.network_gateways = network_gateways(model, network);
    table
}

/// Endpoints of the slices for the service port named `port_name`, each address carrying the
/// slice's port of the same name (targetPort resolution done by the EndpointSlice controller).
fn endpoints_for(slices: &[&SliceDef], port_name: Option<&str>) -> Vec<Endpoint> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let Some(&(_, target)) = slice.ports.iter().find(|(n, _)| n.as_deref() == port_name) else {
            continue;
        };
        for ep in &slice.endpoints {
            let address = SocketAddr::new(ep.ip, target);
            if seen.insert(address) {
                out.push(Endpoint {
                    address,
                    labels: (*ep.labels).clone(),
                });
            }
        }
    }
    out.sort_by_key(|e| e.address);
    out
}

/// Gateways of every network other than `network`: configured ones win, else the load-balancer
/// addresses of the `istio=eastwestgateway` Services in that network's clusters.
fn network_gateways(model: &Model, network: &str) -> Vec<NetworkGateway> {
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
