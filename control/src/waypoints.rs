//! Which waypoint a Service uses (`istio.io/use-waypoint` on the Service or its Namespace) and
//! that waypoint's HBONE endpoints, which `hbone` listeners send to instead of the Service's
//! own: what istiod answers Istio's ambient east-west gateway (`endpoint_builder.go`, "If we're
//! an east west gateway, then we also want to send to waypoints"), so the destination
//! waypoint's L7 policy applies to cross-network traffic too.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use eastwest_routes::Endpoint;

use crate::model::{ClusterState, ObjKey, ServiceDef};
use crate::pods::HBONE_PORT;

/// Service or Namespace label naming the waypoint (a Service) its Services use.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Beside [`USE_WAYPOINT_LABEL`]: the namespace of that waypoint, when not the Service's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// [`USE_WAYPOINT_LABEL`] value opting a Service out of its namespace's waypoint.
const NO_WAYPOINT: &str = "none";

/// What a `istio.io/use-waypoint` label says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UseWaypoint {
    /// `none`: no waypoint, whatever the namespace says.
    OptOut,
    /// The waypoint Service `name`, in `namespace` (`None`: the labelled object's namespace).
    Named {
        name: String,
        namespace: Option<String>,
    },
}

impl UseWaypoint {
    /// None when the object has no (non-empty) `istio.io/use-waypoint` label.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<UseWaypoint> {
        let name = labels.get(USE_WAYPOINT_LABEL).filter(|n| !n.is_empty())?;
        if name == NO_WAYPOINT {
            return Some(UseWaypoint::OptOut);
        }
        Some(UseWaypoint::Named {
            name: name.clone(),
            namespace: labels
                .get(USE_WAYPOINT_NAMESPACE_LABEL)
                .filter(|n| !n.is_empty())
                .cloned(),
        })
    }
}

/// The waypoint Service that Service `key` (defined as `def` in `cluster`) uses: its own label
/// wins, else its namespace's. A waypoint never uses itself.
pub fn waypoint_of(cluster: &ClusterState, key: &ObjKey, def: &ServiceDef) -> Option<ObjKey> {
    let rule = def
        .use_waypoint
        .as_ref()
        .or_else(|| cluster.namespaces.waypoints.get(&key.0))?;
    match rule {
        UseWaypoint::OptOut => None,
        UseWaypoint::Named { name, namespace } => {
            let waypoint = (
                namespace.clone().unwrap_or_else(|| key.0.clone()),
                name.clone(),
            );
            (waypoint != *key).then_some(waypoint)
        }
    }
}

/// Services of `cluster` whose waypoint is one of `changed` (its Service or endpoints changed,
/// so theirs did too).
pub fn users_of(cluster: &ClusterState, changed: &[ObjKey]) -> Vec<ObjKey> {
    if changed.is_empty()
        || (cluster.namespaces.waypoints.is_empty()
            && !cluster
                .services
                .objects
                .values()
                .any(|d| d.use_waypoint.is_some()))
    {
        return Vec::new();
    }
    let changed: HashSet<&ObjKey> = changed.iter().collect();
    cluster
        .services
        .objects
        .iter()
        .filter(|(key, def)| waypoint_of(cluster, key, def).is_some_and(|w| changed.contains(&w)))
        .map(|(key, _)| key.clone())
        .collect()
}

/// The ready endpoints of waypoint Service `waypoint` in `clusters` (this network's), at the
/// waypoint's HBONE port: `<pod IP>:15008`, `hbone_port` 15008.
pub fn endpoints(clusters: &[&ClusterState], waypoint: &ObjKey) -> Vec<Endpoint> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for cluster in clusters {
        for slice in cluster.slices.of_service(waypoint) {
            for ep in &slice.endpoints {
                let address = SocketAddr::new(ep.ip, HBONE_PORT);
                if seen.insert(address) {
                    let pod = ep
                        .pod
                        .as_ref()
                        .and_then(|pod| cluster.pods.get(&waypoint.0, pod));
                    out.push(Endpoint {
                        address,
                        labels: Default::default(),
                        hbone_port: Some(HBONE_PORT),
                        workload: pod.map(|p| p.workload.clone()),
                    });
                }
            }
        }
    }
    out.sort_by_key(|e| e.address);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_name_a_waypoint_or_opt_out() {
        assert_eq!(UseWaypoint::from_labels(&labels(&[])), None);
        assert_eq!(
            UseWaypoint::from_labels(&labels(&[(USE_WAYPOINT_LABEL, "none")])),
            Some(UseWaypoint::OptOut)
        );
        assert_eq!(
            UseWaypoint::from_labels(&labels(&[
                (USE_WAYPOINT_LABEL, "wp"),
                (USE_WAYPOINT_NAMESPACE_LABEL, "infra")
            ])),
            Some(UseWaypoint::Named {
                name: "wp".into(),
                namespace: Some("infra".into())
            })
        );
    }
}
