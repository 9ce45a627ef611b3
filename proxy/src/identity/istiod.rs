//! Identity from istiod's CA, as every Istio proxy gets its certificate: a CSR for
//! `spiffe://<td>/ns/<ns>/sa/<sa>` (the key stays in memory) sent to
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` on istiod:15012 over TLS,
//! authenticated with the pod's projected service-account token (audience `istio-ca`),
//! renewed at half-life. A renewal that fails is retried with jittered backoff
//! (100 ms doubling to 30 s) while the old certificate is served until it expires.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use eastwest_routes::IstiodCa;
use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::pb::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE};
use super::{pem_certs, CertProblem, Certified, IdentityHandle, Policy, Publisher};

/// istiod's serving certificate's SAN, checked when the address is an IP (a remote
/// cluster's istiod through its east-west gateway, say).
const ISTIOD_SAN: &str = "istiod.istio-system.svc";
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long start-up keeps retrying a CA that is unreachable (not one that refuses).
const FIRST_CERT_DEADLINE: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) async fn start(
    ca: &IstiodCa,
    policy: Policy,
    shutdown: CancellationToken,
) -> anyhow::Result<IdentityHandle> {
    let client = Client::new(ca, &policy)?;
    let first = client.first_certificate().await?;
    let (publisher, handle) = Publisher::new("istiod", &first);
    tokio::spawn(client.renew_loop(publisher, first.not_after, shutdown));
    Ok(handle)
}

struct Client {
    ca: IstiodCa,
    policy: Policy,
    channel: Channel,
    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    spiffe_id: String,
}

impl Client {
    fn new(ca: &IstiodCa, policy: &Policy) -> anyhow::Result<Client> {
        let roots = std::fs::read(&ca.roots).with_context(|| {
            format!("identity.istiod.roots: cannot read {}", ca.roots.display())
        })?;
        pem_certs(
            &roots,
            &format!("identity.istiod.roots {}", ca.roots.display()),
        )?;
        let endpoint = Endpoint::from_shared(ca.address.clone())
            .with_context(|| format!("identity.istiod.address {:?}", ca.address))?;
        let host = endpoint.uri().host().unwrap_or_default();
        let mut tls =
            ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(roots));
        // An IP address is in no istiod certificate: check the name every istiod has.
        if host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok()
        {
            tls = tls.domain_name(ISTIOD_SAN);
        }
        let channel = endpoint
            .tls_config(tls)
            .with_context(|| format!("identity.istiod.address {}: TLS", ca.address))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(RPC_TIMEOUT)
            .connect_lazy();
        let spiffe_id = format!(
            "spiffe://{}/ns/{}/sa/{}",
            policy.trust_domain, ca.namespace, ca.service_account
        );
        // Validates the parts with the SPIFFE rules before the first request.
        spiffe_id
            .parse::<eastwest_certs::SpiffeId>()
            .context("identity.istiod namespace/service_account")?;
        Ok(Client {
            ca: ca.clone(),
            policy: policy.clone(),
            channel,
            spiffe_id,
        })
    }

    /// The first certificate: an unreachable CA is retried for a while (istiod may be
    /// starting too); one that answers with an error fails start-up at once.
    async fn first_certificate(&self) -> anyhow::Result<Certified> {
        let deadline = tokio::time::Instant::now() + FIRST_CERT_DEADLINE;
        let mut backoff = Backoff::default();
        loop {
            match self.fetch().await {
                Ok(cert) => return Ok(cert),
                Err(err) if err.retryable && tokio::time::Instant::now() < deadline => {
                    let wait = backoff.next();
                    tracing::warn!(
                        error = format!("{:#}", err.error),
                        ?wait,
                        "istiod CA unreachable; retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(err) => return Err(err.error),
            }
        }
    }

    async fn renew_loop(
        self,
        mut publisher: Publisher,
        mut not_after: SystemTime,
        shutdown: CancellationToken,
    ) {
        let mut renew_at = half_life(self.ca.cert_ttl, not_after);
        let mut backoff = Backoff::default();
        let mut expired_reported = false;
        loop {
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            match self.fetch().await {
                Ok(cert) => {
                    publisher.publish(&cert);
                    not_after = cert.not_after;
                    renew_at = half_life(self.ca.cert_ttl, not_after);
                    backoff = Backoff::default();
                    expired_reported = false;
                }
                Err(err) => {
                    publisher.failed(format!("{:#}", err.error));
                    if SystemTime::now() > not_after && !expired_reported {
                        expired_reported = true;
                        tracing::error!("the gateway certificate has expired: ztunnels will refuse hbone handshakes until istiod issues a new one");
                    }
                    renew_at = SystemTime::now() + backoff.next();
                }
            }
        }
    }

    /// One CreateCertificate call with a fresh key, checked.
    async fn fetch(&self) -> Result<Certified, FetchError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| FetchError::fatal(anyhow::anyhow!("cannot generate a key: {e}")))?;
        let csr = self.csr(&key).map_err(FetchError::fatal)?;
        let token = read_token(&self.ca.token_path).map_err(FetchError::fatal)?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ca.cert_ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        let bearer = MetadataValue::try_from(format!("Bearer {token}")).map_err(|e| {
            FetchError::fatal(anyhow::anyhow!(
                "{}: token is not a valid header value: {e}",
                self.ca.token_path.display()
            ))
        })?;
        request.metadata_mut().insert("authorization", bearer);
        if let Some(cluster) = &self.ca.cluster_id {
            let value = MetadataValue::try_from(cluster.as_str()).map_err(|e| {
                FetchError::fatal(anyhow::anyhow!(
                    "identity.istiod.cluster_id {cluster:?}: {e}"
                ))
            })?;
            request.metadata_mut().insert("clusterid", value);
        }
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let at = &self.ca.address;
        grpc.ready().await.map_err(|e| FetchError {
            error: anyhow::anyhow!("istiod {at}: {e}"),
            retryable: true,
        })?;
        let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
        let codec: tonic::codec::ProstCodec<IstioCertificateRequest, IstioCertificateResponse> =
            tonic::codec::ProstCodec::default();
        let response = grpc.unary(request, path, codec).await.map_err(|status| {
            let retryable = matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            );
            FetchError {
                error: anyhow::anyhow!(
                    "istiod {at}: CreateCertificate: {:?}: {}",
                    status.code(),
                    status.message()
                ),
                retryable,
            }
        })?;
        self.check(response.into_inner(), &key)
            .map_err(|error| FetchError {
                error,
                retryable: false,
            })
    }

    fn csr(&self, key: &KeyPair) -> anyhow::Result<String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(self.spiffe_id.as_str().try_into().map_err(
                |e| anyhow::anyhow!("URI SAN {}: {e}", self.spiffe_id),
            )?)];
        let csr = params
            .serialize_request(key)
            .map_err(|e| anyhow::anyhow!("cannot make the CSR: {e}"))?;
        csr.pem()
            .map_err(|e| anyhow::anyhow!("cannot encode the CSR: {e}"))
    }

    /// The response's chain is for our key and SPIFFE ID and chains to the roots.
    fn check(
        &self,
        response: IstioCertificateResponse,
        key: &KeyPair,
    ) -> anyhow::Result<Certified> {
        let at = &self.ca.address;
        let pem = response.cert_chain.concat();
        let mut chain = pem_certs(pem.as_bytes(), &format!("istiod {at}: cert_chain"))?;
        // Roots are re-read each time, so a root rotation reaches new clients too.
        let roots_pem = std::fs::read(&self.ca.roots).with_context(|| {
            format!(
                "identity.istiod.roots: cannot read {}",
                self.ca.roots.display()
            )
        })?;
        let roots = pem_certs(
            &roots_pem,
            &format!("identity.istiod.roots {}", self.ca.roots.display()),
        )?;
        // Istio ends the chain with the root; the server chain need not carry it.
        if chain.len() > 1 && chain.last().is_some_and(|last| roots.contains(last)) {
            chain.pop();
        }
        let id = chain
            .first()
            .map(|leaf| eastwest_certs::spiffe_id_of(leaf))
            .transpose()
            .with_context(|| format!("istiod {at}: the issued certificate"))?
            .flatten();
        if id.as_ref().map(|i| i.to_string()).as_deref() != Some(self.spiffe_id.as_str()) {
            anyhow::bail!(
                "istiod {at}: issued a certificate for {}, asked for {}",
                id.map_or("no SPIFFE ID".to_string(), |i| i.to_string()),
                self.spiffe_id
            );
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Certified::new(chain, key, &roots, &self.policy).map_err(|problem| {
            let why = match problem {
                CertProblem::Chain(why) | CertProblem::Key(why) | CertProblem::Roots(why) => why,
            };
            anyhow::anyhow!("istiod {at}: the issued certificate: {why}")
        })
    }
}

struct FetchError {
    error: anyhow::Error,
    /// The CA could not be reached (as opposed to refusing, or answering nonsense).
    retryable: bool,
}

impl FetchError {
    fn fatal(error: anyhow::Error) -> FetchError {
        FetchError {
            error,
            retryable: false,
        }
    }
}

/// Re-read at each request: projected tokens rotate.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("identity.istiod.token_path: cannot read {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "identity.istiod.token_path {}: empty token",
        path.display()
    );
    Ok(token.to_string())
}

/// Half-way through the certificate's life, as Istio's proxies renew. The life is counted
/// from now back from `not_after` by the TTL asked for, since the CA may shorten it.
fn half_life(ttl: Duration, not_after: SystemTime) -> SystemTime {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    SystemTime::now() + left.min(ttl) / 2
}

/// 100 ms doubling to 30 s, each wait jittered to 50–100 % so gateways don't retry in step.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_half_the_life_left_capped_by_the_ttl_asked() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let wait = |at: SystemTime| at.duration_since(now).unwrap_or(Duration::ZERO);
        let w = wait(half_life(hour, now + hour));
        assert!(
            w > Duration::from_secs(1700) && w <= Duration::from_secs(1801),
            "{w:?}"
        );
        // The CA granted more than asked: renew at half of what was asked.
        let w = wait(half_life(Duration::from_secs(2), now + hour));
        assert!(w <= Duration::from_secs(2), "{w:?}");
        // Already expired: now.
        let w = wait(half_life(hour, now - hour));
        assert!(w < Duration::from_secs(1), "{w:?}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= BACKOFF_FIRST);
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX));
        assert!(waits[11] >= BACKOFF_MAX / 2);
    }
}
