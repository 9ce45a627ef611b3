//! The gateway's mesh identity: files (checked, rotated) and istiod's CA (a real tonic gRPC
//! server speaking `istio.v1.auth.IstioCertificateService` over TLS), seen by real rustls
//! clients handshaking with the server config it publishes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use eastwest_certs::files::{identity_files, write_all};
use eastwest_certs::{Identity, LeafOptions, Mesh, SpiffeId};
use eastwest_proxy::identity::pb::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE,
};
use eastwest_proxy::identity::{start_with_status, IdentityHandle};
use eastwest_routes::{IdentityConfig, IdentityFiles, IstiodCa};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::support::{DEADLINE, TD};

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";

fn gateway_id() -> SpiffeId {
    GATEWAY_ID.parse().unwrap()
}

/// The mesh, a source ztunnel's identity and the gateway's files in a temp dir.
struct Setup {
    mesh: Mesh,
    ztunnel: Identity,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let ztunnel = mesh
        .workload("ash", &SpiffeId::workload(TD, "istio-system", "ztunnel"))
        .unwrap();
    Setup {
        mesh,
        ztunnel,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn gateway_cert(&self) -> Identity {
        self.mesh.workload("fra", &gateway_id()).unwrap()
    }

    /// Writes `id` as `DIR/gw/{cert-chain,key,root-cert}.pem`, as `eastwest-certs gateway` does.
    fn write(&self, id: &Identity) {
        let dir = self.dir.path().join("gw/");
        write_all(&identity_files(id, &dir), true).unwrap();
    }

    fn files_config(&self) -> IdentityConfig {
        let dir = self.dir.path().join("gw");
        IdentityConfig {
            trust_domain: TD.into(),
            extra_trust_domains: Vec::new(),
            files: Some(IdentityFiles {
                cert_chain: dir.join("cert-chain.pem"),
                key: dir.join("key.pem"),
                roots: dir.join("root-cert.pem"),
            }),
            istiod: None,
        }
    }
}

/// A stand-in for the hbone listener: reads the server config at each accept, then echoes.
async fn echo_listener(handle: &IdentityHandle) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let configs = handle.server_config.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(configs.borrow().clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A ztunnel-like client: TLS 1.3, ALPN h2, no SNI, presenting `client`'s certificate. It
/// takes any server certificate in the handshake (so a client from another CA still gets to
/// present its own), then checks the gateway's chain to the mesh root and its SPIFFE ID.
/// Then one echo round trip: in TLS 1.3 the server refuses a client certificate only after
/// the client's side of the handshake is done.
async fn connect(addr: SocketAddr, client: &Identity) -> std::io::Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(client.chain_der(), client.key_der())
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.enable_sni = false;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("ignored.invalid").unwrap();
    let mut tls = tokio::time::timeout(
        DEADLINE,
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))??;
    echo(&mut tls, b"hello").await?;
    Ok(tls)
}

