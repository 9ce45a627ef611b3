//! The route table: which endpoints serve which service port, and where other networks'
//! gateways are. eastwest-control computes it; eastwest-proxy routes by it.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::sni::is_dns_name;
use crate::Invalid;

/// Services are reference-counted so successive versions share every service that did not
/// change: applying a [`RouteDelta`](crate::RouteDelta) to a table of 10 000 services copies
/// 10 000 pointers, not 100 000 endpoints. The JSON is that of plain values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    /// Monotonic version set by eastwest-control; 0 for tables written by hand.
    #[serde(default)]
    pub version: u64,
    /// Services with endpoints in this gateway's own cluster/network.
    #[serde(default)]
    pub services: Vec<Arc<Service>>,
    /// Services reachable only through another network's gateway (for tunnel mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_services: Vec<Arc<RemoteService>>,
    /// Addresses of other networks' east-west gateways.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_gateways: Vec<NetworkGateway>,
    /// Set by eastwest-control while some cluster has not synced (an unreachable API server,
    /// a remote that never listed): the table may lack services that exist, so a proxy does
    /// not let it withdraw most of its routes at once, nor cache it. Written only when true,
    /// so a proxy that predates the field still reads every complete table.
    #[serde(default, skip_serializing_if = "is_false")]
    pub partial: bool,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The FQDN sidecars put in the SNI, e.g. `helloworld.sample.svc.cluster.local`.
    pub hostname: String,
    /// Named endpoint subsets, as an Istio DestinationRule defines them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    /// An endpoint belongs to the subset when it carries all of these labels.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The service port, as it appears in the SNI (`outbound_.<port>_...`).
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Ready endpoints; each address carries the target port.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// The HBONE endpoints of the waypoint this service uses (`istio.io/use-waypoint`), each
    /// with its `hbone_port`. Used only by `hbone` listeners, which then send to the waypoint
    /// instead of `endpoints` so its L7 policy applies; 15443 (sidecar) ignores it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoint: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Set when the pod is captured by ambient mode: the port its node's ztunnel accepts HBONE
    /// on for it (15008). `hbone` listeners forward only to endpoints that have one, to
    /// `<address IP>:<hbone_port>`; sidecar pods (None) are reached on 15443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hbone_port: Option<u16>,
    /// Who the endpoint is, for Istio's `destination_*` metric labels. Absent for endpoints
    /// written by hand or without a Pod behind them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

