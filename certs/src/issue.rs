//! Issuing with rcgen: the mesh root, per-cluster intermediates and SPIFFE leaves.
//!
//! Extensions follow Istio's plug-in CA model: root `CA:TRUE`, intermediates
//! `CA:TRUE, pathlen:0`, both with critical keyUsage keyCertSign+cRLSign; leaves
//! `CA:FALSE`, digitalSignature+keyEncipherment, serverAuth+clientAuth, URI SAN = SPIFFE ID.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rsa::rand_core::{OsRng, RngCore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::identity::Identity;
use crate::{CertError, SpiffeId};

const DAY: Duration = Duration::from_secs(24 * 3600);
/// Leaves start a little in the past so peers with slightly slow clocks accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Key algorithm for a generated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    Rsa2048,
    Rsa4096,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa4096 => "rsa4096",
        }
    }

    pub(crate) fn generate(self) -> Result<KeyPair, CertError> {
        let what = format!("{} key", self.name());
        let bits = match self {
            KeyType::EcdsaP256 => {
                return KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| CertError::generate(what, e));
            }
            KeyType::Rsa2048 => 2048,
            KeyType::Rsa4096 => 4096,
        };
        // ring (rcgen's backend) can sign with RSA but not generate RSA keys.
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut OsRng, bits)
            .map_err(|e| CertError::generate(what.clone(), e))?;
        let der = key
            .to_pkcs8_der()
            .map_err(|e| CertError::generate(what.clone(), e))?;
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der.as_bytes()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .map_err(|e| CertError::generate(what, e))
    }
}

impl std::str::FromStr for KeyType {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "ecdsa" | "p256" | "ec" => Ok(KeyType::EcdsaP256),
            "rsa2048" | "rsa-2048" | "rsa" => Ok(KeyType::Rsa2048),
            "rsa4096" | "rsa-4096" => Ok(KeyType::Rsa4096),
            _ => Err(CertError::Options(format!(
                "unknown key type {s:?} (use ecdsa-p256, rsa2048 or rsa4096)"
            ))),
        }
    }
}

/// A CA certificate and its signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// PKCS#8 PEM of the signing key.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A CA from PEM text (e.g. Istio's `ca-cert.pem` + `ca-key.pem`); `cert_origin` and
    /// `key_origin` name the sources in errors.
    pub fn from_pem(
        cert_pem: &str,
        cert_origin: &Path,
        key_pem: &str,
        key_origin: &Path,
    ) -> Result<Ca, CertError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CertError::file(cert_origin, format!("no PEM certificate: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            CertError::file(
                key_origin,
                format!("cannot load CA key (PKCS#8 PEM expected): {e}"),
            )
        })?;
        let ca = Ca::new(cert_der, key);
        ca.issuer().map_err(|e| CertError::file(cert_origin, e))?;
        Ok(ca)
    }

    fn new(cert_der: CertificateDer<'static>, key: KeyPair) -> Ca {
        Ca {
            cert_pem: pem_encode("CERTIFICATE", &cert_der),
            cert_der,
            key_pem: key.serialize_pem(),
            key,
        }
    }

    fn not_after(&self) -> Result<OffsetDateTime, CertError> {
        let (_, x) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|e| CertError::Parse(format!("CA certificate: {e}")))?;
        Ok(x.validity().not_after.to_datetime())
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CertError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| CertError::Parse(format!("CA certificate unusable as issuer: {e}")))
    }
}

/// Options for [`Mesh::generate_with`].
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub trust_domain: String,
    pub clusters: Vec<String>,
    pub key_type: KeyType,
    pub root_validity: Duration,
    pub intermediate_validity: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            trust_domain: "cluster.local".into(),
            clusters: Vec::new(),
            key_type: KeyType::EcdsaP256,
            root_validity: 3650 * DAY,
            intermediate_validity: 5 * 365 * DAY,
        }
    }
}

