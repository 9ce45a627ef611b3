//! The compiled, immutable routing state a connection consults: built once per config or
//! route-table change from plain [`ProxyConfig`] data and a [`RouteTable`], then swapped
//! in whole. Services the new table shares with the previous one (the same `Arc`) cost a
//! pointer comparison: neither validated nor compiled again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use eastwest_routes::{
    Endpoint, Invalid, ListenerMode, ProxyConfig, RouteTable, Service, SniPattern, Workload,
};
use metrics::{Counter, Histogram};

use crate::istio_metrics::{ConnectionInfo, GatewayLabels, IstioTcp, ServiceLabels};
use crate::istio_sni::IstioSni;
use crate::metrics as m;
use crate::outlier::EndpointState;

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
    /// Connection count and outlier state, shared by every snapshot that lists this upstream
    /// so the balancer's view survives route swaps.
    pub state: Arc<EndpointState>,
    /// The Pod behind the endpoint, for Istio's `destination_*` labels.
    pub workload: Option<Arc<Workload>>,
    /// Istio series of TLS-passthrough connections to this endpoint, built on the first one
    /// in this route-table version (the next version builds anew: the workload may differ).
    istio: OnceLock<PassthroughSeries>,
}

impl Upstream {
    pub fn new(target: Target, state: Arc<EndpointState>, workload: Option<Arc<Workload>>) -> Self {
        Upstream {
            target,
            state,
            workload,
            istio: OnceLock::new(),
        }
    }
}

/// What a relayed passthrough connection counts into, beyond the route's own handles.
/// Cloned per connection (five `Arc` clones): the connection outlives the route table.
#[derive(Debug, Clone)]
pub struct PassthroughSeries {
    pub istio: IstioTcp,
    /// `eastwest_bytes_total{direction="to_upstream"}` and `istio_tcp_received_bytes_total`.
    pub to_upstream: metrics::Counter,
    /// `eastwest_bytes_total{direction="to_downstream"}` and `istio_tcp_sent_bytes_total`.
    pub to_downstream: metrics::Counter,
}

/// The endpoints one route may use.
#[derive(Debug)]
pub struct UpstreamSet {
    /// Metrics/log label: `<service fqdn>:<port>` or `<listener>/<sni pattern>`.
    pub route: Arc<str>,
    pub upstreams: Box<[Upstream]>,
    /// The destination service as Istio's labels name it.
    pub service: Arc<ServiceLabels>,
    /// Registered on first use, shared by the route's subsets and carried across swaps, so a
    /// table of thousands of services costs no metric registrations until traffic arrives.
    metrics: Arc<OnceLock<RouteMetrics>>,
}

/// Per-route metric handles: touching them is an atomic add, never a registry lookup.
#[derive(Debug)]
pub struct RouteMetrics {
    pub bytes_to_upstream: Counter,
    pub bytes_to_downstream: Counter,
    pub connect_duration: Histogram,
    /// Token timing: first response, record gaps and stalls.
    pub stream: m::token::StreamMetrics,
    /// `closed_total{result="routed"}` for the first listener that routed here (nearly
    /// always the only one).
    closed_routed: OnceLock<(Arc<str>, Counter)>,
}

impl RouteMetrics {
    pub fn closed_routed(&self, route: &str, listener: &Arc<str>) -> Counter {
        let (first, counter) = self.closed_routed.get_or_init(|| {
            let counter = m::closed(listener, route, m::Outcome::Routed);
            (listener.clone(), counter)
        });
        if first == listener {
            counter.clone()
        } else {
            m::closed(listener, route, m::Outcome::Routed)
        }
    }
}

impl UpstreamSet {
    pub fn metrics(&self) -> &RouteMetrics {
        self.metrics.get_or_init(|| RouteMetrics {
            bytes_to_upstream: m::bytes(&self.route, m::TO_UPSTREAM),
            bytes_to_downstream: m::bytes(&self.route, m::TO_DOWNSTREAM),
            connect_duration: metrics::histogram!(m::CONNECT_DURATION, "route" => self.route.to_string()),
            stream: m::token::StreamMetrics::new(&self.route),
            closed_routed: OnceLock::new(),
        })
    }
}

impl UpstreamSet {
    /// The Istio series (and combined byte counters) of a passthrough connection to upstream
    /// `index`, cached in the upstream for this route-table version.
    pub fn passthrough_series(&self, index: usize, routing: &Routing) -> &PassthroughSeries {
        let upstream = &self.upstreams[index];
        upstream.istio.get_or_init(|| {
            let istio = IstioTcp::new(
                &routing.telemetry,
                &self.service,
                upstream.workload.as_deref(),
                routing.trust_domain(),
                ConnectionInfo::PASSTHROUGH,
            );
            let route = self.metrics();
            PassthroughSeries {
                to_upstream: crate::istio_metrics::both(&route.bytes_to_upstream, &istio.received),
                to_downstream: crate::istio_metrics::both(&route.bytes_to_downstream, &istio.sent),
                istio,
            }
        })
    }

