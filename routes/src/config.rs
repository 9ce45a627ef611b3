//! `eastwest-proxy --config FILE`: listeners, upstream behaviour, admin, and a route table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::table::check_host_port;
use crate::{Invalid, RouteTable, SniPattern};

mod identity;
mod telemetry;
pub use identity::{IdentityConfig, IdentityFiles, IstiodCa};
pub use telemetry::TelemetryConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    /// After SIGTERM, readiness fails at once but listeners keep accepting and routing this
    /// long (default 5s), so a load balancer has time to see the failed health check and stop
    /// sending new connections before the ports close. Then `drain_period` begins.
    #[serde(default = "defaults::drain_accept_period", with = "humantime_serde")]
    pub drain_accept_period: Duration,
    /// Once the listeners have closed: how long established connections may keep flowing
    /// before the rest are closed and the process exits (default 30s). A pod's grace period
    /// must exceed `drain_accept_period + drain_period`.
    #[serde(default = "defaults::drain_period", with = "humantime_serde")]
    pub drain_period: Duration,
    /// One log line per finished connection (target `eastwest::access`).
    #[serde(default)]
    pub access_log: bool,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    pub listeners: Vec<ListenerConfig>,
    /// Used as-is from a file; replaced by eastwest-control's tables with `--control`.
    #[serde(default)]
    pub routes: RouteTable,
    /// The gateway's own mesh identity; `hbone` listeners need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// Who the gateway is in Istio's standard metrics (`istio_tcp_*`'s `source_*` labels).
    #[serde(default, skip_serializing_if = "TelemetryConfig::is_empty")]
    pub telemetry: TelemetryConfig,
}

/// The three admin servers, laid out as Istio's gateways do. Read at startup only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawAdminConfig")]
pub struct AdminConfig {
    /// Serves only `GET /healthz/ready` (Istio's status port; what a load balancer's health
    /// check and the kubelet probe). Default `0.0.0.0:15021`. The load balancer publishes
    /// it, so nothing else is on it.
    pub status_address: SocketAddr,
    /// Serves `GET /metrics` for Prometheus (Istio's merged-metrics port). Default
    /// `0.0.0.0:15020`: reachable in-cluster, never published on the load balancer.
    pub metrics_address: SocketAddr,
    /// `/config_dump` (settings, route table, last reload error), plus `/metrics` and
    /// `/healthz/ready`. Default `127.0.0.1:15000` (Envoy's admin port): the route table
    /// names services and pod IPs, so only `kubectl port-forward` or `exec` reaches it.
    pub debug_address: SocketAddr,
    /// Set when the file used the old `admin.address` (one port for everything), read as
    /// `status_address`; the proxy warns where `/metrics` and `/config_dump` went.
    #[serde(skip_serializing)]
    pub legacy_address: bool,
}

/// `admin:` as written, before the old `address` key is mapped onto `status_address`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminConfig {
    status_address: Option<SocketAddr>,
    metrics_address: Option<SocketAddr>,
    debug_address: Option<SocketAddr>,
    /// Before the split: `/healthz/ready`, `/metrics` and `/config_dump` on one port.
    address: Option<SocketAddr>,
}

impl TryFrom<RawAdminConfig> for AdminConfig {
    type Error = String;

    fn try_from(raw: RawAdminConfig) -> Result<Self, String> {
        if raw.address.is_some() && raw.status_address.is_some() {
            return Err("`address` is the old name of `status_address`: give only one".into());
        }
        Ok(AdminConfig {
            status_address: raw
                .status_address
                .or(raw.address)
                .unwrap_or_else(defaults::status_address),
            metrics_address: raw
                .metrics_address
                .unwrap_or_else(defaults::metrics_address),
            debug_address: raw.debug_address.unwrap_or_else(defaults::debug_address),
            legacy_address: raw.address.is_some(),
        })
    }
}

