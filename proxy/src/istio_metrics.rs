//! Istio's standard TCP metrics (`istio_tcp_*`), labelled as Istio's own east-west gateway
//! labels them, so Kiali and Istio's dashboards see the gateway hop. docs/telemetry.md says
//! where each label value comes from.
//!
//! Series are keyed by (route, endpoint workload, source principal, request protocol) only:
//! no client address or connection ID, so their number is bounded by the route table.
//! Their handles are built on a route's first connection to an endpoint in a route-table
//! version and cached there; relaying a chunk costs atomic adds, never a lookup.

use std::sync::Arc;

use eastwest_routes::{TelemetryConfig, Workload};
use metrics::{counter, describe_counter, Counter, CounterFn, Label};

pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
pub const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
/// Bytes sent to the downstream (the response direction), as Envoy's `connection.sent_bytes`.
pub const TCP_SENT: &str = "istio_tcp_sent_bytes_total";
/// Bytes received from the downstream (the request direction).
pub const TCP_RECEIVED: &str = "istio_tcp_received_bytes_total";

/// How Istio writes a value it does not know.
pub const UNKNOWN: &str = "unknown";
/// Envoy's response flags: none, or "upstream connection failure".
pub const FLAGS_NONE: &str = "-";
pub const FLAGS_UPSTREAM_FAILURE: &str = "UF";

/// The gateway itself as the `source_*` labels name it (Istio's gateways report as
/// `reporter="source"`: the gateway is the client of the endpoint). Fixed per config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayLabels {
    workload: String,
    namespace: String,
    cluster: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
}

impl GatewayLabels {
    /// From the config's `telemetry:` with what it leaves out filled from the environment.
    pub fn from_config(config: &TelemetryConfig) -> Self {
        Self::resolve(&config.with_env(|k| std::env::var(k).ok()))
    }

    fn resolve(t: &TelemetryConfig) -> Self {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.to_string());
        let workload = or_unknown(&t.workload);
        GatewayLabels {
            canonical_service: t.app.clone().unwrap_or_else(|| workload.clone()),
            canonical_revision: t.version.clone().unwrap_or_else(|| "latest".to_string()),
            namespace: or_unknown(&t.namespace),
            cluster: or_unknown(&t.cluster),
            app: or_unknown(&t.app),
            version: or_unknown(&t.version),
            workload,
        }
    }
}

/// The destination service of a route, split as Istio labels it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    /// `destination_service`: the FQDN.
    host: Arc<str>,
    name: Arc<str>,
    namespace: Arc<str>,
}

impl ServiceLabels {
    /// `<name>.<namespace>.svc.<domain>` splits into name and namespace; other hosts (a
    /// ServiceEntry's, an address) keep the host as the name and an unknown namespace.
    pub fn from_host(host: &str) -> Self {
        let mut parts = host.splitn(4, '.');
        let (name, namespace, svc) = (parts.next(), parts.next(), parts.next());
        let (name, namespace) = match (name, namespace, svc) {
            (Some(n), Some(ns), Some("svc")) => (n, ns),
            _ => (host, UNKNOWN),
        };
        ServiceLabels {
            host: host.into(),
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    pub fn unknown() -> Self {
        ServiceLabels {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }
}

/// What the listener knows about the connection beyond the route and endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The client's SPIFFE ID when the listener verified it (hbone's mTLS), for
    /// `source_principal`; `None` on TLS passthrough, where the gateway sees no certificate.
    pub peer_principal: Option<&'a str>,
    /// `request_protocol`: `tcp` for both passthrough and HBONE tunnels.
    pub request_protocol: &'static str,
    /// `connection_security_policy`: Istio writes `unknown` for `reporter="source"`.
    pub security_policy: &'static str,
    /// `response_flags`: [`FLAGS_NONE`], or [`FLAGS_UPSTREAM_FAILURE`] when no endpoint
    /// accepted.
    pub response_flags: &'static str,
}

impl ConnectionInfo<'static> {
    /// A TLS-passthrough connection (auto-passthrough and `sni` listeners).
    pub const PASSTHROUGH: ConnectionInfo<'static> = ConnectionInfo {
        peer_principal: None,
        request_protocol: "tcp",
        security_policy: UNKNOWN,
        response_flags: FLAGS_NONE,
    };
}