    /// The Istio series of a passthrough connection no endpoint of the route accepted
    /// (`response_flags="UF"`). Looked up each time: failures are not the hot path.
    pub fn passthrough_failure(&self, routing: &Routing) -> IstioTcp {
        IstioTcp::new(
            &routing.telemetry,
            &self.service,
            None,
            routing.trust_domain(),
            ConnectionInfo {
                response_flags: crate::istio_metrics::FLAGS_UPSTREAM_FAILURE,
                ..ConnectionInfo::PASSTHROUGH
            },
        )
    }
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
    /// The ambient endpoints, at `<ip>:<hbone_port>`, for `hbone` listeners (the waypoint's
    /// when the port has one); `None` when the port has none (sidecar-only services cost
    /// nothing more).
    hbone: Option<Arc<UpstreamSet>>,
}

/// One service's compiled routes, shared between snapshots while the service is unchanged.
#[derive(Default)]
struct ServiceRoutes {
    ports: HashMap<u16, PortRoutes>,
}

/// A service of the table and its compiled routes.
#[derive(Clone)]
struct CompiledService {
    /// What `routes` were compiled from (validated then).
    source: Arc<Service>,
    routes: Arc<ServiceRoutes>,
}

pub struct Routing {
    /// Listeners and settings this was compiled from; its `routes` are empty (see `routes`).
    pub config: Arc<ProxyConfig>,
    /// The route table in force, from the config file or from eastwest-control.
    pub routes: RouteTable,
    /// Keyed by lowercase service FQDN.
    services: HashMap<Arc<str>, CompiledService>,
    /// Per `sni` listener: rules, most specific first.
    sni_rules: HashMap<String, Vec<(SniPattern, Arc<UpstreamSet>)>>,
    /// Whether `routes.services` are in strict hostname order (then the next table may be
    /// applied by [`Routing::update`]).
    sorted: bool,
    /// The gateway's own labels in Istio's metrics, from `config.telemetry` and the
    /// environment.
    pub telemetry: Arc<GatewayLabels>,
}

/// The outcome of [`Routing::update`].
pub enum Update {
    Built(Routing),
    /// What is wrong with the services that changed (or the rest of the table).
    Invalid(Vec<Invalid>),
    /// Not derived from the table in force in hostname order: validate and compile it whole.
    NotIncremental(RouteTable),
}

