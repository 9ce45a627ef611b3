//! Shared test helpers: the in-process Kubernetes API server, object builders, polling.

pub mod apiserver;
pub mod control;
pub mod objects;

use std::future::Future;
use std::time::Duration;

/// Polls `cond` every 10 ms until it holds; panics with `what` after 20 s.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Plain HTTP/1.1 GET against a loopback admin port: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Opens a route subscription with `query` over plain HTTP/2 (h2c on loopback) and returns the
/// response, whatever its status.
pub async fn subscribe_h2c(
    routes_addr: std::net::SocketAddr,
    query: &str,
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(routes_addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let uri = format!(
        "http://{routes_addr}{}?{query}",
        eastwest_routes::ROUTES_STREAM_PATH
    );
    let req = http::Request::get(uri)
        .body(http_body_util::Empty::new())
        .unwrap();
    send.send_request(req).await.unwrap()
}

/// The endpoint addresses of `host`'s first port in `table` (empty if it has none).
pub fn endpoint_addrs(table: &eastwest_routes::RouteTable, host: &str) -> Vec<String> {
    table
        .service(host)
        .map(|s| {
            s.ports[0]
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect()
        })
        .unwrap_or_default()
}