/// Options for a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    pub key_type: KeyType,
    pub validity: Duration,
    /// Start of validity; `None` means one minute ago (tolerates clock skew).
    pub not_before: Option<OffsetDateTime>,
    /// Extra DNS SANs next to the SPIFFE URI SAN.
    pub dns_names: Vec<String>,
}

impl Default for LeafOptions {
    fn default() -> Self {
        LeafOptions {
            key_type: KeyType::EcdsaP256,
            validity: DAY,
            not_before: None,
            dns_names: Vec::new(),
        }
    }
}

/// A whole mesh PKI: one root and one intermediate per cluster.
#[derive(Debug)]
pub struct Mesh {
    pub trust_domain: String,
    pub root: Ca,
    pub intermediates: BTreeMap<String, Ca>,
}

impl Mesh {
    /// P-256 keys, a 10-year root and 5-year intermediates.
    pub fn generate(trust_domain: &str, clusters: &[&str]) -> Result<Mesh, CertError> {
        Mesh::generate_with(&MeshOptions {
            trust_domain: trust_domain.to_string(),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            ..MeshOptions::default()
        })
    }

    pub fn generate_with(opts: &MeshOptions) -> Result<Mesh, CertError> {
        let td = &opts.trust_domain;
        // Validates the trust domain with the SPIFFE rules.
        format!("spiffe://{td}").parse::<SpiffeId>()?;
        if opts.clusters.is_empty() {
            return Err(CertError::Options("at least one cluster is needed".into()));
        }
        // Every name before the first (slow, for RSA) key.
        for c in &opts.clusters {
            check_cluster_name(c)?;
        }
        let now = OffsetDateTime::now_utc();
        let root_key = opts.key_type.generate()?;
        let params = ca_params(td, None, now, opts.root_validity, None)?;
        let root_cert = params
            .self_signed(&root_key)
            .map_err(|e| CertError::generate("root CA", e))?;
        let mut mesh = Mesh {
            trust_domain: td.clone(),
            root: Ca::new(root_cert.der().clone(), root_key),
            intermediates: BTreeMap::new(),
        };
        for cluster in &opts.clusters {
            mesh.add_cluster(cluster, opts.key_type, opts.intermediate_validity)?;
        }
        Ok(mesh)
    }

    /// The root that `mesh --out DIR` wrote (`DIR/root-cert.pem`, `DIR/root-key.pem`), with
    /// no intermediates yet; the trust domain is the root's organization, as `mesh` writes it.
    pub fn load_root(dir: &Path) -> Result<Mesh, CertError> {
        let (cert_pem, cert_path) = read_pem(dir, "root-cert.pem")?;
        let (key_pem, key_path) = read_pem(dir, "root-key.pem")?;
        let root = Ca::from_pem(&cert_pem, &cert_path, &key_pem, &key_path)?;
        let (_, x) = x509_parser::parse_x509_certificate(&root.cert_der)
            .map_err(|e| CertError::file(&cert_path, format!("cannot parse: {e}")))?;
        let trust_domain = x
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .ok_or_else(|| {
                CertError::file(&cert_path, "no organization (trust domain) in the subject")
            })?
            .to_string();
        Ok(Mesh {
            trust_domain,
            root,
            intermediates: BTreeMap::new(),
        })
    }

    /// Signs a new intermediate for `cluster` with the root. Its validity ends no later than
    /// the root's (a chain is only as valid as its root).
    pub fn add_cluster(
        &mut self,
        cluster: &str,
        key_type: KeyType,
        validity: Duration,
    ) -> Result<&Ca, CertError> {
        check_cluster_name(cluster)?;
        if self.intermediates.contains_key(cluster) {
            return Err(CertError::Options(format!(
                "the mesh already has cluster {cluster:?}"
            )));
        }
        let key = key_type.generate()?;
        let now = OffsetDateTime::now_utc();
        let mut params = ca_params(&self.trust_domain, Some(cluster), now, validity, Some(0))?;
        params.not_after = params.not_after.min(self.root.not_after()?);
        let cert = params
            .signed_by(&key, &self.root.issuer()?)
            .map_err(|e| CertError::generate(format!("intermediate CA for {cluster}"), e))?;
        let ca = Ca::new(cert.der().clone(), key);
        Ok(self.intermediates.entry(cluster.to_string()).or_insert(ca))
    }

