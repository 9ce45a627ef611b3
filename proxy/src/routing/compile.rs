//! Building the compiled routes of a service or of an `sni` listener, carrying over what a
//! rebuilt route keeps from its previous version.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use eastwest_routes::{Endpoint, ListenerMode, ProxyConfig, Service, SniPattern, Workload};

use super::upstream::{RouteMetrics, Target, Upstream, UpstreamSet};
use crate::istio_metrics::ServiceLabels;
use crate::outlier::EndpointState;

#[derive(Default)]
pub(super) struct PortRoutes {
    pub(super) all: Option<Arc<UpstreamSet>>,
    pub(super) subsets: HashMap<String, Arc<UpstreamSet>>,
    /// The ambient endpoints, at `<ip>:<hbone_port>`, for `hbone` listeners (the waypoint's
    /// when the port has one); `None` when the port has none (sidecar-only services cost
    /// nothing more).
    pub(super) hbone: Option<Arc<UpstreamSet>>,
}

/// One service's compiled routes, shared between snapshots while the service is unchanged.
#[derive(Default)]
pub(super) struct ServiceRoutes {
    pub(super) ports: HashMap<u16, PortRoutes>,
}

/// A service of the table and its compiled routes.
#[derive(Clone)]
pub(super) struct CompiledService {
    /// What `routes` were compiled from (validated then).
    pub(super) source: Arc<Service>,
    pub(super) routes: Arc<ServiceRoutes>,
}

/// `svc` compiled under the key `lower`: an unchanged service (the same `Arc`, or equal) reuses
/// `old`'s routes; a changed one carries over their connection counts and metric handles.
pub(super) fn compile_entry(
    svc: &Arc<Service>,
    lower: &str,
    old: Option<(&Arc<str>, &CompiledService)>,
) -> (Arc<str>, CompiledService) {
    let (key, routes) = match old {
        Some((key, old)) if Arc::ptr_eq(&old.source, svc) || *old.source == **svc => {
            (key.clone(), old.routes.clone())
        }
        Some((key, old)) => (
            key.clone(),
            Arc::new(compile_service(svc, Some(&old.routes))),
        ),
        None => (Arc::from(lower), Arc::new(compile_service(svc, None))),
    };
    let source = svc.clone();
    (key, CompiledService { source, routes })
}

fn compile_service(svc: &Service, old: Option<&ServiceRoutes>) -> ServiceRoutes {
    let mut carry = Carry::default();
    for port in old.iter().flat_map(|o| o.ports.values()) {
        for set in port
            .all
            .iter()
            .chain(port.subsets.values())
            .chain(&port.hbone)
        {
            carry.add(set);
        }
    }
    let mut compiled = ServiceRoutes::default();
    let service = Arc::new(ServiceLabels::from_host(&svc.hostname));
    for port in &svc.ports {
        let route: Arc<str> = format!("{}:{}", svc.hostname, port.port).into();
        let targets = |eps: &mut dyn Iterator<Item = &Endpoint>| {
            eps.map(|ep| (Target::Addr(ep.address), ep.workload.clone()))
                .collect::<Vec<_>>()
        };
        let entry = compiled.ports.entry(port.port).or_default();
        entry.all = Some(carry.set(&route, &service, targets(&mut port.endpoints.iter())));
        for subset in &svc.subsets {
            let selected = targets(&mut port.endpoints.iter().filter(|ep| subset.selects(ep)));
            entry
                .subsets
                .insert(subset.name.clone(), carry.set(&route, &service, selected));
        }
        // The same route (and so the same metric series) as 15443's: only the endpoints
        // that speak HBONE, at their destination ztunnel's port. A service behind a waypoint
        // is reached through the waypoint instead (as Istio's east-west gateway does), so the
        // waypoint's L7 policy applies to cross-network traffic too.
        let hbone: Vec<_> = if port.waypoint.is_empty() {
            port.endpoints
                .iter()
                .filter_map(|ep| {
                    let hbone_port = ep.hbone_port?;
                    let target = Target::Addr(SocketAddr::new(ep.address.ip(), hbone_port));
                    Some((target, ep.workload.clone()))
                })
                .collect()
        } else {
            port.waypoint
                .iter()
                .map(|ep| {
                    let at = ep
                        .hbone_port
                        .map_or(ep.address, |p| SocketAddr::new(ep.address.ip(), p));
                    (Target::Addr(at), ep.workload.clone())
                })
                .collect()
        };
        if !hbone.is_empty() {
            entry.hbone = Some(carry.set(&route, &service, hbone));
        }
    }
    compiled
}

/// Per `sni` listener: its rules, most specific first.
pub(super) type SniRules = HashMap<String, Vec<(SniPattern, Arc<UpstreamSet>)>>;

/// The rules of `config`'s `sni` listeners. Routes of `previous` (the rules in force) carry
/// over their upstreams' connection counts and metric handles.
pub(super) fn compile_sni_rules(config: &ProxyConfig, previous: Option<&SniRules>) -> SniRules {
    let mut carry = Carry::default();
    for (_, set) in previous.iter().flat_map(|rules| rules.values().flatten()) {
        carry.add(set);
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
                let targets: Vec<Target> = rule
                    .upstreams
                    .iter()
                    .map(|u| match u.parse::<SocketAddr>() {
                        Ok(addr) => Target::Addr(addr),
                        Err(_) => Target::Name(u.clone()),
                    })
                    .collect();
                let route: Arc<str> = format!("{}/{}", listener.name, rule.sni).into();
                // The first upstream's host names the destination service (e.g. istiod's).
                let service = match rule.upstreams.first().map(|u| host_of(u)) {
                    Some(host) if host.parse::<std::net::IpAddr>().is_err() => {
                        ServiceLabels::from_host(host)
                    }
                    _ => ServiceLabels::unknown(),
                };
                let targets = targets.into_iter().map(|t| (t, None)).collect();
                (
                    rule.sni.clone(),
                    carry.set(&route, &Arc::new(service), targets),
                )
            })
            .collect();
        rules.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.specificity()));
        sni_rules.insert(listener.name.clone(), rules);
    }
    sni_rules
}

/// `host` of `host:port` (or of `[v6]:port`).
fn host_of(upstream: &str) -> &str {
    let host = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a rebuilt route keeps from its previous version: each upstream's connection count and
/// outlier state (so balancing and ejections survive swaps) and the route's metric handles.
#[derive(Default)]
struct Carry {
    state: HashMap<Target, Arc<EndpointState>>,
    metrics: HashMap<Arc<str>, Arc<OnceLock<RouteMetrics>>>,
}

impl Carry {
    fn add(&mut self, set: &UpstreamSet) {
        for u in set.upstreams.iter() {
            self.state.insert(u.target.clone(), u.state.clone());
        }
        self.metrics.insert(set.route.clone(), set.metrics.clone());
    }

    fn set(
        &mut self,
        route: &Arc<str>,
        service: &Arc<ServiceLabels>,
        targets: Vec<(Target, Option<Arc<Workload>>)>,
    ) -> Arc<UpstreamSet> {
        let upstreams = targets
            .into_iter()
            .map(|(target, workload)| {
                let state = self.state.entry(target.clone()).or_default().clone();
                Upstream::new(target, state, workload)
            })
            .collect();
        Arc::new(UpstreamSet {
            route: route.clone(),
            upstreams,
            service: service.clone(),
            metrics: self.metrics.entry(route.clone()).or_default().clone(),
        })
    }
}
