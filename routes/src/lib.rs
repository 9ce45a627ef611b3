//! The data eastwest-proxy routes by, defined once.
//!
//! [`ProxyConfig`] is what `eastwest-proxy --config FILE` reads; its route part,
//! [`RouteTable`], is also what eastwest-control computes and streams to proxies.
//! Both are plain serde data: parse, [`validate`](ProxyConfig::validate) once, then
//! publish the value atomically. Nothing here does I/O except [`load`].

mod config;
mod delta;
pub mod load;
mod sni;
mod table;

pub use config::{
    AdminConfig, IdentityConfig, IdentityFiles, IstiodCa, ListenerConfig, ListenerMode,
    LoadBalancing, OutlierDetection, ProxyConfig, SniRule, Splice, TelemetryConfig, UpstreamConfig,
};
pub use delta::{RouteDelta, RouteUpdate};
pub use load::{load_proxy_config, parse_proxy_config, ConfigError};
pub use sni::{SniPattern, SniPatternError};
pub use table::{
    is_subset_name, Endpoint, NetworkGateway, RemoteService, RouteTable, Service, ServicePort,
    Subset, Workload,
};

/// A validation failure: the dotted path of the offending field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Invalid {
    /// e.g. `listeners[1].address`
    pub path: String,
    pub message: String,
}

impl Invalid {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// HTTP path on eastwest-control that streams route tables (HTTP/2, newline-delimited JSON,
/// one [`RouteTable`] per line). Query: `?cluster=<name>&network=<name>`; with `&delta=1`
/// each line is a [`RouteUpdate`] instead: a full table first, then [`RouteDelta`]s.
pub const ROUTES_STREAM_PATH: &str = "/v1/routes";