/// Checks what the gateway served: its chain to `root` and its SPIFFE ID.
fn assert_gateway_cert(tls: &Tls, root: CertificateDer<'static>) {
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    eastwest_certs::check_chain(&chain, &[root]).unwrap();
    let id = eastwest_certs::spiffe_id_of(&chain[0]).unwrap().unwrap();
    assert_eq!(id.to_string(), GATEWAY_ID);
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn echo(tls: &mut Tls, msg: &[u8]) -> std::io::Result<()> {
    tls.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    assert_eq!(buf, msg);
    Ok(())
}

fn served_leaf(tls: &Tls) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Polls `check` on the status until it holds (bounded).
async fn wait_status(
    handle: &IdentityHandle,
    what: &str,
    check: impl Fn(&eastwest_proxy::identity::IdentityStatus) -> bool,
) {
    let mut status = handle.status.clone();
    tokio::time::timeout(DEADLINE, status.wait_for(|s| check(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: status stayed {:?}", handle.status.borrow()))
        .unwrap();
}

#[tokio::test]
async fn files_serve_the_gateway_cert_tls13_h2_and_rotate_without_touching_open_connections() {
    let s = setup();
    let first = s.gateway_cert();
    s.write(&first);
    let handle = start_with_status(&s.files_config(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(handle.status.borrow().spiffe_id, GATEWAY_ID);
    let addr = echo_listener(&handle).await;
    let mut before = connect(addr, &s.ztunnel).await.unwrap();
    assert_gateway_cert(&before, s.mesh.root_der());
    assert_eq!(served_leaf(&before), first.chain_der()[0]);
    let session = before.get_ref().1;
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));

    let second = s.gateway_cert();
    s.write(&second);
    wait_status(&handle, "rotation", |st| st.renewals == 1).await;
    let after = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&after), second.chain_der()[0]);
    // The connection opened before still flows, on its old certificate.
    echo(&mut before, b"still here").await.unwrap();
    assert_eq!(served_leaf(&before), first.chain_der()[0]);
}

#[tokio::test]
async fn files_a_bad_new_cert_keeps_the_old_one_and_says_why() {
    let s = setup();
    let first = s.gateway_cert();
    s.write(&first);
    let cfg = s.files_config();
    let handle = start_with_status(&cfg, CancellationToken::new())
        .await
        .unwrap();
    let addr = echo_listener(&handle).await;
    // A certificate from another mesh: does not chain to the roots in force.
    let foreign = Mesh::generate(TD, &["fra"])
        .unwrap()
        .workload("fra", &gateway_id())
        .unwrap();
    let files = cfg.files.as_ref().unwrap();
    let chain_path = files.cert_chain.clone();
    // Two writes: a reload may catch the first alone (key and cert mismatched), and must
    // settle on the pair before reporting.
    std::fs::write(&chain_path, foreign.chain_pem()).unwrap();
    std::fs::write(&files.key, foreign.key_pem()).unwrap();
    wait_status(&handle, "refused reload", |st| st.last_error.is_some()).await;
    let error = handle.status.borrow().last_error.clone().unwrap();
    assert!(error.contains(&chain_path.display().to_string()), "{error}");
    assert!(error.contains("does not chain to the roots"), "{error}");
    assert_eq!(handle.status.borrow().renewals, 0);
    let tls = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&tls), first.chain_der()[0]);
}

#[tokio::test]
async fn files_removed_keep_the_certificate_in_force_until_they_are_back() {
    let s = setup();
    let first = s.gateway_cert();
    s.write(&first);
    let cfg = s.files_config();
    let handle = start_with_status(&cfg, CancellationToken::new())
        .await
        .unwrap();
    let addr = echo_listener(&handle).await;
    std::fs::remove_file(&cfg.files.as_ref().unwrap().cert_chain).unwrap();
    let tls = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&tls), first.chain_der()[0]);
    let second = s.gateway_cert();
    s.write(&second);
    wait_status(&handle, "files back", |st| st.renewals == 1).await;
    let tls = connect(addr, &s.ztunnel).await.unwrap();
    assert_eq!(served_leaf(&tls), second.chain_der()[0]);
    assert!(handle.status.borrow().last_error.is_none());
}

#[tokio::test]
async fn files_are_checked_at_start_with_errors_naming_the_file() {
    let s = setup();
    let gw = s.gateway_cert();
    s.write(&gw);
    let cfg = s.files_config();
    let files = cfg.files.clone().unwrap();
    let start_err = |cfg: IdentityConfig| async move {
        format!(
            "{:#}",
            start_with_status(&cfg, CancellationToken::new())
                .await
                .err()
                .expect("start should fail")
        )
    };

    // A key that is not the certificate's.
    std::fs::write(&files.key, s.gateway_cert().key_pem()).unwrap();
    let err = start_err(cfg.clone()).await;
    assert!(
        err.contains(&files.key.display().to_string()) && err.contains("does not match"),
        "{err}"
    );
    std::fs::write(&files.key, gw.key_pem()).unwrap();

    // Roots of another mesh.
    let other = Mesh::generate(TD, &["fra"]).unwrap();
    std::fs::write(&files.roots, other.root_pem()).unwrap();
    let err = start_err(cfg.clone()).await;
    assert!(
        err.contains(&files.roots.display().to_string()) && err.contains("does not chain"),
        "{err}"
    );
    std::fs::write(&files.roots, gw.root_pem()).unwrap();

    // A certificate without a SPIFFE ID.
    let plain = rcgen::generate_simple_self_signed(vec!["gw.example".to_string()]).unwrap();
    std::fs::write(&files.cert_chain, plain.cert.pem()).unwrap();
    std::fs::write(&files.key, plain.signing_key.serialize_pem()).unwrap();
    let err = start_err(cfg.clone()).await;
    assert!(
        err.contains(&files.cert_chain.display().to_string()) && err.contains("no SPIFFE ID"),
        "{err}"
    );

    // A missing file.
    let mut missing = cfg.clone();
    missing.files.as_mut().unwrap().key = s.dir.path().join("nope.pem");
    let err = start_err(missing).await;
    assert!(err.contains("nope.pem"), "{err}");
}

