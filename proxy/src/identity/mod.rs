//! The gateway's mesh identity: the SPIFFE certificate an `hbone` listener presents and the
//! mTLS policy it applies to source ztunnels (TLS 1.3, ALPN `h2`, client certificate chained
//! to the mesh roots, SPIFFE ID in the trust domain(s), no SNI expected).
//!
//! Two sources: [`files`] (PEM files, re-read on change) and [`istiod`] (istiod's CA over
//! gRPC, renewed at half-life). Each publishes a new `rustls::ServerConfig` on a watch
//! channel; a listener reads it at each accept, so new connections get the new certificate
//! and open ones keep theirs.

mod files;
mod istiod;
pub mod pb;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use eastwest_certs::{PeerPolicy, SpiffeId, TlsVersions};
use eastwest_routes::IdentityConfig;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// What `/config_dump` and the metrics show of the gateway's identity.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityStatus {
    /// `files` or `istiod`.
    pub source: &'static str,
    /// The SPIFFE ID of the certificate being served.
    pub spiffe_id: String,
    /// RFC 3339.
    pub not_after: String,
    /// Certificates taken into use since start (the first one not counted).
    pub renewals: u64,
    /// The last failed reload or renewal since the certificate in force was taken (the old
    /// certificate is still served).
    pub last_error: Option<String>,
}

/// A running identity source: the server config to accept with, and its status.
#[derive(Clone)]
pub struct IdentityHandle {
    pub server_config: watch::Receiver<Arc<ServerConfig>>,
    pub status: watch::Receiver<IdentityStatus>,
}

