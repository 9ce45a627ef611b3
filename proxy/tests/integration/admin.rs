//! The admin servers as a cluster exposes them: the status port (15021) published by the load
//! balancer answers readiness and nothing else, whatever is held against it; metrics (15020)
//! and the debug server (127.0.0.1:15000) serve the rest.

use crate::support::*;
use eastwest_proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn quiet_proxy(listener: &str) -> Proxy {
    Proxy::start(passthrough_config(listener, vec![]))
        .await
        .unwrap()
}

/// What a client reads until the admin server closes: the response, or nothing.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(2 * DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the admin server kept the connection open")
        .unwrap_or_default();
    String::from_utf8_lossy(&out).into_owned()
}

/// A readiness probe on a new connection: what came back before the server closed it (a
/// connection closed at once may also fail the write; then nothing came back).
async fn probe(proxy: &Proxy) -> String {
    let mut s = TcpStream::connect(proxy.status_addr()).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    read_to_close(&mut s).await
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let proxy = quiet_proxy("admin-silent").await;
    let mut silent = TcpStream::connect(proxy.status_addr()).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
}

/// Idle and half-sent connections held against the status port (a load balancer publishes
/// it to the internet) make room for new ones, so probes are answered throughout.
#[tokio::test]
async fn a_thousand_idle_connections_do_not_block_readiness() {
    let proxy = quiet_proxy("admin-flood").await;
    let mut flood = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(proxy.status_addr()).await.unwrap();
        if i % 2 == 0 {
            // Slowloris: a request head that never ends.
            s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n")
                .await
                .unwrap();
        }
        flood.push(s);
    }
    for _ in 0..3 {
        let answer = probe(&proxy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
    drop(flood);
}

/// The status port does not show the route table (service names, pod IPs) or the metrics.
#[tokio::test]
async fn each_admin_server_serves_only_its_own_paths() {
    let proxy = Proxy::start(passthrough_config(
        "admin-paths",
        vec![service(
            SGLANG,
            8000,
            &[("10.0.0.7:8000".parse().unwrap(), &[])],
        )],
    ))
    .await
    .unwrap();
    let status = proxy.status_addr();
    assert_eq!(
        http_get(status, "/healthz/ready").await,
        (200, "ready\n".into())
    );
    for path in ["/metrics", "/config_dump"] {
        let (code, body) = http_get(status, path).await;
        assert_eq!(code, 404, "{path} on the status port");
        assert!(
            !body.contains("10.0.0.7") && !body.contains("eastwest_"),
            "{body}"
        );
    }
    let metrics = proxy.metrics_addr();
    let (code, body) = http_get(metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("eastwest_config_version"));
    assert_eq!(http_get(metrics, "/config_dump").await.0, 404);
    let debug = proxy.debug_addr();
    let (code, dump) = http_get(debug, "/config_dump").await;
    assert_eq!(code, 200);
    assert!(dump.contains("10.0.0.7:8000"));
    assert_eq!(http_get(debug, "/metrics").await.0, 200);
    assert_eq!(http_get(debug, "/healthz/ready").await.0, 200);
}
