//! Incremental route updates: what changed between two versions of a network's table.
//!
//! A proxy that subscribes with `&delta=1` receives one [`RouteUpdate`] per line: a full table
//! first, then per version a [`RouteDelta`] naming the version it applies to. Services are
//! replaced whole (a changed endpoint resends its service, not the table), and tables stay in
//! hostname order so a delta merges into its base in one pass.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::sni::is_dns_name;
use crate::table::{is_false, lowercase, validate_network_gateways, validate_remote_services};
use crate::{Invalid, NetworkGateway, RemoteService, RouteTable, Service};

/// One line of a delta route stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RouteUpdate {
    /// The whole table: the first line, and whenever control cannot send a delta.
    Full(RouteTable),
    Delta(RouteDelta),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDelta {
    /// The version the table has after this delta.
    pub version: u64,
    /// The version this delta applies to; any other base means the proxy missed something.
    pub base: u64,
    /// Services added or changed; each replaces the service of the same hostname.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Arc<Service>>,
    /// Hostnames of services removed (absent ones are ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_services: Vec<String>,
    /// Remote services of changed hostnames: they replace every entry of their hostname.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_services: Vec<Arc<RemoteService>>,
    /// Hostnames whose remote services are all removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_remote_services: Vec<String>,
    /// The new network gateways, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_gateways: Option<Vec<NetworkGateway>>,
    /// Whether the table after this delta is partial (see [`RouteTable::partial`]): a state,
    /// not a change, so every delta carries it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub partial: bool,
}

impl RouteDelta {
    /// Everything wrong with the delta on its own; `prefix` as in
    /// [`RouteTable::validate`](crate::RouteTable::validate).
    pub fn validate(&self, prefix: &str, errors: &mut Vec<Invalid>) {
        if self.version <= self.base {
            errors.push(Invalid::new(
                format!("{prefix}version"),
                format!(
                    "version {} does not follow base {}",
                    self.version, self.base
                ),
            ));
        }
        let mut lowercase_names = HashSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = format!("{prefix}services[{i}]");
            svc.validate(&at, errors);
            if !lowercase_names.insert(lowercase(&svc.hostname)) {
                errors.push(Invalid::new(
                    format!("{at}.hostname"),
                    format!("service {} is listed twice", svc.hostname),
                ));
            }
        }
        let changed: HashSet<&str> = self.services.iter().map(|s| s.hostname.as_str()).collect();
        check_removed(
            &format!("{prefix}removed_services"),
            &self.removed_services,
            &changed,
            errors,
        );
        validate_remote_services(prefix, self.remote_services.iter().map(|r| &**r), errors);
        let changed: HashSet<&str> = self
            .remote_services
            .iter()
            .map(|r| r.hostname.as_str())
            .collect();
        check_removed(
            &format!("{prefix}removed_remote_services"),
            &self.removed_remote_services,
            &changed,
            errors,
        );
        if let Some(gateways) = &self.network_gateways {
            validate_network_gateways(prefix, gateways, errors);
        }
    }

    /// The table after this delta. `base` must be the version the delta names; the result is
    /// in hostname order and shares every unchanged service with `base`. Validate the delta
    /// first: a delta that lists a hostname twice gives an unspecified (but memory-safe) table.
    pub fn apply_to(&self, base: &RouteTable) -> Result<RouteTable, Invalid> {
        if base.version != self.base {
            return Err(Invalid::new(
                "base",
                format!(
                    "delta {} applies to version {}, but the table is at version {}",
                    self.version, self.base, base.version
                ),
            ));
        }
        let sorted;
        let base = if base.is_sorted() {
            base
        } else {
            let mut copy = base.clone();
            copy.sort();
            sorted = copy;
            &sorted
        };

        Ok(RouteTable {
            version: self.version,
            services: replace(
                &base.services,
                &self.services,
                &self.removed_services,
                |s| &s.hostname,
            ),
            remote_services: replace(
                &base.remote_services,
                &self.remote_services,
                &self.removed_remote_services,
                |r| &r.hostname,
            ),
            network_gateways: self
                .network_gateways
                .clone()
                .unwrap_or_else(|| base.network_gateways.clone()),
            partial: self.partial,
        })
    }
}