/// Starts the identity source of `cfg` and returns the mTLS config `hbone` listeners accept
/// with (read it at each accept). Fails, naming the file or the CA, when no first
/// certificate can be had. The source stops with `shutdown`.
pub async fn start(
    cfg: &IdentityConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<watch::Receiver<Arc<ServerConfig>>> {
    Ok(start_with_status(cfg, shutdown).await?.server_config)
}

/// As [`start`], with the status for `/config_dump`.
pub async fn start_with_status(
    cfg: &IdentityConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<IdentityHandle> {
    let policy = Policy::of(cfg);
    match (&cfg.files, &cfg.istiod) {
        (Some(files), None) => files::start(files, policy, shutdown).await,
        (None, Some(istiod)) => istiod::start(istiod, policy, shutdown).await,
        _ => anyhow::bail!("identity: needs exactly one source, `files:` or `istiod:`"),
    }
}

/// Whom the gateway is, and whom it accepts.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    trust_domain: String,
    /// `trust_domain` then `extra_trust_domains`.
    client_trust_domains: Vec<String>,
}

impl Policy {
    fn of(cfg: &IdentityConfig) -> Policy {
        let mut client_trust_domains = vec![cfg.trust_domain.clone()];
        client_trust_domains.extend(cfg.extra_trust_domains.iter().cloned());
        Policy {
            trust_domain: cfg.trust_domain.clone(),
            client_trust_domains,
        }
    }
}

/// A certificate chain, its key and the roots clients must chain to, checked.
pub(crate) struct Certified {
    id: SpiffeId,
    not_after: SystemTime,
    config: Arc<ServerConfig>,
}

impl Certified {
    /// Checks `chain` (leaf first) against `roots` and `key`, and builds the listener's
    /// config. Errors say which check failed; callers add which file or CA.
    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: &[CertificateDer<'static>],
        policy: &Policy,
    ) -> Result<Certified, CertProblem> {
        let leaf = chain.first().ok_or(CertProblem::Chain(
            "no certificate in the chain".to_string(),
        ))?;
        let id = eastwest_certs::spiffe_id_of(leaf)
            .map_err(|e| CertProblem::Chain(e.to_string()))?
            .ok_or_else(|| {
                CertProblem::Chain("the first certificate has no SPIFFE ID (URI SAN)".to_string())
            })?;
        if !policy.client_trust_domains.contains(&id.trust_domain) {
            return Err(CertProblem::Chain(format!(
                "{id} is not in trust domain {}",
                policy.client_trust_domains.join(" or ")
            )));
        }
        let not_after =
            eastwest_certs::not_after(leaf).map_err(|e| CertProblem::Chain(e.to_string()))?;
        check_key(&chain, &key)?;
        eastwest_certs::check_chain(&chain, roots).map_err(|e| {
            CertProblem::Roots(format!("the certificate does not chain to the roots: {e}"))
        })?;
        let config = eastwest_certs::mtls_server_config(
            chain,
            key,
            roots,
            PeerPolicy::TrustDomains(policy.client_trust_domains.clone()),
            TlsVersions::Tls13Only,
            vec![b"h2".to_vec()],
        )
        .map_err(|e| CertProblem::Chain(e.to_string()))?;
        Ok(Certified {
            id,
            not_after,
            config: Arc::new(config),
        })
    }
}

/// Which input a certificate problem is in, so the error can name the file.
#[derive(Debug)]
pub(crate) enum CertProblem {
    Chain(String),
    Key(String),
    Roots(String),
}

fn check_key(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), CertProblem> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| CertProblem::Key(format!("unusable private key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain.to_vec(), signer)
        .keys_match()
        .map_err(|e| CertProblem::Key(format!("the key does not match the certificate: {e}")))
}

/// Publishes certificates to the listeners, the metrics and the status.
pub(crate) struct Publisher {
    source: &'static str,
    config: watch::Sender<Arc<ServerConfig>>,
    status: watch::Sender<IdentityStatus>,
    renewals: u64,
}

impl Publisher {
    /// Starts with the first certificate; returns the handle for listeners.
    fn new(source: &'static str, first: &Certified) -> (Publisher, IdentityHandle) {
        let (config, config_rx) = watch::channel(first.config.clone());
        let (status, status_rx) = watch::channel(status_of(source, first, 0, None));
        m::register_identity(source);
        set_expiry(source, first.not_after);
        tracing::info!(source, spiffe_id = %first.id, not_after = %rfc3339(first.not_after),
            "gateway identity loaded");
        let publisher = Publisher {
            source,
            config,
            status,
            renewals: 0,
        };
        let handle = IdentityHandle {
            server_config: config_rx,
            status: status_rx,
        };
        (publisher, handle)
    }

    /// New connections get `next` from now on.
    fn publish(&mut self, next: &Certified) {
        self.renewals += 1;
        self.config.send_replace(next.config.clone());
        self.status
            .send_replace(status_of(self.source, next, self.renewals, None));
        ::metrics::counter!(m::IDENTITY_RENEWALS, "source" => self.source).increment(1);
        set_expiry(self.source, next.not_after);
        tracing::info!(source = self.source, spiffe_id = %next.id,
            not_after = %rfc3339(next.not_after), "gateway certificate renewed");
    }

    /// A reload or renewal failed; the certificate in force stays.
    fn failed(&mut self, error: String) {
        ::metrics::counter!(m::IDENTITY_ERRORS, "source" => self.source).increment(1);
        tracing::error!(source = self.source, %error, "keeping the gateway certificate in force");
        self.status
            .send_modify(|status| status.last_error = Some(error));
    }
}

fn status_of(
    source: &'static str,
    cert: &Certified,
    renewals: u64,
    last_error: Option<String>,
) -> IdentityStatus {
    IdentityStatus {
        source,
        spiffe_id: cert.id.to_string(),
        not_after: rfc3339(cert.not_after),
        renewals,
        last_error,
    }
}

fn set_expiry(source: &'static str, not_after: SystemTime) {
    let secs = not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    ::metrics::gauge!(m::IDENTITY_CERT_EXPIRY, "source" => source).set(secs);
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// All certificates in PEM `data`; `what` names the source in errors.
fn pem_certs(data: &[u8], what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what}: bad PEM"))?;
    anyhow::ensure!(!certs.is_empty(), "{what}: no PEM CERTIFICATE block found");
    Ok(certs)
}
