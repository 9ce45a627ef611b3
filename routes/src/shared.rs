//! A route table whose services are reference-counted, so that successive versions share
//! every service that did not change: applying a [`RouteDelta`](crate::RouteDelta) to a table
//! of 10 000 services copies 10 000 pointers, not 100 000 endpoints.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::table::{validate_network_gateways, validate_remote_services, validate_services};
use crate::{Invalid, NetworkGateway, RemoteService, RouteTable, Service};

/// Same fields and the same JSON as [`RouteTable`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedRouteTable {
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub services: Vec<Arc<Service>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_services: Vec<Arc<RemoteService>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_gateways: Vec<NetworkGateway>,
}

impl From<RouteTable> for SharedRouteTable {
    fn from(t: RouteTable) -> Self {
        SharedRouteTable {
            version: t.version,
            services: t.services.into_iter().map(Arc::new).collect(),
            remote_services: t.remote_services.into_iter().map(Arc::new).collect(),
            network_gateways: t.network_gateways,
        }
    }
}

impl SharedRouteTable {
    /// A deep copy as a plain [`RouteTable`] (for config dumps and tests; not cheap).
    pub fn to_table(&self) -> RouteTable {
        RouteTable {
            version: self.version,
            services: self.services.iter().map(|s| (**s).clone()).collect(),
            remote_services: self.remote_services.iter().map(|r| (**r).clone()).collect(),
            network_gateways: self.network_gateways.clone(),
        }
    }

    /// Like [`RouteTable::validate`], but services for which `checked` is true (typically: the
    /// very `Arc` an earlier, validated version held) are not re-examined — only checked for a
    /// repeated hostname.
    pub fn validate_changed(
        &self,
        prefix: &str,
        checked: impl Fn(&Arc<Service>) -> bool,
        errors: &mut Vec<Invalid>,
    ) {
        validate_services(
            prefix,
            self.services.iter().map(|s| (&**s, checked(s))),
            errors,
        );
        validate_remote_services(prefix, self.remote_services.iter().map(|r| &**r), errors);
        validate_network_gateways(prefix, &self.network_gateways, errors);
    }

    /// Looks a service up by the FQDN from the SNI (case-insensitive).
    pub fn service(&self, hostname: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.hostname.eq_ignore_ascii_case(hostname))
            .map(|s| &**s)
    }

    /// Whether services and remote services are in hostname order, as eastwest-control sends
    /// them (deltas are merged in that order).
    pub fn is_sorted(&self) -> bool {
        self.services.is_sorted_by(|a, b| a.hostname < b.hostname)
            && self
                .remote_services
                .is_sorted_by(|a, b| a.hostname <= b.hostname)
    }

    /// Puts services and remote services in hostname order (stable, so a hostname's remote
    /// services keep their order).
    pub fn sort(&mut self) {
        self.services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        self.remote_services
            .sort_by(|a, b| a.hostname.cmp(&b.hostname));
    }
}