/// `svc` compiled under the key `lower`: an unchanged service (the same `Arc`, or equal) reuses
/// `old`'s routes; a changed one carries over their connection counts and metric handles.
fn compile_entry(
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

impl Routing {
    /// Compiles `config` and `routes` (both already validated; `config.routes` is ignored).
    /// Services of `previous` reuse their compiled routes when they are the same `Arc` or
    /// equal, so a table where one endpoint moved costs one service's work; changed ones carry
    /// over their upstreams' connection counts and their metric handles.
    pub fn compile(
        config: Arc<ProxyConfig>,
        routes: RouteTable,
        previous: Option<&Routing>,
    ) -> Routing {
        let telemetry = Arc::new(GatewayLabels::from_config(&config.telemetry));
        // Upstreams cache Istio series carrying the gateway's labels: when those change, build
        // every route afresh rather than keep series with the old ones.
        let previous = previous.filter(|p| p.telemetry == telemetry);
        let mut services = HashMap::with_capacity(routes.services.len());
        for svc in &routes.services {
            let lower = lowercase(&svc.hostname);
            let old = previous.and_then(|p| p.services.get_key_value(&*lower));
            let (key, compiled) = compile_entry(svc, &lower, old);
            services.insert(key, compiled);
        }

        let mut carry = Carry::default();
        for (_, set) in previous.iter().flat_map(|p| p.sni_rules.values().flatten()) {
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

        let sorted = is_strictly_sorted(&routes.services);
        Routing {
            config,
            routes,
            services,
            sni_rules,
            sorted,
            telemetry,
        }
    }

    /// The trust domain of destination principals: the identity's, else Istio's default.
    pub fn trust_domain(&self) -> &str {
        self.config
            .identity
            .as_ref()
            .map_or("cluster.local", |i| i.trust_domain.as_str())
    }

    /// Validates and compiles `routes` on top of this routing in O(changed services): when
    /// both tables are in strict hostname order (as eastwest-control's are), one walk over
    /// both finds the services that are not the very `Arc` this routing holds; only those are
    /// validated and compiled, and the rest of the compiled map is shared.
    pub fn update(&self, routes: RouteTable) -> Update {
        if !self.sorted {
            return Update::NotIncremental(routes);
        }
        let Some((changed, removed)) = diff(&self.routes.services, &routes.services) else {
            return Update::NotIncremental(routes);
        };
        let mut errors = Vec::new();
        routes.validate_remote_and_gateways("", &mut errors);
        let mut services = self.services.clone();
        for &i in &removed {
            services.remove(&*lowercase(&self.routes.services[i].hostname));
        }
        for &j in &changed {
            let svc = &routes.services[j];
            let at = format!("services[{j}]");
            let before = errors.len();
            svc.validate(&at, &mut errors);
            let lower = lowercase(&svc.hostname);
            let old = services.get_key_value(&*lower);
            // Another spelling of a hostname still in the table.
            if old.is_some_and(|(_, other)| other.source.hostname != svc.hostname) {
                errors.push(Invalid::new(
                    format!("{at}.hostname"),
                    format!("service {} is listed twice", svc.hostname),
                ));
                continue;
            }
            if errors.len() > before {
                continue;
            }
            let (key, compiled) = compile_entry(svc, &lower, old);
            services.insert(key, compiled);
        }
        if !errors.is_empty() {
            return Update::Invalid(errors);
        }
        Update::Built(Routing {
            config: self.config.clone(),
            routes,
            services,
            sni_rules: self.sni_rules.clone(),
            sorted: true,
            telemetry: self.telemetry.clone(),
        })
    }

    /// Whether `svc` is the very service this routing was compiled from (and so validated).
    pub fn has_service(&self, svc: &Arc<Service>) -> bool {
        self.services
            .get(&*lowercase(&svc.hostname))
            .is_some_and(|c| Arc::ptr_eq(&c.source, svc))
    }

    /// The config in force with its route table, as `/config_dump` shows it.
    pub fn full_config(&self) -> ProxyConfig {
        ProxyConfig {
            routes: self.routes.clone(),
            ..(*self.config).clone()
        }
    }

    /// Routes an Istio AUTO_PASSTHROUGH SNI to the endpoints of that service port (and subset).
    pub fn auto_passthrough(&self, sni: &IstioSni<'_>) -> Result<Arc<UpstreamSet>, RouteMiss> {
        let service = if sni.hostname.bytes().any(|b| b.is_ascii_uppercase()) {
            self.services
                .get(sni.hostname.to_ascii_lowercase().as_str())
        } else {
            self.services.get(sni.hostname)
        }
        .ok_or(RouteMiss::UnknownService)?;
        let port = service
            .routes
            .ports
            .get(&sni.port)
            .ok_or(RouteMiss::UnknownPort)?;
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

    /// Routes an HBONE CONNECT authority (`hostname`, service `port`) to that service port's
    /// waypoint if it has one, else its ambient endpoints. Only names in the table route: nothing else is ever dialed.
    pub fn hbone(&self, hostname: &str, port: u16) -> Result<Arc<UpstreamSet>, RouteMiss> {
        let service = self
            .services
            .get(&*lowercase(hostname))
            .ok_or(RouteMiss::UnknownService)?;
        let port = service
            .routes
            .ports
            .get(&port)
            .ok_or(RouteMiss::UnknownPort)?;
        match &port.hbone {
            Some(set) => Ok(set.clone()),
            None => Err(RouteMiss::NoEndpoints),
        }
    }

    /// The most specific rule of `sni` listener `listener` matching `sni`.
    pub fn sni_rule(&self, listener: &str, sni: Option<&str>) -> Option<Arc<UpstreamSet>> {
        self.sni_rules
            .get(listener)?
            .iter()
            .find(|(pattern, _)| pattern.matches(sni))
            .map(|(_, set)| set.clone())
    }
}

fn is_strictly_sorted(services: &[Arc<Service>]) -> bool {
    services.windows(2).all(|w| w[0].hostname < w[1].hostname)
}

/// How `new` differs from `old` (strictly sorted by hostname): the indices of the services of
/// `new` that are not the same `Arc` as `old`'s, and of those of `old` that are gone. `None`
/// unless `new` is strictly sorted too — checked next to each changed service only, as the
/// unchanged ones keep `old`'s order.
fn diff(old: &[Arc<Service>], new: &[Arc<Service>]) -> Option<(Vec<usize>, Vec<usize>)> {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new.len() {
        if Arc::ptr_eq(&old[i], &new[j]) {
            i += 1;
            j += 1;
            continue;
        }
        match old[i].hostname.cmp(&new[j].hostname) {
            std::cmp::Ordering::Less => {
                removed.push(i);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                changed.push(j);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                changed.push(j);
                i += 1;
                j += 1;
            }
        }
    }
    removed.extend(i..old.len());
    changed.extend(j..new.len());
    let ordered = changed.iter().all(|&j| {
        (j == 0 || new[j - 1].hostname < new[j].hostname)
            && new
                .get(j + 1)
                .is_none_or(|next| new[j].hostname < next.hostname)
    });
    ordered.then_some((changed, removed))
}

/// `host` of `host:port` (or of `[v6]:port`).
fn host_of(upstream: &str) -> &str {
    let host = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Borrowed when already lowercase, as hostnames nearly always are.
fn lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
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

#[cfg(test)]
impl UpstreamSet {
    pub fn for_test(upstreams: Vec<Upstream>) -> Self {
        UpstreamSet {
            route: "test".into(),
            upstreams: upstreams.into_boxed_slice(),
            service: Arc::new(ServiceLabels::unknown()),
            metrics: Arc::default(),
        }
    }
}
