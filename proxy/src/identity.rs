//! Stand-in for the gateway's mesh identity (the `identity` branch brings the real module:
//! file reload, istiod's CA). Loads `identity.files` once.

use std::sync::Arc;

use anyhow::Context;
use eastwest_certs::{Identity, PeerPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The `hbone` listener's TLS config (TLS 1.3, ALPN h2, client certificate of the trust
/// domain required), as a watch so a rotation reaches new connections only.
pub async fn start(
    cfg: &eastwest_routes::IdentityConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<watch::Receiver<Arc<rustls::ServerConfig>>> {
    let _ = shutdown;
    let files = cfg
        .files
        .as_ref()
        .context("identity: only identity.files is supported in this build")?;
    let identity =
        Identity::load(&files.cert_chain, &files.key, &files.roots).context("identity.files")?;
    let tls = identity
        .server_config_tls13(
            PeerPolicy::TrustDomain(cfg.trust_domain.clone()),
            vec![b"h2".to_vec()],
        )
        .context("identity.files")?;
    // Nothing rotates here: the receiver keeps reading this value after the sender is gone.
    let (_tx, rx) = watch::channel(tls);
    Ok(rx)
}