impl AdminConfig {
    /// All three servers on 127.0.0.1, any free port: for tests and tools.
    pub fn loopback_any_port() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        AdminConfig {
            status_address: any,
            metrics_address: any,
            debug_address: any,
            legacy_address: false,
        }
    }

    /// (key, address) of each server, for validation and messages.
    pub fn addresses(&self) -> [(&'static str, SocketAddr); 3] {
        [
            ("admin.status_address", self.status_address),
            ("admin.metrics_address", self.metrics_address),
            ("admin.debug_address", self.debug_address),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Endpoints tried per connection (each a different endpoint when there are several).
    #[serde(default = "defaults::connect_attempts")]
    pub connect_attempts: u32,
    /// A connection with no bytes either way for this long is closed. Long by default: a
    /// model may think for minutes between tokens.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// TCP keepalive idle time on both sides, whole seconds from 1s to 32767s.
    #[serde(default = "defaults::tcp_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// `auto` (default): a direction that carries bulk (64 KiB moved in reads that filled the
    /// buffer) moves its bytes socket → pipe → socket with `splice(2)`, without copying them
    /// through the proxy; small messages keep plain reads and writes, and either way bytes
    /// leave as soon as they arrive. Such a connection is then relayed by one of the proxy's
    /// bulk threads (one per worker thread, `eastwest-bulk-N`): a plain epoll loop, cheaper per wake-up
    /// than the async runtime. `in-runtime`: splice the same, but on the runtime's worker
    /// threads. `off`: always read and write.
    #[serde(default)]
    pub splice: Splice,
    /// A gap this long between two records of a streaming response counts as a stall
    /// (`eastwest_stream_stalls_total`): a token stream that stopped, read from TLS record
    /// timing at the gateway.
    #[serde(default = "defaults::stall_threshold", with = "humantime_serde")]
    pub stall_threshold: Duration,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Splice {
    #[default]
    Auto,
    InRuntime,
    Off,
}

/// Passive outlier detection (Envoy's, for connect failures): an endpoint whose connect is
/// refused, reset or times out `consecutive_failures` times in a row is ejected — new
/// connections avoid it — for `base_ejection_time` × the number of consecutive ejections, at
/// most `max_ejection_time`. When that ends one connection probes it (half-open): success
/// returns it to the pool, failure ejects it again for longer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Off: every endpoint stays a candidate, however often it fails. Default true.
    #[serde(default = "defaults::outlier_enabled")]
    pub enabled: bool,
    /// Connect failures in a row that eject an endpoint. Default 1: a refused or timed-out
    /// connect is unambiguous, and each further try costs a client up to `connect_timeout`.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection's length; the n-th consecutive one lasts n times this. Default 30s.
    #[serde(default = "defaults::base_ejection_time", with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Cap on one ejection's length. Default 300s.
    #[serde(default = "defaults::max_ejection_time", with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// Most endpoints of a route (service port or subset) ejected at once, in percent of
    /// them; one may always be ejected, but never the last one not ejected. Default 50.
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancing {
    #[default]
    LeastConnections,
    PowerOfTwoChoices,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Names the listener in metrics and logs.
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub mode: ListenerMode,
    /// `sni` mode only: first the most specific matching rule wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SniRule>,
    /// A client that has not sent a whole ClientHello by then is closed.
    #[serde(default = "defaults::hello_timeout", with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Connections beyond this are refused (closed at once) and counted as `overloaded`.
    /// Default: derived from the open-file limit (after raising the soft limit to the hard
    /// one), `(limit - reserve) / 2` — a relayed connection holds two descriptors, and the
    /// reserve keeps the admin servers, reloads and control reachable. Set it explicitly to
    /// share the limit between several busy listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Hand a connection to the proxy only once its first bytes have arrived (Linux
    /// `TCP_DEFER_ACCEPT`). TLS clients speak first, so the ClientHello is read at once instead
    /// of after another wakeup. A client that connects and stays silent is handed over after
    /// about a second and then gets `hello_timeout`; one that closes before (a TCP health
    /// check) never reaches the proxy or its metrics.
    #[serde(default = "defaults::defer_accept")]
    pub defer_accept: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerMode {
    /// Istio AUTO_PASSTHROUGH: route by `outbound_.<port>_.<subset>_.<fqdn>` to the route table.
    #[default]
    AutoPassthrough,
    /// Fixed rules: SNI pattern to upstream addresses.
    Sni,
    /// Istio ambient's double HBONE (Istio's port 15008): HTTP/2 CONNECT over mTLS; the
    /// `:authority` names a service port in the route table, and the stream's bytes (the inner
    /// HBONE) go unopened to an ambient endpoint's `hbone_port`. Needs `identity`.
    Hbone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRule {
    pub sni: SniPattern,
    /// `host:port` targets; names are resolved at connect time (e.g. a Kubernetes Service).
    pub upstreams: Vec<String>,
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn drain_accept_period() -> Duration {
        Duration::from_secs(5)
    }
    pub fn drain_period() -> Duration {
        Duration::from_secs(30)
    }
    pub fn status_address() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15021))
    }
    pub fn metrics_address() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15020))
    }
    pub fn debug_address() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15000))
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn connect_attempts() -> u32 {
        3
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn tcp_keepalive() -> Duration {
        Duration::from_secs(60)
    }
    pub fn stall_threshold() -> Duration {
        Duration::from_secs(1)
    }
    pub fn hello_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn defer_accept() -> bool {
        true
    }
    pub fn outlier_enabled() -> bool {
        true
    }
    pub fn consecutive_failures() -> u32 {
        1
    }
    pub fn base_ejection_time() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection_time() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            status_address: defaults::status_address(),
            metrics_address: defaults::metrics_address(),
            debug_address: defaults::debug_address(),
            legacy_address: false,
        }
    }
}

