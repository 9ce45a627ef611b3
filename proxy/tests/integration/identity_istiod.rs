//! The gateway's certificate from istiod's CA: a real `IstioCertificateService` (tonic, the
//! real proto over TLS) in-process; issuance, renewal at half-life, a failing or refusing CA.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use eastwest_certs::{LeafOptions, Mesh, SpiffeId};
use eastwest_proxy::identity::pb::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE,
};
use eastwest_proxy::identity::start_with_status;
use eastwest_routes::{IdentityConfig, IstiodCa};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::support::TD;

use crate::identity::*;

/// What the in-process istiod saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    cluster_id: Option<String>,
    san: Vec<String>,
    validity_duration: i64,
}

/// An istiod CA: checks the bearer token, signs the CSR with the `fra` intermediate.
#[derive(Clone)]
struct FakeIstiod(Arc<CaState>);

struct CaState {
    /// Tokens accepted (a projected token rotates: both the old and the new are valid).
    tokens: Vec<String>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    intermediate_pem: String,
    root_pem: String,
    fail: AtomicBool,
    seen: Mutex<Vec<Seen>>,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for FakeIstiod {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != CREATE_CERTIFICATE {
                return Ok(tonic::Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic::codec::ProstCodec::default());
            Ok(grpc.unary(Create(state), req).await)
        })
    }
}

struct Create(Arc<CaState>);

impl tonic::codegen::Service<tonic::Request<IstioCertificateRequest>> for Create {
    type Response = tonic::Response<IstioCertificateResponse>;
    type Error = tonic::Status;
    type Future = std::future::Ready<Result<Self::Response, tonic::Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        std::future::ready(self.create(req))
    }
}

impl Create {
    // tonic::Status is what a gRPC handler returns, however big.
    #[allow(clippy::result_large_err)]
    fn create(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let authorization = header("authorization");
        let cluster_id = header("clusterid");
        let body = req.get_ref();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad CSR: {e}")))?;
        let san: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                rcgen::SanType::URI(u) => u.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        self.0.seen.lock().unwrap().push(Seen {
            authorization: authorization.clone(),
            cluster_id,
            san: san.clone(),
            validity_duration: body.validity_duration,
        });
        let accepted = self
            .0
            .tokens
            .iter()
            .any(|t| authorization.as_deref() == Some(&format!("Bearer {t}")));
        if !accepted {
            return Err(tonic::Status::unauthenticated("bad token"));
        }
        if self.0.fail.load(Ordering::SeqCst) {
            return Err(tonic::Status::internal("CA is down for the test"));
        }
        let mut csr = csr;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(1);
        // An hour, whatever was asked: the renewal still comes at half the ttl asked for,
        // and the old certificate stays valid through the failures this test provokes.
        csr.params.not_after = now + time::Duration::hours(1);
        csr.params.is_ca = rcgen::IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand_serial()));
        let cert = csr
            .signed_by(&self.0.issuer)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![
                cert.pem(),
                self.0.intermediate_pem.clone(),
                self.0.root_pem.clone(),
            ],
        }))
    }
}

fn rand_serial() -> [u8; 16] {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut b = [0u8; 16];
    b[8..].copy_from_slice(&NEXT.fetch_add(1, Ordering::SeqCst).to_be_bytes());
    b[0] = 0x10;
    b
}

