//! A minimal HTTP client for the serve tests: real hyper over real sockets, reading SSE
//! events as they arrive.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bound on any single test exchange.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A fast model for tests: the timing knobs are not under test here.
pub fn fast_config() -> eastwest_bench::serve::ServeConfig {
    eastwest_bench::serve::ServeConfig {
        ttft: Duration::from_millis(1),
        itl: Duration::from_millis(1),
        ..Default::default()
    }
}

pub fn build(method: Method, path: &str, body: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "model");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap()
}

/// One HTTP/1.1 request on a fresh connection over `io`.
pub async fn send_h1<I>(io: I, req: Request<Full<Bytes>>) -> Response<Incoming>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx.send_request(req).await.unwrap()
}

/// One HTTP/2 request on a fresh connection over `io`.
pub async fn send_h2<I>(io: I, req: Request<Full<Bytes>>) -> Response<Incoming>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    tx.send_request(req).await.unwrap()
}

pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(DEADLINE, send_h1(tcp, build(method, path, body)))
        .await
        .expect("response within deadline")
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Response<Incoming> {
    request(addr, Method::POST, path, Some(body)).await
}

pub async fn json_body(resp: Response<Incoming>) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body within deadline")
        .unwrap()
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

/// One SSE event: its `data:` payload and when it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub data: String,
    pub at: Instant,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event {:?}: {e}", self.data))
    }
}

/// Reads SSE events one at a time as they arrive.
pub struct SseReader {
    body: Incoming,
    pending: String,
    ready: std::collections::VecDeque<Event>,
    deadline: Instant,
}

impl SseReader {
    pub fn new(resp: Response<Incoming>) -> SseReader {
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        SseReader {
            body: resp.into_body(),
            pending: String::new(),
            ready: Default::default(),
            deadline: Instant::now() + DEADLINE,
        }
    }

    /// The next event, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let frame = tokio::time::timeout_at(self.deadline, self.body.frame())
                .await
                .expect("stream ends within deadline");
            let Some(frame) = frame else {
                assert!(
                    self.pending.is_empty(),
                    "partial event at end: {:?}",
                    self.pending
                );
                return None;
            };
            let frame = frame.unwrap();
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let at = Instant::now();
            self.pending.push_str(std::str::from_utf8(data).unwrap());
            while let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                let data = event
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"))
                    .to_owned();
                self.ready.push_back(Event { data, at });
            }
        }
    }
}

/// Reads an SSE body to its end.
pub async fn sse_events(resp: Response<Incoming>) -> Vec<Event> {
    let mut reader = SseReader::new(resp);
    let mut events = Vec::new();
    while let Some(e) = reader.next().await {
        events.push(e);
    }
    events
}

/// POSTs `body` and reads the SSE reply to its end.
pub async fn post_sse(addr: SocketAddr, path: &str, body: &str) -> Vec<Event> {
    sse_events(post(addr, path, body).await).await
}

/// Polls `cond` until it holds; panics after [`DEADLINE`].
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A TLS client verifier that trusts any server certificate (signatures still checked):
/// for tests where only the *server's* check of the client is under test.
#[derive(Debug)]
pub struct TrustAnyServer(pub std::sync::Arc<rustls::crypto::CryptoProvider>);

impl TrustAnyServer {
    pub fn client_config(
        client: Option<&eastwest_certs::Identity>,
        alpn: &[u8],
    ) -> std::sync::Arc<rustls::ClientConfig> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(TrustAnyServer(provider)));
        let mut cfg = match client {
            Some(id) => builder
                .with_client_auth_cert(id.chain_der(), id.key_der())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![alpn.to_vec()];
        std::sync::Arc::new(cfg)
    }
}

impl rustls::client::danger::ServerCertVerifier for TrustAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
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
        cert: &rustls_pki_types::CertificateDer<'_>,
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