/// The largest TCP keepalive idle time Linux accepts (MAX_TCP_KEEPIDLE), about 9 hours.
pub const MAX_TCP_KEEPALIVE_SECS: u64 = 32767;

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: defaults::connect_timeout(),
            connect_attempts: defaults::connect_attempts(),
            idle_timeout: defaults::idle_timeout(),
            tcp_keepalive: defaults::tcp_keepalive(),
            load_balancing: LoadBalancing::default(),
            splice: Splice::default(),
            stall_threshold: defaults::stall_threshold(),
            outlier_detection: OutlierDetection::default(),
        }
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            enabled: defaults::outlier_enabled(),
            consecutive_failures: defaults::consecutive_failures(),
            base_ejection_time: defaults::base_ejection_time(),
            max_ejection_time: defaults::max_ejection_time(),
            max_ejection_percent: defaults::max_ejection_percent(),
        }
    }
}

impl OutlierDetection {
    fn validate(&self, errors: &mut Vec<Invalid>) {
        let at = "upstream.outlier_detection";
        if self.consecutive_failures == 0 {
            errors.push(Invalid::new(
                format!("{at}.consecutive_failures"),
                "must be at least 1",
            ));
        }
        // Millisecond resolution: the proxy keeps ejection deadlines in whole milliseconds.
        if self.base_ejection_time < Duration::from_millis(1) {
            errors.push(Invalid::new(
                format!("{at}.base_ejection_time"),
                "must be at least 1ms",
            ));
        }
        if self.max_ejection_time < self.base_ejection_time {
            errors.push(Invalid::new(
                format!("{at}.max_ejection_time"),
                "must not be less than base_ejection_time",
            ));
        }
        if self.max_ejection_percent > 100 {
            errors.push(Invalid::new(
                format!("{at}.max_ejection_percent"),
                "must be from 0 to 100",
            ));
        }
    }
}

impl ListenerConfig {
    /// A listener with defaults for everything but name, address and mode.
    pub fn new(name: &str, address: SocketAddr, mode: ListenerMode) -> Self {
        ListenerConfig {
            name: name.to_string(),
            address,
            mode,
            rules: Vec::new(),
            hello_timeout: defaults::hello_timeout(),
            max_connections: None,
            defer_accept: defaults::defer_accept(),
        }
    }
}

impl ProxyConfig {
    /// A config with default settings, the given listeners and an empty route table.
    pub fn with_listeners(listeners: Vec<ListenerConfig>) -> Self {
        ProxyConfig {
            admin: AdminConfig::default(),
            drain_accept_period: defaults::drain_accept_period(),
            drain_period: defaults::drain_period(),
            access_log: false,
            upstream: UpstreamConfig::default(),
            listeners,
            routes: RouteTable::default(),
            identity: None,
            telemetry: TelemetryConfig::default(),
        }
    }