/// Starts the CA on TLS (istiod's serving cert: DNS SAN istiod.istio-system.svc).
async fn fake_istiod(mesh: &Mesh, tokens: &[&str]) -> (SocketAddr, Arc<CaState>) {
    let fra = &mesh.intermediates["fra"];
    let key = rcgen::KeyPair::from_pem(fra.key_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(fra.cert_pem(), key).unwrap();
    let state = Arc::new(CaState {
        tokens: tokens.iter().map(|t| t.to_string()).collect(),
        issuer,
        intermediate_pem: fra.cert_pem().to_string(),
        root_pem: mesh.root_pem().to_string(),
        fail: AtomicBool::new(false),
        seen: Mutex::new(Vec::new()),
    });
    let serving = mesh
        .workload_with(
            "fra",
            &SpiffeId::workload(TD, "istio-system", "istiod"),
            &LeafOptions {
                dns_names: vec!["istiod.istio-system.svc".into()],
                ..LeafOptions::default()
            },
        )
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(serving.chain_der(), serving.key_der())
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                }
            });
        }
    });
    let svc = FakeIstiod(state.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(svc, tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    (addr, state)
}

fn istiod_config(addr: SocketAddr, roots: PathBuf, token: &Path, ttl: Duration) -> IdentityConfig {
    IdentityConfig {
        trust_domain: TD.into(),
        extra_trust_domains: Vec::new(),
        files: None,
        istiod: Some(IstiodCa {
            address: format!("https://{addr}"),
            roots,
            token_path: token.to_path_buf(),
            cluster_id: Some("fra".into()),
            namespace: "istio-system".into(),
            service_account: "istio-eastwestgateway".into(),
            cert_ttl: ttl,
        }),
    }
}

#[tokio::test]
async fn istiod_issues_the_gateway_cert_renews_at_half_life_and_a_failing_ca_keeps_the_old_one() {
    let s = setup();
    let (ca_addr, ca) = fake_istiod(&s.mesh, &["token-1", "token-2"]).await;
    let roots = s.dir.path().join("root-cert.pem");
    std::fs::write(&roots, s.mesh.root_pem()).unwrap();
    let token = s.dir.path().join("istio-token");
    std::fs::write(&token, "token-1\n").unwrap();
    let cfg = istiod_config(ca_addr, roots, &token, Duration::from_secs(2));
    let handle = start_with_status(&cfg, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(handle.status.borrow().spiffe_id, GATEWAY_ID);
    assert_eq!(handle.status.borrow().source, "istiod");
    {
        let seen = ca.seen.lock().unwrap();
        let first = &seen[0];
        assert_eq!(first.authorization.as_deref(), Some("Bearer token-1"));
        assert_eq!(first.cluster_id.as_deref(), Some("fra"));
        assert_eq!(first.san, vec![GATEWAY_ID.to_string()]);
        assert_eq!(first.validity_duration, 2);
    }
    let addr = echo_listener(&handle).await;
    let mut before = connect(addr, &s.ztunnel).await.unwrap();
    assert_gateway_cert(&before, s.mesh.root_der());
    let first_leaf = served_leaf(&before);

    // Renewed at half of the 2 s asked for; the token is read again (projected tokens rotate).
    std::fs::write(&token, "token-2").unwrap();
    // Two renewals: the first may have been under way when the token changed.
    wait_status(&handle, "renewal", |st| st.renewals >= 2).await;
    let last = ca.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.authorization.as_deref(), Some("Bearer token-2"));
    let renewed = connect(addr, &s.ztunnel).await.unwrap();
    assert_gateway_cert(&renewed, s.mesh.root_der());
    let renewed_leaf = served_leaf(&renewed);
    assert_ne!(renewed_leaf, first_leaf);
    echo(&mut before, b"open connections keep their cert")
        .await
        .unwrap();

    // The CA fails: errors are reported, and the certificate in force is still served.
    ca.fail.store(true, Ordering::SeqCst);
    wait_status(&handle, "failed renewal", |st| st.last_error.is_some()).await;
    let error = handle.status.borrow().last_error.clone().unwrap();
    assert!(error.contains("CA is down for the test"), "{error}");
    let current = handle.server_config.borrow().clone();
    let during = connect(addr, &s.ztunnel).await.unwrap();
    assert!(Arc::ptr_eq(
        &current,
        &handle.server_config.borrow().clone()
    ));
    assert_gateway_cert(&during, s.mesh.root_der());

    // Back: renewals resume.
    let renewals = handle.status.borrow().renewals;
    ca.fail.store(false, Ordering::SeqCst);
    wait_status(&handle, "recovery", |st| st.renewals > renewals).await;
}

#[tokio::test]
async fn istiod_refusing_the_token_fails_start_with_the_reason() {
    let s = setup();
    let (ca_addr, _ca) = fake_istiod(&s.mesh, &["right"]).await;
    let roots = s.dir.path().join("root-cert.pem");
    std::fs::write(&roots, s.mesh.root_pem()).unwrap();
    let token = s.dir.path().join("istio-token");
    std::fs::write(&token, "wrong").unwrap();
    let cfg = istiod_config(ca_addr, roots, &token, Duration::from_secs(3600));
    let err = start_with_status(&cfg, CancellationToken::new())
        .await
        .err()
        .expect("a refused token fails start");
    let err = format!("{err:#}");
    assert!(
        err.contains("Unauthenticated") && err.contains("bad token"),
        "{err}"
    );
}