/// Removed hostnames are DNS names, each listed once and not also among the changed ones.
/// Exact comparisons: a delta replaces and removes by exact hostname (a service spelt in
/// another case is another entry, which the table's validation then refuses as a repeat).
fn check_removed(at: &str, removed: &[String], changed: &HashSet<&str>, errors: &mut Vec<Invalid>) {
    let mut seen = HashSet::new();
    for (i, hostname) in removed.iter().enumerate() {
        let why = if !is_dns_name(hostname) {
            format!("not a DNS name: {hostname:?}")
        } else if changed.contains(hostname.as_str()) {
            format!("{hostname} is both changed and removed")
        } else if !seen.insert(hostname.as_str()) {
            format!("{hostname} is listed twice")
        } else {
            continue;
        };
        errors.push(Invalid::new(format!("{at}[{i}]"), why));
    }
}

/// `base` (sorted by key) with `changed` entries put in place of those with their key, and
/// `removed` keys left out; sorted by key.
fn replace<T>(
    base: &[Arc<T>],
    changed: &[Arc<T>],
    removed: &[String],
    key: impl Fn(&T) -> &str,
) -> Vec<Arc<T>> {
    let mut changed = changed.to_vec();
    changed.sort_by(|a, b| key(a).cmp(key(b)));
    let mut touched: Vec<&str> = changed.iter().map(|c| key(c)).collect();
    touched.extend(removed.iter().map(String::as_str));
    touched.sort_unstable();
    touched.dedup();
    merge(base, &touched, &changed, key)
}

