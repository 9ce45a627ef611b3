//! Mesh identities and TLS configs, as two Istio sidecars in different clusters would have.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use eastwest_certs::{files, Identity, Mesh, PeerPolicy, SpiffeId};
use rustls::client::Resumption;

pub const TRUST_DOMAIN: &str = "cluster.local";
const CLIENT: &str = "client";
const BACKEND: &str = "backend";

pub fn write_certs(out: &Path) -> anyhow::Result<()> {
    let mesh = Mesh::generate(TRUST_DOMAIN, &["fra", "ash"]).context("generating the mesh PKI")?;
    let client = mesh.workload("fra", &SpiffeId::workload(TRUST_DOMAIN, "bench", "loadgen"))?;
    let backend = mesh.workload("ash", &SpiffeId::workload(TRUST_DOMAIN, "bench", "bench"))?;
    let mut all = files::identity_files(&client, &out.join(CLIENT));
    all.extend(files::identity_files(&backend, &out.join(BACKEND)));
    files::write_all(&all, true).context("writing certificates")?;
    Ok(())
}

fn load(dir: &Path, who: &str) -> anyhow::Result<Identity> {
    let [chain, key, root] = files::identity_paths(&dir.join(who));
    Identity::load(&chain, &key, &root)
        .with_context(|| format!("loading the {who} identity from {}", dir.display()))
}

/// mTLS server: requires a mesh client certificate, offers ALPN `istio`. No session tickets:
/// clients do full handshakes, so none would be used.
pub fn server_config(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let id = load(dir, BACKEND)?;
    let cfg = id.server_config_with_alpn(
        PeerPolicy::TrustDomain(TRUST_DOMAIN.into()),
        vec![b"istio".to_vec()],
    )?;
    let mut cfg = (*cfg).clone();
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// mTLS client like an Istio sidecar. Resumption is off so every new connection is a full
/// handshake (certificate verification and signatures on both ends).
pub fn client_config(dir: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let id = load(dir, CLIENT)?;
    let cfg = id.client_config_with_alpn(
        PeerPolicy::TrustDomain(TRUST_DOMAIN.into()),
        vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()],
    )?;
    let mut cfg = (*cfg).clone();
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}
