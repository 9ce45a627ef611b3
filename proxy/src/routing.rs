//! The compiled, immutable routing state a connection consults: built once per config or
//! route-table change from plain [`ProxyConfig`] data, then swapped in whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use eastwest_routes::{ListenerMode, ProxyConfig, SniPattern};
use metrics::Counter;

use crate::istio_sni::IstioSni;
use crate::metrics as m;

/// Where an upstream lives: an address, or a `host:port` resolved when connecting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(SocketAddr),
    Name(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => a.fmt(f),
            Target::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub target: Target,
    /// Connections open to this upstream, shared by every snapshot that lists it so the
    /// balancer's view survives route swaps.
    pub active: Arc<AtomicUsize>,
}

/// The endpoints one route may use, with that route's byte counters.
#[derive(Debug)]
pub struct UpstreamSet {
    /// Metrics/log label: `<service fqdn>:<port>` or `<listener>/<sni pattern>`.
    pub route: Arc<str>,
    pub upstreams: Box<[Upstream]>,
    pub bytes_to_upstream: Counter,
    pub bytes_to_downstream: Counter,
}

/// Why an auto-passthrough SNI did not route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMiss {
    UnknownService,
    UnknownPort,
    UnknownSubset,
    /// The route exists but has no ready endpoint.
    NoEndpoints,
}

#[derive(Default)]
struct PortRoutes {
    all: Option<Arc<UpstreamSet>>,
    subsets: HashMap<String, Arc<UpstreamSet>>,
}

pub struct Routing {
    /// The config this was compiled from, served by `/config_dump`.
    pub config: Arc<ProxyConfig>,
    /// Keyed by lowercase service FQDN, then service port.
    services: HashMap<String, HashMap<u16, PortRoutes>>,
    /// Per `sni` listener: rules, most specific first.
    sni_rules: HashMap<String, Vec<(SniPattern, Arc<UpstreamSet>)>>,
}

impl Routing {
    /// Compiles `config` (already validated). Connection counts of upstreams that `previous`
    /// also had are carried over.
    pub fn compile(config: ProxyConfig, previous: Option<&Routing>) -> Routing {
        let mut counters: HashMap<Target, Arc<AtomicUsize>> = HashMap::new();
        if let Some(prev) = previous {
            for set in prev.all_sets() {
                for u in set.upstreams.iter() {
                    counters.insert(u.target.clone(), u.active.clone());
                }
            }
        }
        let mut counter_for = |t: &Target| counters.entry(t.clone()).or_default().clone();

        let mut services: HashMap<String, HashMap<u16, PortRoutes>> = HashMap::new();
        for svc in &config.routes.services {
            let ports = services
                .entry(svc.hostname.to_ascii_lowercase())
                .or_default();
            for port in &svc.ports {
                let route: Arc<str> = format!("{}:{}", svc.hostname, port.port).into();
                let make =
                    |endpoints: &mut dyn Iterator<Item = &eastwest_routes::Endpoint>,
                     counter_for: &mut dyn FnMut(&Target) -> Arc<AtomicUsize>| {
                        let upstreams = endpoints
                            .map(|ep| {
                                let target = Target::Addr(ep.address);
                                Upstream {
                                    active: counter_for(&target),
                                    target,
                                }
                            })
                            .collect();
                        Arc::new(upstream_set(route.clone(), upstreams))
                    };
                let entry = ports.entry(port.port).or_default();
                entry.all = Some(make(&mut port.endpoints.iter(), &mut counter_for));
                for subset in &svc.subsets {
                    let mut selected = port.endpoints.iter().filter(|ep| subset.selects(ep));
                    entry
                        .subsets
                        .insert(subset.name.clone(), make(&mut selected, &mut counter_for));
                }
            }
        }

        let mut sni_rules = HashMap::new();
        for listener in &config.listeners {
            if listener.mode != ListenerMode::Sni {
                continue;
            }
            let mut rules: Vec<(SniPattern, Arc<UpstreamSet>)> = listener
                .rules
                .iter()
                .map(|rule| {
                    let upstreams = rule
                        .upstreams
                        .iter()
                        .map(|u| {
                            let target = match u.parse::<SocketAddr>() {
                                Ok(addr) => Target::Addr(addr),
                                Err(_) => Target::Name(u.clone()),
                            };
                            Upstream {
                                active: counter_for(&target),
                                target,
                            }
                        })
                        .collect();
                    let route = format!("{}/{}", listener.name, rule.sni).into();
                    (rule.sni.clone(), Arc::new(upstream_set(route, upstreams)))
                })
                .collect();
            rules.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.specificity()));
            sni_rules.insert(listener.name.clone(), rules);
        }

        Routing {
            config: Arc::new(config),
            services,
            sni_rules,
        }
    }

    /// Routes an Istio AUTO_PASSTHROUGH SNI to the endpoints of that service port (and subset).
    pub fn auto_passthrough(&self, sni: &IstioSni<'_>) -> Result<Arc<UpstreamSet>, RouteMiss> {
        let ports = if sni.hostname.bytes().any(|b| b.is_ascii_uppercase()) {
            self.services.get(&sni.hostname.to_ascii_lowercase())
        } else {
            self.services.get(sni.hostname)
        }
        .ok_or(RouteMiss::UnknownService)?;
        let port = ports.get(&sni.port).ok_or(RouteMiss::UnknownPort)?;
        let set = if sni.subset.is_empty() {
            port.all.as_ref().ok_or(RouteMiss::UnknownPort)?
        } else {
            port.subsets
                .get(sni.subset)
                .ok_or(RouteMiss::UnknownSubset)?
        };
        if set.upstreams.is_empty() {
            return Err(RouteMiss::NoEndpoints);
        }
        Ok(set.clone())
    }

    /// The most specific rule of `sni` listener `listener` matching `sni`.
    pub fn sni_rule(&self, listener: &str, sni: Option<&str>) -> Option<Arc<UpstreamSet>> {
        self.sni_rules
            .get(listener)?
            .iter()
            .find(|(pattern, _)| pattern.matches(sni))
            .map(|(_, set)| set.clone())
    }

    fn all_sets(&self) -> impl Iterator<Item = &Arc<UpstreamSet>> {
        let services = self.services.values().flat_map(|ports| {
            ports
                .values()
                .flat_map(|p| p.all.iter().chain(p.subsets.values()))
        });
        let rules = self.sni_rules.values().flatten().map(|(_, set)| set);
        services.chain(rules)
    }
}

fn upstream_set(route: Arc<str>, upstreams: Vec<Upstream>) -> UpstreamSet {
    UpstreamSet {
        bytes_to_upstream: m::bytes(&route, m::TO_UPSTREAM),
        bytes_to_downstream: m::bytes(&route, m::TO_DOWNSTREAM),
        route,
        upstreams: upstreams.into_boxed_slice(),
    }
}
