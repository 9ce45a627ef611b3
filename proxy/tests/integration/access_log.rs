//! The optional access log: one line per connection, as an operator greps it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::support::*;
use eastwest_proxy::Proxy;
use tracing_subscriber::util::SubscriberInitExt;

/// Collects what the proxy logs (the test's runtime runs every proxy task on this thread, so
/// a thread-scoped subscriber sees them all).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures this thread's logs for as long as the guard lives.
    pub fn install() -> (Captured, tracing::subscriber::DefaultGuard) {
        let log = Captured::default();
        let writer = log.clone();
        let guard = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .set_default();
        (log, guard)
    }

    pub fn access_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains("eastwest::access"))
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test]
async fn one_line_per_connection_with_sni_alpn_route_endpoint_bytes_and_result() {
    let (log, _subscriber) = Captured::install();
    let pki = pki();
    let (backend, _rx) = raw_backend(b"answer").await;
    let mut cfg = passthrough_config("logged", vec![service(SGLANG, 8000, &[(backend, &[])])]);
    cfg.access_log = true;
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("logged").unwrap();

    let hello = client_hello_bytes(&pki.client, &istio_sni(8000, "", SGLANG));
    assert_eq!(half_closed_exchange(gw, &[&hello]).await, b"answer");
    let unknown = client_hello_bytes(
        &pki.client,
        &istio_sni(8000, "", "nope.ns.svc.cluster.local"),
    );
    assert!(half_closed_exchange(gw, &[&unknown]).await.is_empty());
    wait_metric(
        &proxy,
        "eastwest_connections_closed_total{listener=\"logged\",route=\"\",result=\"unknown_route\"}",
        1.0,
    )
    .await;

    let lines = log.access_lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let routed = &lines[0];
    for field in [
        "listener=\"logged\"".to_string(),
        format!("sni=\"{}\"", istio_sni(8000, "", SGLANG)),
        "alpn=\"istio-peer-exchange\"".to_string(),
        format!("route=\"{SGLANG}:8000\""),
        format!("endpoint={backend}"),
        format!("bytes_to_upstream={}", hello.len()),
        "bytes_to_downstream=6".to_string(),
        "result=\"routed\"".to_string(),
        "duration_ms=".to_string(),
    ] {
        assert!(routed.contains(&field), "{field} missing in {routed}");
    }
    let refused = &lines[1];
    assert!(
        refused.contains("result=\"unknown_route\"")
            && refused.contains("route=\"-\"")
            && refused.contains("endpoint=-"),
        "{refused}"
    );
}

#[tokio::test]
async fn an_oversized_hello_is_logged_as_too_large_with_its_reason() {
    use tokio::io::AsyncWriteExt;
    let (log, _subscriber) = Captured::install();
    let pki = pki();
    let (backend, _rx) = raw_backend(b"answer").await;
    let mut cfg = passthrough_config("big", vec![service(SGLANG, 8000, &[(backend, &[])])]);
    cfg.access_log = true;
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("big").unwrap();

    let hello = client_hello_bytes(&pki.client, &istio_sni(8000, "", SGLANG));
    let big = hello::with_extension(&hello, eastwest_proxy::client_hello::MAX_HELLO_BYTES);
    let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
    // The proxy may close before all of it is written.
    let _ = s.write_all(&big).await;
    assert!(closed_by_proxy(s).await);
    wait_metric(
        &proxy,
        "eastwest_connections_closed_total{listener=\"big\",route=\"\",result=\"too_large\"}",
        1.0,
    )
    .await;
    let lines = log.access_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("result=\"too_large\""), "{}", lines[0]);
    assert!(
        lines[0].contains("detail=ClientHello larger than 65536 bytes"),
        "{}",
        lines[0]
    );
}
