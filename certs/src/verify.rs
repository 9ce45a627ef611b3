//! rustls mTLS configs whose verifiers chain peers to the mesh root (rustls-webpki) and
//! then check the peer's SPIFFE ID against a [`PeerPolicy`] (webpki ignores URI SANs).
//!
//! Modelled on ztunnel's TrustDomainVerifier: server names are not checked, because
//! Istio peers dial with SNI such as `outbound_.8000_._.svc.ns.svc.cluster.local`, which
//! is no SAN; the SPIFFE ID is the identity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::Identity;
use crate::{spiffe_id_of, CertError, SpiffeId};

/// Which peers a config accepts (after the chain to the mesh root checks out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any SPIFFE ID in this trust domain.
    TrustDomain(String),
    /// Only these SPIFFE IDs.
    Exact(Vec<SpiffeId>),
}

/// Why a peer was refused (beyond what rustls reports itself, e.g. expiry).
///
/// `Debug` prints the same text as `Display` because rustls formats
/// `CertificateError::Other` with `{:?}`, and that is what ends up in handshake errors.
#[derive(Clone, thiserror::Error)]
pub enum PeerRejected {
    #[error("unknown issuer: certificate does not chain to the mesh root ({0})")]
    UnknownIssuer(String),
    #[error("no SPIFFE ID in certificate (no spiffe:// URI SAN)")]
    NoSpiffeId,
    #[error("bad SPIFFE ID in certificate: {0}")]
    BadSpiffeId(String),
    #[error("wrong trust domain: peer is {id}, expected trust domain {expected}")]
    WrongTrustDomain { id: SpiffeId, expected: String },
    #[error("SPIFFE ID {id} not allowed by policy (allowed: {allowed})")]
    NotAllowed { id: SpiffeId, allowed: String },
}

impl std::fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn rejected(why: PeerRejected) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(why))))
}

/// Chain errors where the peer's CA is simply not ours get a message that says so;
/// a same-named CA from another mesh surfaces from webpki as a bad signature.
fn explain_chain_error(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(
            ref ce @ (CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. }),
        ) => rejected(PeerRejected::UnknownIssuer(format!("{ce:?}"))),
        other => other,
    }
}

impl PeerPolicy {
    /// Checks the SPIFFE ID of a peer's leaf certificate.
    pub fn check(&self, leaf_der: &[u8]) -> Result<SpiffeId, PeerRejected> {
        let id = spiffe_id_of(leaf_der)
            .map_err(|e| PeerRejected::BadSpiffeId(e.to_string()))?
            .ok_or(PeerRejected::NoSpiffeId)?;
        match self {
            PeerPolicy::TrustDomain(td) if &id.trust_domain == td => Ok(id),
            PeerPolicy::TrustDomain(td) => Err(PeerRejected::WrongTrustDomain {
                id,
                expected: td.clone(),
            }),
            PeerPolicy::Exact(ids) if ids.contains(&id) => Ok(id),
            PeerPolicy::Exact(ids) => Err(PeerRejected::NotAllowed {
                id,
                allowed: ids
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn check_tls(&self, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        self.check(leaf).map(|_| ()).map_err(rejected)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(root: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, CertError> {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| {
        CertError::Tls(format!(
            "mesh root certificate unusable as trust anchor: {e}"
        ))
    })?;
    Ok(Arc::new(roots))
}

/// Server side: webpki client-cert verification (mandatory) + SPIFFE policy.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: PeerPolicy,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(explain_chain_error)?;
        self.policy.check_tls(end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// Client side: chain to the mesh root + SPIFFE policy; the TLS server name is ignored.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    policy: PeerPolicy,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(explain_chain_error)?;
        self.policy.check_tls(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn versions_error(e: rustls::Error) -> CertError {
    CertError::Tls(e.to_string())
}

impl Identity {
    /// mTLS server config: requires a client certificate chained to the mesh root whose
    /// SPIFFE ID satisfies `peers`.
    pub fn server_config(&self, peers: PeerPolicy) -> Result<Arc<ServerConfig>, CertError> {
        self.server_config_with_alpn(peers, Vec::new())
    }

    pub fn server_config_with_alpn(
        &self,
        peers: PeerPolicy,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<ServerConfig>, CertError> {
        self.server_config_versions(peers, alpn, VERSIONS)
    }

    /// As [`Identity::server_config_with_alpn`], TLS 1.3 only: what ztunnel's HBONE port
    /// (15008) accepts, and so the gateway's.
    pub fn server_config_tls13(
        &self,
        peers: PeerPolicy,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<ServerConfig>, CertError> {
        self.server_config_versions(peers, alpn, &[&rustls::version::TLS13])
    }

    fn server_config_versions(
        &self,
        peers: PeerPolicy,
        alpn: Vec<Vec<u8>>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<Arc<ServerConfig>, CertError> {
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(
            root_store(&self.root_der())?,
            provider.clone(),
        )
        .build()
        .map_err(|e| CertError::Tls(format!("client verifier: {e}")))?;
        let verifier = Arc::new(SpiffeClientVerifier {
            inner,
            policy: peers,
        });
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(versions_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain_der(), self.key_der())
            .map_err(|e| self.cert_key_error(e))?;
        cfg.alpn_protocols = alpn;
        Ok(Arc::new(cfg))
    }

    /// mTLS client config: presents this identity, verifies the server's chain to the mesh
    /// root and its SPIFFE ID against `peers`; ignores the TLS server name.
    pub fn client_config(&self, peers: PeerPolicy) -> Result<Arc<ClientConfig>, CertError> {
        self.client_config_with_alpn(peers, Vec::new())
    }

    pub fn client_config_with_alpn(
        &self,
        peers: PeerPolicy,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<ClientConfig>, CertError> {
        let provider = provider();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: root_store(&self.root_der())?,
            policy: peers,
            provider: provider.clone(),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)
            .map_err(versions_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain_der(), self.key_der())
            .map_err(|e| self.cert_key_error(e))?;
        cfg.alpn_protocols = alpn;
        Ok(Arc::new(cfg))
    }

    /// rustls refused this identity's chain or key.
    fn cert_key_error(&self, e: rustls::Error) -> CertError {
        CertError::Tls(format!("certificate/key for {}: {e}", self.spiffe_id()))
    }
}