    /// A 24 h P-256 leaf for `id`, signed by `cluster`'s intermediate.
    pub fn workload(&self, cluster: &str, id: &SpiffeId) -> Result<Identity, CertError> {
        self.workload_with(cluster, id, &LeafOptions::default())
    }

    pub fn workload_with(
        &self,
        cluster: &str,
        id: &SpiffeId,
        opts: &LeafOptions,
    ) -> Result<Identity, CertError> {
        issue_leaf(self.intermediate(cluster)?, &self.root.cert_der, id, opts)
    }

    fn intermediate(&self, cluster: &str) -> Result<&Ca, CertError> {
        self.intermediates
            .get(cluster)
            .ok_or_else(|| CertError::UnknownCluster {
                cluster: cluster.to_string(),
                known: self
                    .intermediates
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.cert_der()
    }

    pub fn root_pem(&self) -> &str {
        self.root.cert_pem()
    }
}

/// An issuing CA (a cluster intermediate) plus the mesh root it chains to, as found in
/// an Istio `cacerts` directory.
#[derive(Debug)]
pub struct ClusterCa {
    pub ca: Ca,
    pub root: CertificateDer<'static>,
}

impl ClusterCa {
    /// Loads `DIR/ca-cert.pem`, `DIR/ca-key.pem` and `DIR/root-cert.pem`.
    pub fn load(dir: &Path) -> Result<ClusterCa, CertError> {
        let (cert_pem, cert_path) = read_pem(dir, "ca-cert.pem")?;
        let (key_pem, key_path) = read_pem(dir, "ca-key.pem")?;
        let (root_pem, root_path) = read_pem(dir, "root-cert.pem")?;
        let ca = Ca::from_pem(&cert_pem, &cert_path, &key_pem, &key_path)?;
        let root = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| CertError::file(&root_path, format!("no PEM certificate: {e}")))?;
        Ok(ClusterCa { ca, root })
    }

    /// A leaf for `id` signed by this CA.
    pub fn issue(&self, id: &SpiffeId, opts: &LeafOptions) -> Result<Identity, CertError> {
        issue_leaf(&self.ca, &self.root, id, opts)
    }
}

fn issue_leaf(
    ca: &Ca,
    root: &CertificateDer<'static>,
    id: &SpiffeId,
    opts: &LeafOptions,
) -> Result<Identity, CertError> {
    let key = opts.key_type.generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, id.trust_domain.clone());
    let not_before = match opts.not_before {
        Some(t) => t,
        None => OffsetDateTime::now_utc() - CLOCK_SKEW,
    };
    params.not_before = not_before;
    // Like Istio, never outlive the issuing CA.
    params.not_after = (not_before + opts.validity).min(ca.not_after()?);
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let uri = id.to_string();
    params.subject_alt_names.push(SanType::URI(
        uri.as_str()
            .try_into()
            .map_err(|e| CertError::generate(format!("URI SAN {uri}"), e))?,
    ));
    for dns in &opts.dns_names {
        // rcgen only checks for ASCII; reject what no TLS stack would match.
        let name = dns.strip_prefix("*.").unwrap_or(dns);
        rustls_pki_types::DnsName::try_from(name)
            .map_err(|_| CertError::Options(format!("{dns:?} is not a valid DNS name")))?;
        params.subject_alt_names.push(SanType::DnsName(
            dns.as_str()
                .try_into()
                .map_err(|e| CertError::Options(format!("DNS name {dns:?}: {e}")))?,
        ));
    }
    let cert = params
        .signed_by(&key, &ca.issuer()?)
        .map_err(|e| CertError::generate(format!("leaf for {id}"), e))?;
    Ok(Identity::from_parts(
        id.clone(),
        vec![cert.der().clone(), ca.cert_der()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        root.clone(),
    ))
}

/// `DIR/name`'s text and path.
fn read_pem(dir: &Path, name: &str) -> Result<(String, PathBuf), CertError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((text, path)),
        Err(e) => Err(CertError::io(path, e)),
    }
}

