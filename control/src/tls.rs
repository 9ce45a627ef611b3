//! mTLS for the control channel with eastwest-certs identities: the control server presents its
//! SPIFFE identity and accepts only proxies whose certificates chain to the mesh root and carry
//! a SPIFFE ID of the same trust domain.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use eastwest_certs::{Identity, PeerPolicy};
use rustls::ServerConfig;

/// Where the control server's identity and the trusted root live (PEM, as
/// `eastwest-certs workload` writes them).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

/// A server config requiring client certificates from the same trust domain, speaking HTTP/2.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let identity = Identity::load(&files.cert, &files.key, &files.root)
        .context("loading the control server's TLS identity")?;
    let trust_domain = identity.spiffe_id().trust_domain.clone();
    identity
        .server_config_with_alpn(PeerPolicy::TrustDomain(trust_domain), vec![b"h2".to_vec()])
        .context("building the control server's TLS config")
}