/// `base` without the entries whose key is in `touched`, merged with `added`; all three sorted
/// by key. Pointers are copied, never the entries.
fn merge<T>(
    base: &[Arc<T>],
    touched: &[&str],
    added: &[Arc<T>],
    key: impl Fn(&T) -> &str,
) -> Vec<Arc<T>> {
    let mut out = Vec::with_capacity(base.len() + added.len());
    let (mut t, mut a) = (0, 0);
    for item in base {
        let k = key(item);
        while t < touched.len() && touched[t] < k {
            t += 1;
        }
        while a < added.len() && key(&added[a]) < k {
            out.push(added[a].clone());
            a += 1;
        }
        if touched.get(t) != Some(&k) {
            out.push(item.clone());
        }
    }
    out.extend(added[a..].iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, RouteTable, ServicePort};

    fn svc(host: &str, ip: &str) -> Service {
        Service {
            hostname: host.into(),
            subsets: vec![],
            ports: vec![ServicePort {
                port: 80,
                name: None,
                waypoint: Vec::new(),
                endpoints: vec![Endpoint {
                    address: format!("{ip}:8080").parse().unwrap(),
                    labels: Default::default(),
                    hbone_port: None,
                    workload: None,
                }],
            }],
        }
    }

    fn remote(host: &str, network: &str) -> RemoteService {
        RemoteService {
            hostname: host.into(),
            ports: vec![80],
            network: network.into(),
            cluster: None,
        }
    }

    fn base() -> RouteTable {
        RouteTable {
            version: 1,
            services: vec![
                Arc::new(svc("b.ns.svc", "10.0.0.2")),
                Arc::new(svc("d.ns.svc", "10.0.0.4")),
                Arc::new(svc("f.ns.svc", "10.0.0.6")),
            ],
            remote_services: vec![
                Arc::new(remote("r1.ns.svc", "n2")),
                Arc::new(remote("r2.ns.svc", "n2")),
                Arc::new(remote("r2.ns.svc", "n3")),
            ],
            network_gateways: vec![NetworkGateway {
                network: "n2".into(),
                address: "1.2.3.4:15443".into(),
            }],
            partial: false,
        }
    }

    #[test]
    fn delta_adds_replaces_and_removes_in_hostname_order_sharing_the_rest() {
        let base = base();
        let delta = RouteDelta {
            version: 2,
            base: 1,
            services: vec![
                Arc::new(svc("g.ns.svc", "10.0.0.7")),
                Arc::new(svc("a.ns.svc", "10.0.0.1")),
                Arc::new(svc("d.ns.svc", "10.0.0.40")),
            ],
            removed_services: vec!["f.ns.svc".into(), "zz.ns.svc".into()],
            remote_services: vec![Arc::new(remote("r2.ns.svc", "n4"))],
            removed_remote_services: vec!["r1.ns.svc".into()],
            network_gateways: None,
            partial: false,
        };
        let mut errors = Vec::new();
        delta.validate("", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let next = delta.apply_to(&base).unwrap();
        let hosts: Vec<&str> = next.services.iter().map(|s| s.hostname.as_str()).collect();
        assert_eq!(hosts, ["a.ns.svc", "b.ns.svc", "d.ns.svc", "g.ns.svc"]);
        assert!(Arc::ptr_eq(&next.services[1], &base.services[0]));
        assert_eq!(
            next.service("d.ns.svc").unwrap().ports[0].endpoints[0].address,
            "10.0.0.40:8080".parse().unwrap()
        );
        assert_eq!(next.remote_services.len(), 1);
        assert_eq!(next.remote_services[0].network, "n4");
        assert_eq!(next.network_gateways, base.network_gateways);
        assert_eq!(next.version, 2);
    }

    #[test]
    fn delta_for_another_base_is_refused() {
        let delta = RouteDelta {
            version: 3,
            base: 2,
            ..Default::default()
        };
        let err = delta.apply_to(&base()).unwrap_err();
        assert_eq!(err.path, "base");
    }

    #[test]
    fn delta_validation_names_the_field() {
        let delta = RouteDelta {
            version: 2,
            base: 1,
            services: vec![
                Arc::new(svc("a.ns.svc", "10.0.0.1")),
                Arc::new(svc("A.ns.svc", "10.0.0.2")),
            ],
            removed_services: vec!["a.ns.svc".into(), "not a name".into()],
            ..Default::default()
        };
        let mut errors = Vec::new();
        delta.validate("delta.", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "delta.services[1].hostname",
                "delta.removed_services[0]",
                "delta.removed_services[1]"
            ]
        );
    }

    /// `partial` is written only when set (older proxies refuse unknown fields, so complete
    /// tables must look as before), and a delta carries it onto the table it makes.
    #[test]
    fn partial_is_written_only_when_set_and_follows_the_delta() {
        let complete = serde_json::to_string(&base()).unwrap();
        assert!(!complete.contains("partial"), "{complete}");
        let line = r#"{"delta":{"version":2,"base":1,"partial":true}}"#;
        let Ok(RouteUpdate::Delta(delta)) = serde_json::from_str(line) else {
            panic!("not a delta");
        };
        let next = delta.apply_to(&base()).unwrap();
        assert!(next.partial);
        assert!(serde_json::to_string(&next)
            .unwrap()
            .ends_with(r#","partial":true}"#));
        let back = RouteDelta {
            version: 3,
            base: 2,
            ..Default::default()
        };
        assert!(!back.apply_to(&next).unwrap().partial);
    }

    #[test]
    fn wire_format_is_externally_tagged() {
        let line = r#"{"delta":{"version":5,"base":4,"removed_services":["x.ns.svc"]}}"#;
        let update: RouteUpdate = serde_json::from_str(line).unwrap();
        assert!(matches!(update, RouteUpdate::Delta(ref d) if d.base == 4));
        assert_eq!(serde_json::to_string(&update).unwrap(), line);
        let full = format!(r#"{{"full":{}}}"#, serde_json::to_string(&base()).unwrap());
        let update: RouteUpdate = serde_json::from_str(&full).unwrap();
        assert_eq!(update, RouteUpdate::Full(base()));
    }
}