/// Cluster names become directory names and certificate fields.
fn check_cluster_name(c: &str) -> Result<(), CertError> {
    if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-') {
        return Err(CertError::Options(format!(
            "cluster name {c:?} must be non-empty and only contain a-z A-Z 0-9 -"
        )));
    }
    Ok(())
}

fn ca_params(
    td: &str,
    cluster: Option<&str>,
    now: OffsetDateTime,
    validity: Duration,
    path_len: Option<u8>,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td);
    match cluster {
        Some(c) => {
            dn.push(DnType::CommonName, "Intermediate CA");
            dn.push(DnType::LocalityName, c);
        }
        None => dn.push(DnType::CommonName, "Root CA"),
    }
    params.distinguished_name = dn;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = cluster.is_some();
    Ok(params)
}

/// 128 random bits, top bit clear so the DER INTEGER stays positive and 16 bytes.
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

pub(crate) fn pem_encode(tag: &str, der: &[u8]) -> String {
    let cfg = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der.to_vec()), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn mesh_and_identity_can_be_shared_across_tasks() {
        assert_send_sync::<Mesh>();
        assert_send_sync::<Identity>();
        assert_send_sync::<ClusterCa>();
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let err = Mesh::generate("Bad_TD", &["fra"]).unwrap_err().to_string();
        assert!(err.contains("trust domain may only contain"), "{err}");
        let err = Mesh::generate("cluster.local", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least one cluster"), "{err}");
        let err = Mesh::generate("cluster.local", &["fra/x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"fra/x\""), "{err}");
        let mesh = Mesh::generate("cluster.local", &["fra"]).unwrap();
        let id = SpiffeId::workload("cluster.local", "a", "b");
        let err = mesh.workload("ash", &id).unwrap_err().to_string();
        assert_eq!(err, "unknown cluster \"ash\" (mesh has: fra)");
        let bad_dns = LeafOptions {
            dns_names: vec!["bad name".into()],
            ..LeafOptions::default()
        };
        let err = mesh
            .workload_with("fra", &id, &bad_dns)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"bad name\" is not a valid DNS name"),
            "{err}"
        );
        let wildcard = LeafOptions {
            dns_names: vec!["*.fra.example.com".into(), "eastwest.fra".into()],
            ..LeafOptions::default()
        };
        mesh.workload_with("fra", &id, &wildcard).unwrap();
    }

    #[test]
    fn leaf_never_outlives_its_intermediate() {
        let mesh = Mesh::generate_with(&MeshOptions {
            clusters: vec!["fra".into()],
            intermediate_validity: 2 * DAY,
            ..MeshOptions::default()
        })
        .unwrap();
        let id = SpiffeId::workload("cluster.local", "a", "b");
        let leaf = mesh
            .workload_with(
                "fra",
                &id,
                &LeafOptions {
                    validity: 30 * DAY,
                    ..LeafOptions::default()
                },
            )
            .unwrap();
        let na = |der: &[u8]| {
            let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
            x.validity().not_after.to_datetime()
        };
        let chain = leaf.chain_der();
        assert_eq!(na(&chain[0]), na(&chain[1]));
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let mesh = Mesh::generate("cluster.local", &["fra"]).unwrap();
        let ca = &mesh.intermediates["fra"];
        let p = Path::new("x.pem");
        let again = Ca::from_pem(ca.cert_pem(), p, ca.key_pem(), p).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        let err = Ca::from_pem(ca.cert_pem(), p, "junk", Path::new("ca-key.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ca-key.pem: cannot load CA key"), "{err}");
    }
}