/// The Pod behind an endpoint, named as Istio's telemetry names it. Shared by the endpoints
/// of one pod in several service ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// The workload name Istio derives from the Pod (its Deployment, StatefulSet, ... or the
    /// Pod itself): `destination_workload`.
    pub name: String,
    pub namespace: String,
    /// `app.kubernetes.io/name` or `app` label: `destination_app`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// `app.kubernetes.io/version` or `version` label: `destination_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The Pod's service account (`destination_principal` is
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The cluster the Pod runs in: `destination_cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteService {
    pub hostname: String,
    pub ports: Vec<u16>,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkGateway {
    pub network: String,
    /// `host:port` of that network's east-west gateway (load-balancer IP or name).
    pub address: String,
}

impl Subset {
    pub fn selects(&self, endpoint: &Endpoint) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| endpoint.labels.get(k) == Some(v))
    }
}

impl RouteTable {
    /// Checks everything a proxy relies on; `prefix` is the path of the table in its document
    /// (e.g. `routes`) so errors name the field as the user wrote it.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<Invalid>) {
        self.validate_changed(prefix, |_| false, errors);
    }

    /// Like [`RouteTable::validate`], but services for which `checked` is true (typically: the
    /// very `Arc` an earlier, validated version held) are not re-examined — only checked for a
    /// repeated hostname.
    pub fn validate_changed(
        &self,
        prefix: &str,
        checked: impl Fn(&Arc<Service>) -> bool,
        errors: &mut Vec<Invalid>,
    ) {
        validate_services(
            prefix,
            self.services.iter().map(|s| (&**s, checked(s))),
            errors,
        );
        self.validate_remote_and_gateways(prefix, errors);
    }

    /// Everything [`validate_changed`](Self::validate_changed) checks but the services.
    pub fn validate_remote_and_gateways(&self, prefix: &str, errors: &mut Vec<Invalid>) {
        validate_remote_services(prefix, self.remote_services.iter().map(|r| &**r), errors);
        validate_network_gateways(prefix, &self.network_gateways, errors);
    }

    /// Whether services and remote services are in hostname order, as eastwest-control sends
    /// them (deltas are merged in that order).
    pub fn is_sorted(&self) -> bool {
        self.services.is_sorted_by(|a, b| a.hostname < b.hostname)
            && self
                .remote_services
                .is_sorted_by(|a, b| a.hostname <= b.hostname)
    }

    /// Puts services and remote services in hostname order (stable, so a hostname's remote
    /// services keep their order).
    pub fn sort(&mut self) {
        self.services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        self.remote_services
            .sort_by(|a, b| a.hostname.cmp(&b.hostname));
    }

    /// Looks a service up by the FQDN from the SNI (case-insensitive).
    pub fn service(&self, hostname: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.hostname.eq_ignore_ascii_case(hostname))
            .map(|s| &**s)
    }
}

/// Checks each service (those marked `true` were checked when they first arrived and are
/// skipped) and that no hostname repeats, ignoring case.
pub(crate) fn validate_services<'a>(
    prefix: &str,
    services: impl Iterator<Item = (&'a Service, bool)>,
    errors: &mut Vec<Invalid>,
) {
    let mut hostnames = HashSet::with_capacity(services.size_hint().0);
    for (i, (svc, checked)) in services.enumerate() {
        let at = || format!("{prefix}services[{i}]");
        if !checked {
            svc.validate(&at(), errors);
        }
        if is_dns_name(&svc.hostname) && !hostnames.insert(lowercase(&svc.hostname)) {
            errors.push(Invalid::new(
                format!("{}.hostname", at()),
                format!("service {} is listed twice", svc.hostname),
            ));
        }
    }
}

pub(crate) fn validate_remote_services<'a>(
    prefix: &str,
    remote_services: impl Iterator<Item = &'a RemoteService>,
    errors: &mut Vec<Invalid>,
) {
    for (i, remote) in remote_services.enumerate() {
        remote.validate(&format!("{prefix}remote_services[{i}]"), errors);
    }
}

pub(crate) fn validate_network_gateways(
    prefix: &str,
    gateways: &[NetworkGateway],
    errors: &mut Vec<Invalid>,
) {
    for (i, gw) in gateways.iter().enumerate() {
        gw.validate(&format!("{prefix}network_gateways[{i}]"), errors);
    }
}

impl RemoteService {
    /// Checks one remote service on its own; `at` is its path, e.g. `remote_services[3]`.
    pub fn validate(&self, at: &str, errors: &mut Vec<Invalid>) {
        if !is_dns_name(&self.hostname) {
            errors.push(Invalid::new(
                format!("{at}.hostname"),
                format!("not a DNS name: {:?}", self.hostname),
            ));
        }
        if self.network.is_empty() {
            errors.push(Invalid::new(
                format!("{at}.network"),
                "network must not be empty",
            ));
        }
    }
}

impl NetworkGateway {
    /// Checks one gateway on its own; `at` is its path, e.g. `network_gateways[0]`.
    pub fn validate(&self, at: &str, errors: &mut Vec<Invalid>) {
        if self.network.is_empty() {
            errors.push(Invalid::new(
                format!("{at}.network"),
                "network must not be empty",
            ));
        }
        if let Err(why) = check_host_port(&self.address) {
            errors.push(Invalid::new(format!("{at}.address"), why));
        }
    }
}

impl Service {
    /// Checks one service on its own (not whether its hostname repeats in a table); `at` is
    /// its path, e.g. `routes.services[3]`.
    pub fn validate(&self, at: &str, errors: &mut Vec<Invalid>) {
        if !is_dns_name(&self.hostname) {
            errors.push(Invalid::new(
                format!("{at}.hostname"),
                format!("not a DNS name: {:?}", self.hostname),
            ));
        }
        let mut subsets = HashSet::new();
        for (j, subset) in self.subsets.iter().enumerate() {
            let at = || format!("{at}.subsets[{j}]");
            if !is_subset_name(&subset.name) {
                errors.push(Invalid::new(
                    format!("{}.name", at()),
                    format!(
                        "subset names are lowercase letters, digits and '-': {:?}",
                        subset.name
                    ),
                ));
            } else if !subsets.insert(subset.name.as_str()) {
                errors.push(Invalid::new(
                    format!("{}.name", at()),
                    format!("subset {} is defined twice", subset.name),
                ));
            }
            if subset.labels.is_empty() {
                errors.push(Invalid::new(
                    format!("{}.labels", at()),
                    "a subset needs at least one label",
                ));
            }
        }
        if self.ports.is_empty() {
            errors.push(Invalid::new(
                format!("{at}.ports"),
                "a service needs at least one port",
            ));
        }
        let mut ports = HashSet::new();
        for (j, port) in self.ports.iter().enumerate() {
            let at = || format!("{at}.ports[{j}]");
            if port.port == 0 {
                errors.push(Invalid::new(
                    format!("{}.port", at()),
                    "port 0 is not a service port",
                ));
            } else if !ports.insert(port.port) {
                errors.push(Invalid::new(
                    format!("{}.port", at()),
                    format!("port {} is listed twice", port.port),
                ));
            }
            for (field, list) in [("endpoints", &port.endpoints), ("waypoint", &port.waypoint)] {
                let mut seen = HashSet::new();
                for (k, ep) in list.iter().enumerate() {
                    if ep.address.port() == 0 {
                        errors.push(Invalid::new(
                            format!("{}.{field}[{k}].address", at()),
                            "endpoint needs a port",
                        ));
                    } else if !seen.insert(ep.address) {
                        errors.push(Invalid::new(
                            format!("{}.{field}[{k}].address", at()),
                            format!("endpoint {} is listed twice", ep.address),
                        ));
                    }
                }
            }
        }
    }
}

/// Borrowed when already lowercase, as hostnames nearly always are: no allocation per service.
pub(crate) fn lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Istio's subset names, and the route table's: a DNS label (lowercase letters, digits, '-').
pub fn is_subset_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `host:port` where host is an IP or DNS name and port is 1..=65535.
pub(crate) fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("expected host:port, got {s:?}"));
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(format!("bad port in {s:?}")),
    }
    if !is_dns_name(host) {
        return Err(format!("bad host in {s:?}"));
    }
    Ok(())
}
