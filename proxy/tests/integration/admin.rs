//! The admin port as a load balancer exposes it (Istio's status port, 15021): a connection
//! that sends nothing is closed, and a flood of connections is turned away rather than served.

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
    let mut s = TcpStream::connect(proxy.admin_addr()).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    read_to_close(&mut s).await
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let proxy = quiet_proxy("admin-silent").await;
    let mut silent = TcpStream::connect(proxy.admin_addr()).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
}

#[tokio::test]
async fn a_flood_of_connections_is_turned_away() {
    let proxy = quiet_proxy("admin-flood").await;
    let mut flood = Vec::new();
    for _ in 0..128 {
        flood.push(TcpStream::connect(proxy.admin_addr()).await.unwrap());
    }
    assert_eq!(probe(&proxy).await, "");
    drop(flood);
    // Served again once the flood is gone.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !probe(&proxy).await.starts_with("HTTP/1.1 200") {
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
