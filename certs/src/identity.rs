//! A workload or gateway identity: leaf chain + key + mesh root + SPIFFE ID.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::issue::pem_encode;
use crate::{spiffe_id_of, CertError, SpiffeId};

/// A leaf certificate chain (leaf first, then its intermediate), its private key, the
/// mesh root it chains to and the SPIFFE ID in the leaf's URI SAN.
pub struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("id", &self.id.to_string())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            root: self.root.clone(),
        }
    }
}

impl Identity {
    pub(crate) fn from_parts(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        root: CertificateDer<'static>,
    ) -> Identity {
        Identity {
            id,
            chain,
            key,
            root,
        }
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// Leaf then intermediate(s), PEM.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    pub fn key_pem(&self) -> String {
        let tag = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem_encode(tag, self.key.secret_der())
    }

    pub fn root_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.root)
    }

    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// Loads files such as those written by `eastwest-certs workload`. The chain's first
    /// certificate must carry a SPIFFE ID.
    pub fn load(
        cert_chain_pem: &Path,
        key_pem: &Path,
        root_pem: &Path,
    ) -> Result<Identity, CertError> {
        let chain = read_certs(cert_chain_pem)?;
        let key = PrivateKeyDer::from_pem_file(key_pem)
            .map_err(|e| CertError::file(key_pem, format!("no PEM private key: {e}")))?;
        let mut roots = read_certs(root_pem)?;
        if roots.len() != 1 {
            return Err(CertError::file(
                root_pem,
                format!(
                    "expected exactly one root certificate, found {}",
                    roots.len()
                ),
            ));
        }
        let root = roots.remove(0);
        let id = spiffe_id_of(&chain[0])
            .map_err(|e| CertError::file(cert_chain_pem, e))?
            .ok_or_else(|| {
                CertError::file(
                    cert_chain_pem,
                    "first certificate has no SPIFFE ID (no spiffe:// URI SAN)",
                )
            })?;
        Ok(Identity {
            id,
            chain,
            key,
            root,
        })
    }
}

/// All certificates in a PEM file; errors name the file, and an empty file is an error.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = std::fs::read(path).map_err(|e| CertError::io(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::file(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::file(path, "no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}