#[tokio::test]
async fn clients_from_a_foreign_ca_or_another_trust_domain_are_refused() {
    let s = setup();
    s.write(&s.gateway_cert());
    let handle = start_with_status(&s.files_config(), CancellationToken::new())
        .await
        .unwrap();
    let addr = echo_listener(&handle).await;
    let foreign = Mesh::generate(TD, &["fra"])
        .unwrap()
        .workload("fra", &SpiffeId::workload(TD, "istio-system", "ztunnel"))
        .unwrap();
    let err = connect(addr, &foreign)
        .await
        .expect_err("foreign CA accepted");
    assert!(err.to_string().contains("alert"), "{err}");
    let other_td = s
        .mesh
        .workload(
            "ash",
            &SpiffeId::workload("other.local", "istio-system", "ztunnel"),
        )
        .unwrap();
    let err = connect(addr, &other_td)
        .await
        .expect_err("other trust domain accepted");
    assert!(err.to_string().contains("alert"), "{err}");
    connect(addr, &s.ztunnel).await.unwrap();

    // Listed in extra_trust_domains: accepted.
    let mut cfg = s.files_config();
    cfg.extra_trust_domains = vec!["other.local".into()];
    let handle = start_with_status(&cfg, CancellationToken::new())
        .await
        .unwrap();
    let addr = echo_listener(&handle).await;
    connect(addr, &other_td).await.unwrap();
}

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

#[tokio::test]
async fn a_proxy_with_identity_shows_it_in_config_dump_and_metrics() {
    let s = setup();
    s.write(&s.gateway_cert());
    let mut cfg = crate::support::passthrough_config("identity-wired", vec![]);
    cfg.identity = Some(s.files_config());
    let proxy = eastwest_proxy::Proxy::start(cfg).await.unwrap();
    let (status, body) = crate::support::admin_get(&proxy, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["identity"]["spiffe_id"], GATEWAY_ID);
    assert_eq!(dump["identity"]["source"], "files");
    assert!(dump["identity"]["not_after"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let (_, metrics) = crate::support::admin_get(&proxy, "/metrics").await;
    let expiry = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("eastwest_identity_cert_expiry_timestamp_seconds{source=\"files\"} ")
        })
        .unwrap_or_else(|| panic!("no expiry gauge in:\n{metrics}"));
    let expiry: f64 = expiry.trim().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The default leaf lives a day.
    assert!(
        expiry > now && expiry < now + 2.0 * 86400.0,
        "{expiry} vs {now}"
    );
    assert!(metrics.contains("eastwest_identity_cert_renewals_total{source=\"files\"}"));
    crate::support::promtool_check(&metrics);

    // Identity that cannot be loaded: the proxy does not start, and says which file.
    let mut cfg = crate::support::passthrough_config("identity-bad", vec![]);
    let mut id = s.files_config();
    id.files.as_mut().unwrap().roots = s.dir.path().join("missing-root.pem");
    cfg.identity = Some(id);
    let Err(err) = eastwest_proxy::Proxy::start(cfg).await else {
        panic!("a proxy with an unloadable identity started");
    };
    assert!(format!("{err:#}").contains("missing-root.pem"), "{err:#}");
}
