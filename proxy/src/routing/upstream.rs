//! The endpoints a route may use, and what connecting to them counts into: the per-route
//! metric handles and the Istio series of each upstream, registered on first use.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use eastwest_routes::Workload;
use metrics::{Counter, Histogram};

use super::Routing;
use crate::istio_metrics::{ConnectionInfo, IstioTcp, ServiceLabels};
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
    pub(super) metrics: Arc<OnceLock<RouteMetrics>>,
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
