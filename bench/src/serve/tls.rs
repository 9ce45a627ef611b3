//! TLS server configs for `serve` from PEM files (such as `eastwest-certs workload`
//! writes), ring provider. mTLS goes through eastwest-certs, so clients are checked the
//! way mesh sidecars check them: chain to the mesh root, SPIFFE ID in its trust domain.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use eastwest_certs::{Identity, PeerPolicy};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN offered by `serve`: both protocols, the client picks (hyper-util's auto builder
/// then detects which one it speaks).
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Server config presenting `cert` (chain PEM) and `key`. With `client_root`, clients
/// must present a certificate chaining to that mesh root whose SPIFFE ID is in the
/// server's own trust domain (mTLS; `cert` must then carry a SPIFFE ID).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_root: Option<&Path>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let alpn = ALPN.iter().map(|p| p.to_vec()).collect();
    if let Some(root) = client_root {
        let identity = Identity::load(cert, key, root).context("loading the mTLS identity")?;
        let td = identity.spiffe_id().trust_domain.clone();
        let cfg = identity
            .server_config_with_alpn(PeerPolicy::TrustDomain(td), alpn)
            .with_context(|| format!("mTLS server config for {}", identity.spiffe_id()))?;
        return Ok(cfg);
    }
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: no PEM private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| format!("{}: certificate does not match its key", cert.display()))?;
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{}: reading certificates", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM certificate", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no PEM certificate found", path.display());
    }
    Ok(certs)
}