/// The four `istio_tcp_*` series of one (route, endpoint workload, connection kind).
#[derive(Debug, Clone)]
pub struct IstioTcp {
    pub opened: Counter,
    pub closed: Counter,
    /// `istio_tcp_received_bytes_total`: client → endpoint.
    pub received: Counter,
    /// `istio_tcp_sent_bytes_total`: endpoint → client.
    pub sent: Counter,
}

impl IstioTcp {
    /// The series for a connection through `service` to an endpoint of `workload` (`None`:
    /// not known, or no endpoint accepted), reported by the gateway `gateway`. This is the
    /// call every listener kind makes; it does registry lookups, so call it once per
    /// connection or cache the result (the passthrough path caches it per endpoint and
    /// route-table version, see `routing::Upstream::istio`).
    pub fn new(
        gateway: &GatewayLabels,
        service: &ServiceLabels,
        workload: Option<&Workload>,
        trust_domain: &str,
        conn: ConnectionInfo<'_>,
    ) -> Self {
        let labels = labels(gateway, service, workload, trust_domain, conn);
        let make = |name: &'static str| counter!(name, labels.clone());
        IstioTcp {
            opened: make(TCP_OPENED),
            closed: make(TCP_CLOSED),
            received: make(TCP_RECEIVED),
            sent: make(TCP_SENT),
        }
    }
}

fn labels(
    gw: &GatewayLabels,
    svc: &ServiceLabels,
    wl: Option<&Workload>,
    trust_domain: &str,
    conn: ConnectionInfo<'_>,
) -> Vec<Label> {
    let s = |v: &str| v.to_string();
    let opt = |v: Option<&String>| v.map_or_else(|| s(UNKNOWN), |v| v.clone());
    let dest_workload = wl.map_or_else(|| s(UNKNOWN), |w| w.name.clone());
    let dest_principal = match wl {
        Some(Workload {
            namespace,
            service_account: Some(sa),
            ..
        }) => format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"),
        _ => s(UNKNOWN),
    };
    let app = wl.and_then(|w| w.app.as_ref());
    let version = wl.and_then(|w| w.version.as_ref());
    vec![
        Label::new("reporter", "source"),
        Label::new("source_workload", gw.workload.clone()),
        Label::new("source_workload_namespace", gw.namespace.clone()),
        Label::new(
            "source_principal",
            s(conn.peer_principal.unwrap_or(UNKNOWN)),
        ),
        Label::new("source_app", gw.app.clone()),
        Label::new("source_version", gw.version.clone()),
        Label::new("source_canonical_service", gw.canonical_service.clone()),
        Label::new("source_canonical_revision", gw.canonical_revision.clone()),
        Label::new("source_cluster", gw.cluster.clone()),
        Label::new("destination_workload", dest_workload.clone()),
        Label::new(
            "destination_workload_namespace",
            wl.map_or_else(|| s(UNKNOWN), |w| w.namespace.clone()),
        ),
        Label::new("destination_principal", dest_principal),
        Label::new("destination_app", opt(app)),
        Label::new("destination_version", opt(version)),
        // Istio's canonical service defaults to the app label, else the workload name; its
        // revision to the version label, else `latest`.
        Label::new(
            "destination_canonical_service",
            app.cloned().unwrap_or(dest_workload),
        ),
        Label::new(
            "destination_canonical_revision",
            match (wl, version) {
                (_, Some(v)) => v.clone(),
                (Some(_), None) => s("latest"),
                (None, None) => s(UNKNOWN),
            },
        ),
        Label::new("destination_service", s(&svc.host)),
        Label::new("destination_service_name", s(&svc.name)),
        Label::new("destination_service_namespace", s(&svc.namespace)),
        Label::new(
            "destination_cluster",
            opt(wl.and_then(|w| w.cluster.as_ref())),
        ),
        Label::new("request_protocol", conn.request_protocol),
        Label::new("response_flags", conn.response_flags),
        Label::new("connection_security_policy", conn.security_policy),
    ]
}