    /// Every problem found, each naming its field; empty when the config can be used.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut errors = Vec::new();
        if self.listeners.is_empty() {
            errors.push(Invalid::new("listeners", "at least one listener is needed"));
        }
        if self.upstream.connect_attempts == 0 {
            errors.push(Invalid::new(
                "upstream.connect_attempts",
                "must be at least 1",
            ));
        }
        if self.upstream.connect_timeout.is_zero() {
            errors.push(Invalid::new(
                "upstream.connect_timeout",
                "must be more than 0",
            ));
        }
        self.upstream.outlier_detection.validate(&mut errors);
        if self.upstream.idle_timeout.is_zero() {
            errors.push(Invalid::new("upstream.idle_timeout", "must be more than 0"));
        }
        if self.upstream.stall_threshold.is_zero() {
            errors.push(Invalid::new(
                "upstream.stall_threshold",
                "must be more than 0",
            ));
        }
        // Linux takes TCP_KEEPIDLE in whole seconds, 1 to 32767; outside that every bind and
        // upstream socket would fail with EINVAL.
        if !(1..=MAX_TCP_KEEPALIVE_SECS).contains(&self.upstream.tcp_keepalive.as_secs()) {
            errors.push(Invalid::new(
                "upstream.tcp_keepalive",
                format!("must be from 1s to {MAX_TCP_KEEPALIVE_SECS}s"),
            ));
        }
        let mut addresses = HashSet::new();
        for (key, address) in self.admin.addresses() {
            if address.port() != 0 && !addresses.insert(address) {
                errors.push(Invalid::new(
                    key,
                    format!("{address} is used by another admin server"),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            if l.name.is_empty() {
                errors.push(Invalid::new(format!("{at}.name"), "must not be empty"));
            } else if !names.insert(l.name.as_str()) {
                errors.push(Invalid::new(
                    format!("{at}.name"),
                    format!("listener {} is defined twice", l.name),
                ));
            }
            // Port 0 (any free port) may repeat; a fixed address may not.
            if l.address.port() != 0 {
                let admin = self
                    .admin
                    .addresses()
                    .into_iter()
                    .find(|(_, a)| *a == l.address);
                if let Some((key, _)) = admin {
                    errors.push(Invalid::new(
                        format!("{at}.address"),
                        format!("same address as {key}"),
                    ));
                } else if !addresses.insert(l.address) {
                    errors.push(Invalid::new(
                        format!("{at}.address"),
                        format!("{} is used by another listener", l.address),
                    ));
                }
            }
            if l.hello_timeout.is_zero() {
                errors.push(Invalid::new(
                    format!("{at}.hello_timeout"),
                    "must be more than 0",
                ));
            }
            if l.max_connections == Some(0) {
                errors.push(Invalid::new(
                    format!("{at}.max_connections"),
                    "must be at least 1",
                ));
            }
            match l.mode {
                ListenerMode::AutoPassthrough if !l.rules.is_empty() => errors.push(Invalid::new(
                    format!("{at}.rules"),
                    "rules belong to mode: sni; auto-passthrough routes by the route table",
                )),
                ListenerMode::Sni if l.rules.is_empty() => errors.push(Invalid::new(
                    format!("{at}.rules"),
                    "mode: sni needs at least one rule",
                )),
                ListenerMode::Hbone if !l.rules.is_empty() => errors.push(Invalid::new(
                    format!("{at}.rules"),
                    "rules belong to mode: sni; hbone routes by the route table",
                )),
                ListenerMode::Hbone if self.identity.is_none() => errors.push(Invalid::new(
                    format!("{at}.mode"),
                    "mode: hbone needs `identity:` (the certificate it presents to ztunnels)",
                )),
                _ => {}
            }
            let mut patterns = HashSet::new();
            for (j, rule) in l.rules.iter().enumerate() {
                let at = format!("{at}.rules[{j}]");
                if !patterns.insert(&rule.sni) {
                    errors.push(Invalid::new(
                        format!("{at}.sni"),
                        format!("pattern {} is used by an earlier rule", rule.sni),
                    ));
                }
                if rule.upstreams.is_empty() {
                    errors.push(Invalid::new(
                        format!("{at}.upstreams"),
                        "at least one upstream is needed",
                    ));
                }
                for (k, up) in rule.upstreams.iter().enumerate() {
                    if let Err(why) = check_host_port(up) {
                        errors.push(Invalid::new(format!("{at}.upstreams[{k}]"), why));
                    }
                }
            }
        }
        if let Some(id) = &self.identity {
            id.validate(&mut errors);
        }
        self.routes.validate("routes.", &mut errors);
        errors
    }
}
