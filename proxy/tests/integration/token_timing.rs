//! Token timing at the gateway: real rustls client and server through the real gateway; the
//! server streams response records when the test says so, and the gateway's histograms count
//! what it saw in the record headers.

use std::time::Duration;

use crate::support::*;
use eastwest_proxy::Proxy;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const REQUEST: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: sglang\r\ncontent-length: 0\r\n\r\n";
/// One streamed token event: larger than a control frame's record.
const RECORD: usize = 100;

fn token(i: usize) -> Vec<u8> {
    (0..RECORD).map(|j| (i * 31 + j) as u8).collect()
}

/// An mTLS server that, per connection, reads the request, then writes one record per
/// message on `next` (each written and flushed alone: one TLS record each).
async fn streaming_backend(
    server: &eastwest_certs::Identity,
    mut next: mpsc::Receiver<usize>,
) -> std::net::SocketAddr {
    let cfg = server
        .server_config(eastwest_certs::PeerPolicy::TrustDomain(TD.into()))
        .unwrap();
    let acceptor = TlsAcceptor::from(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut got = vec![0u8; REQUEST.len()];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(got, REQUEST, "request relayed byte-exact");
        while let Some(i) = next.recv().await {
            tls.write_all(&token(i)).await.unwrap();
            tls.flush().await.unwrap();
        }
        let _ = tls.shutdown().await;
    });
    addr
}

/// A TLS 1.3 client connected through the gateway to `host`, its request sent.
async fn client(
    pki: &Pki,
    gw: std::net::SocketAddr,
    host: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let client_cfg = pki
        .client
        .client_config(eastwest_certs::PeerPolicy::TrustDomain(TD.into()))
        .unwrap();
    let tcp = TcpStream::connect(gw).await.unwrap();
    let name = ServerName::try_from(istio_sni(8000, "", host)).unwrap();
    let mut tls = TlsConnector::from(client_cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    tls.write_all(REQUEST).await.unwrap();
    tls.flush().await.unwrap();

    tls
}

/// Reads token `i`, checking it came through byte-exact.
async fn read_token(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, i: usize) {
    let mut got = vec![0u8; RECORD];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, token(i), "record {i} relayed byte-exact");
}

async fn series(proxy: &Proxy, name: &str, route: &str) -> f64 {
    metric(proxy, &format!("{name}{{route=\"{route}\"}}")).await
}

#[tokio::test]
async fn response_records_are_timed_at_the_gateway_and_relayed_byte_exact() {
    const N: usize = 6;
    let pki = pki();
    let (tx, rx) = mpsc::channel(1);
    let backend = streaming_backend(&pki.server, rx).await;
    let host = "tokens.demo.svc.cluster.local";
    let mut cfg = passthrough_config("tokens", vec![service(host, 8000, &[(backend, &[])])]);
    // Small, so the test's one long gap needs no long wait.
    let stall = Duration::from_millis(40);
    cfg.upstream.stall_threshold = stall;
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("tokens").unwrap();
    let route = format!("{host}:8000");

    let mut tls = client(&pki, gw, host).await;

    for i in 0..N {
        if i == N - 1 {
            // The one gap the stall counter must see: longer than the threshold by design
            // (this wait is the thing measured, not a synchronisation).
            tokio::time::sleep(stall * 3).await;
        }
        tx.send(i).await.unwrap();
        read_token(&mut tls, i).await;
    }

    let gaps = "eastwest_stream_record_gap_seconds_count";
    let first = "eastwest_stream_first_response_seconds_count";
    // The first record is taken for the response's headers, the second is the first token
    // (TTFT), the rest are gaps.
    wait_metric(
        &proxy,
        &format!("{gaps}{{route=\"{route}\"}}"),
        (N - 2) as f64,
    )
    .await;
    assert_eq!(series(&proxy, gaps, &route).await, (N - 2) as f64);
    // One request, one TTFT: the TLS 1.3 session tickets the server sent after the handshake
    // are not taken for a response.
    assert_eq!(series(&proxy, first, &route).await, 1.0);
    let stalls = series(&proxy, "eastwest_stream_stalls_total", &route).await;
    assert!(
        (1.0..=(N - 2) as f64).contains(&stalls),
        "stalls {stalls}: the long gap must count, and at most every gap"
    );
    let gap_sum = series(&proxy, "eastwest_stream_record_gap_seconds_sum", &route).await;
    assert!(gap_sum >= (stall * 3).as_secs_f64(), "gap sum {gap_sum}");
    let (_, body) = admin_get(&proxy, "/metrics").await;
    promtool_check(&body);
    drop(tx);
}

/// `telemetry.token_timing: false`: the same stream is relayed byte-exact and counted in the
/// byte metrics, and the token histograms stay empty.
#[tokio::test]
async fn with_token_timing_off_bytes_flow_and_the_histograms_stay_empty() {
    const N: usize = 6;
    let pki = pki();
    let (tx, rx) = mpsc::channel(1);
    let backend = streaming_backend(&pki.server, rx).await;
    let host = "untimed.demo.svc.cluster.local";
    let mut cfg = passthrough_config("untimed", vec![service(host, 8000, &[(backend, &[])])]);
    cfg.telemetry.token_timing = false;
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("untimed").unwrap();
    let route = format!("{host}:8000");

    let mut tls = client(&pki, gw, host).await;
    for i in 0..N {
        tx.send(i).await.unwrap();
        read_token(&mut tls, i).await;
    }
    // The server closes, then the client: once the gateway has counted the connection
    // closed, every record passed its relay (and, were timing on, would have been timed).
    drop(tx);
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, tls.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty(), "{} bytes after the tokens", rest.len());
    drop(tls);
    wait_metric(
        &proxy,
        &format!(
            "eastwest_connections_closed_total{{listener=\"untimed\",route=\"{route}\",result=\"routed\"}}"
        ),
        1.0,
    )
    .await;
    let down = metric(
        &proxy,
        &format!("eastwest_bytes_total{{route=\"{route}\",direction=\"to_downstream\"}}"),
    )
    .await;
    assert!(down >= (N * RECORD) as f64, "{down} bytes relayed down");
    for name in [
        "eastwest_stream_first_response_seconds_count",
        "eastwest_stream_record_gap_seconds_count",
        "eastwest_stream_stalls_total",
    ] {
        assert_eq!(series(&proxy, name, &route).await, 0.0, "{name}");
    }
}