/// Counts into two counters at once: the relay gets one handle per direction and feeds both
/// `eastwest_bytes_total` and the Istio byte counter from it (two atomic adds a chunk).
#[derive(Debug)]
struct Both(Counter, Counter);

impl CounterFn for Both {
    fn increment(&self, value: u64) {
        self.0.increment(value);
        self.1.increment(value);
    }

    fn absolute(&self, value: u64) {
        self.0.absolute(value);
        self.1.absolute(value);
    }
}

/// One counter handle that adds to `a` and `b`.
pub fn both(a: &Counter, b: &Counter) -> Counter {
    Counter::from_arc(Arc::new(Both(a.clone(), b.clone())))
}

pub(crate) fn describe() {
    describe_counter!(
        TCP_OPENED,
        "Istio standard metric: TCP connections opened through the gateway, by route and endpoint workload."
    );
    describe_counter!(
        TCP_CLOSED,
        "Istio standard metric: TCP connections closed, by route and endpoint workload."
    );
    describe_counter!(
        TCP_SENT,
        metrics::Unit::Bytes,
        "Istio standard metric: bytes sent to the client (responses), by route and endpoint workload."
    );
    describe_counter!(
        TCP_RECEIVED,
        metrics::Unit::Bytes,
        "Istio standard metric: bytes received from the client (requests), by route and endpoint workload."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_service_hosts_split_into_name_and_namespace() {
        let s = ServiceLabels::from_host("sglang.demo.svc.cluster.local");
        assert_eq!((&*s.name, &*s.namespace), ("sglang", "demo"));
        let s = ServiceLabels::from_host("api.example.com");
        assert_eq!((&*s.name, &*s.namespace), ("api.example.com", UNKNOWN));
    }

    #[test]
    fn unknown_values_are_written_as_istio_writes_them() {
        let gw = GatewayLabels::resolve(&TelemetryConfig::default());
        let svc = ServiceLabels::from_host("sglang.demo.svc.cluster.local");
        let labels = labels(
            &gw,
            &svc,
            None,
            "cluster.local",
            ConnectionInfo::PASSTHROUGH,
        );
        let get = |k: &str| {
            labels
                .iter()
                .find(|l| l.key() == k)
                .map(|l| l.value().to_string())
        };
        assert_eq!(get("source_workload").as_deref(), Some(UNKNOWN));
        assert_eq!(get("destination_workload").as_deref(), Some(UNKNOWN));
        assert_eq!(get("destination_principal").as_deref(), Some(UNKNOWN));
        assert_eq!(get("reporter").as_deref(), Some("source"));
        assert_eq!(get("response_flags").as_deref(), Some("-"));
        let wl = Workload {
            name: "sglang".into(),
            namespace: "demo".into(),
            app: Some("sglang".into()),
            version: None,
            service_account: Some("sglang-sa".into()),
            cluster: Some("ash".into()),
        };
        let labels = labels_for(&gw, &svc, &wl);
        assert!(labels.contains(&(
            "destination_principal".into(),
            "spiffe://cluster.local/ns/demo/sa/sglang-sa".into()
        )));
        assert!(labels.contains(&("destination_canonical_revision".into(), "latest".into())));
        assert!(labels.contains(&("destination_version".into(), UNKNOWN.into())));
    }

    fn labels_for(gw: &GatewayLabels, svc: &ServiceLabels, wl: &Workload) -> Vec<(String, String)> {
        labels(
            gw,
            svc,
            Some(wl),
            "cluster.local",
            ConnectionInfo::PASSTHROUGH,
        )
        .into_iter()
        .map(|l| (l.key().to_string(), l.value().to_string()))
        .collect()
    }
}
