//! The compiled, immutable routing state a connection consults: built once per config or
//! route-table change from plain [`ProxyConfig`] data, then swapped in whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use eastwest_routes::{ListenerMode, ProxyConfig, SniPattern};
use metrics::{Counter, Histogram};

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
    pub connect_duration: Histogram,
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
        let mut build = SetBuilder::carrying_over(previous);
        let mut services: HashMap<String, HashMap<u16, PortRoutes>> = HashMap::new();
        for svc in &config.routes.services {
            let ports = services
                .entry(svc.hostname.to_ascii_lowercase())
                .or_default();
            for port in &svc.ports {
                let route: Arc<str> = format!("{}:{}", svc.hostname, port.port).into();
                let addrs = |eps: &mut dyn Iterator<Item = &eastwest_routes::Endpoint>| {
                    eps.map(|ep| Target::Addr(ep.address)).collect::<Vec<_>>()
                };
                let entry = ports.entry(port.port).or_default();
                entry.all = Some(build.set(&route, addrs(&mut port.endpoints.iter())));
                for subset in &svc.subsets {
                    let selected =
                        addrs(&mut port.endpoints.iter().filter(|ep| subset.selects(ep)));
                    entry
                        .subsets
                        .insert(subset.name.clone(), build.set(&route, selected));
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
                    let targets = rule
                        .upstreams
                        .iter()
                        .map(|u| match u.parse::<SocketAddr>() {
                            Ok(addr) => Target::Addr(addr),
                            Err(_) => Target::Name(u.clone()),
                        })
                        .collect();
                    let route: Arc<str> = format!("{}/{}", listener.name, rule.sni).into();
                    (rule.sni.clone(), build.set(&route, targets))
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

/// Makes upstream sets, reusing what the previous snapshot already had: each upstream's
/// connection count (so balancing survives swaps) and each route's metric handles (so a big
/// table update does not re-register thousands of series).
struct SetBuilder {
    active: HashMap<Target, Arc<AtomicUsize>>,
    metrics: HashMap<Arc<str>, RouteMetrics>,
}

impl SetBuilder {
    fn carrying_over(previous: Option<&Routing>) -> Self {
        let mut builder = SetBuilder {
            active: HashMap::new(),
            metrics: HashMap::new(),
        };
        for set in previous.iter().flat_map(|p| p.all_sets()) {
            for u in set.upstreams.iter() {
                builder.active.insert(u.target.clone(), u.active.clone());
            }
            builder
                .metrics
                .insert(set.route.clone(), RouteMetrics::of(set));
        }
        builder
    }

    fn set(&mut self, route: &Arc<str>, targets: Vec<Target>) -> Arc<UpstreamSet> {
        let upstreams = targets
            .into_iter()
            .map(|target| Upstream {
                active: self.active.entry(target.clone()).or_default().clone(),
                target,
            })
            .collect();
        let metrics = self
            .metrics
            .entry(route.clone())
            .or_insert_with(|| RouteMetrics::new(route))
            .clone();
        Arc::new(UpstreamSet {
            route: route.clone(),
            upstreams,
            bytes_to_upstream: metrics.bytes_to_upstream,
            bytes_to_downstream: metrics.bytes_to_downstream,
            connect_duration: metrics.connect_duration,
        })
    }
}

#[derive(Clone)]
struct RouteMetrics {
    bytes_to_upstream: Counter,
    bytes_to_downstream: Counter,
    connect_duration: Histogram,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        RouteMetrics {
            bytes_to_upstream: m::bytes(route, m::TO_UPSTREAM),
            bytes_to_downstream: m::bytes(route, m::TO_DOWNSTREAM),
            connect_duration: metrics::histogram!(m::CONNECT_DURATION, "route" => route.to_string()),
        }
    }

    fn of(set: &UpstreamSet) -> Self {
        RouteMetrics {
            bytes_to_upstream: set.bytes_to_upstream.clone(),
            bytes_to_downstream: set.bytes_to_downstream.clone(),
            connect_duration: set.connect_duration.clone(),
        }
    }
}
