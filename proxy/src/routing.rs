//! The compiled, immutable routing state a connection consults: built once per config or
//! route-table change from plain [`ProxyConfig`] data and a [`RouteTable`], then swapped
//! in whole. Services the new table shares with the previous one (the same `Arc`) cost a
//! pointer comparison: neither validated nor compiled again.

mod compile;
mod diff;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;

use eastwest_routes::{Invalid, ProxyConfig, RouteTable, Service};

use crate::istio_metrics::GatewayLabels;
use crate::istio_sni::IstioSni;
use compile::{compile_entry, compile_sni_rules, CompiledService, SniRules};
use diff::{diff, is_strictly_sorted};
#[cfg(test)]
pub use upstream::Upstream;
pub use upstream::{PassthroughSeries, Target, UpstreamSet};

/// Why an auto-passthrough SNI did not route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMiss {
    UnknownService,
    UnknownPort,
    UnknownSubset,
    /// The route exists but has no ready endpoint.
    NoEndpoints,
}

/// The routing state in force: compiled services and `sni` rules, swapped whole on a change.
pub struct Routing {
    /// Listeners and settings this was compiled from; its `routes` are empty (see `routes`).
    pub config: Arc<ProxyConfig>,
    /// The route table in force, from the config file or from eastwest-control.
    pub routes: RouteTable,
    /// Keyed by lowercase service FQDN.
    services: HashMap<Arc<str>, CompiledService>,
    /// Per `sni` listener: rules, most specific first.
    sni_rules: SniRules,
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

        let sni_rules = compile_sni_rules(&config, previous.map(|p| &p.sni_rules));

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

/// Borrowed when already lowercase, as hostnames nearly always are.
fn lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}
