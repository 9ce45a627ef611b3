//! `identity:` in the proxy config: where the gateway's SPIFFE certificate comes from.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// The gateway's SPIFFE identity: the certificate an `hbone` listener presents, and the roots
/// and trust domains it verifies clients (source ztunnels) against. Exactly one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The mesh's trust domain (default `cluster.local`): the gateway's own SPIFFE ID is in
    /// it, and clients must be too.
    #[serde(default = "defaults::trust_domain")]
    pub trust_domain: String,
    /// Further client trust domains accepted (a mesh being migrated between domains).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_trust_domains: Vec<String>,
    /// Certificate chain, key and roots in PEM files (from `eastwest-certs gateway` or a
    /// mounted Secret), re-read when they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<IdentityFiles>,
    /// Or: a certificate from istiod's CA, renewed before it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istiod: Option<IstiodCa>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    /// The gateway's certificate then its intermediates (`cert-chain.pem`).
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    /// The mesh root(s) clients must chain to (`root-cert.pem`).
    pub roots: PathBuf,
}

/// istiod's certificate API (`istio.v1.auth.IstioCertificateService/CreateCertificate`), as
/// every Istio proxy uses it: authenticated by the pod's projected service-account token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IstiodCa {
    /// e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// The mesh root(s): istiod's serving certificate chains to them, and so do clients.
    pub roots: PathBuf,
    /// Projected token with audience `istio-ca`.
    #[serde(default = "defaults::istio_token")]
    pub token_path: PathBuf,
    /// The Istio cluster ID sent as `ClusterID` metadata (for a remote cluster's gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The namespace and service account of the gateway's SPIFFE ID.
    #[serde(default = "defaults::gateway_namespace")]
    pub namespace: String,
    #[serde(default = "defaults::gateway_service_account")]
    pub service_account: String,
    /// Requested lifetime; renewal starts at half of it.
    #[serde(default = "defaults::cert_ttl", with = "humantime_serde")]
    pub cert_ttl: Duration,
}

impl IdentityConfig {
    pub(super) fn validate(&self, errors: &mut Vec<Invalid>) {
        match (&self.files, &self.istiod) {
            (None, None) => errors.push(Invalid::new(
                "identity",
                "needs one source: `files:` or `istiod:`",
            )),
            (Some(_), Some(_)) => errors.push(Invalid::new(
                "identity.istiod",
                "`files:` and `istiod:` exclude each other",
            )),
            _ => {}
        }
        if self.trust_domain.is_empty() {
            errors.push(Invalid::new("identity.trust_domain", "must not be empty"));
        }
    }
}

mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn trust_domain() -> String {
        "cluster.local".to_string()
    }
    pub fn istio_token() -> PathBuf {
        PathBuf::from("/var/run/secrets/tokens/istio-token")
    }
    pub fn gateway_namespace() -> String {
        "istio-system".to_string()
    }
    pub fn gateway_service_account() -> String {
        "istio-eastwestgateway".to_string()
    }
    pub fn cert_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
}
