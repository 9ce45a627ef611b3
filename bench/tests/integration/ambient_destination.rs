//! The destination ztunnel stand-in over real mTLS + HTTP/2, driven by eastwest-proxy's
//! HBONE client (single HBONE, no gateway): CONNECT to its workload relays bytes with
//! half-close both ways; other destinations and other clients get nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use eastwest_bench::ambient::DestinationZtunnel;
use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use eastwest_proxy::hbone::client::HboneClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";

/// A TCP workload that reads to EOF, then answers `echo:` + what it read and closes.
async fn echo_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                tcp.read_to_end(&mut got).await.unwrap();
                tcp.write_all(b"echo:").await.unwrap();
                tcp.write_all(&got).await.unwrap();
                tcp.shutdown().await.unwrap();
            });
        }
    });
    addr
}

fn client_tls(client: &Identity, server: &SpiffeId) -> Arc<rustls::ClientConfig> {
    client
        .client_config_with_alpn(
            PeerPolicy::Exact(vec![server.clone()]),
            vec![b"h2".to_vec()],
        )
        .unwrap()
}

async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Option<HboneClient> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    HboneClient::connect(tcp, tls, addr.ip().into()).await.ok()
}

#[tokio::test]
async fn relays_connects_to_its_workloads_only_and_only_for_mesh_clients() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server_id = SpiffeId::workload(TD, "demo", "sglang");
    let client_id = SpiffeId::workload(TD, "demo", "open-webui");
    let server = mesh.workload("ash", &server_id).unwrap();
    let client = mesh.workload("fra", &client_id).unwrap();
    let workload = echo_after_eof().await;
    let ztunnel = DestinationZtunnel::start(
        "127.0.0.1:0".parse().unwrap(),
        server
            .server_config_tls13(
                PeerPolicy::Exact(vec![client_id.clone()]),
                vec![b"h2".to_vec()],
            )
            .unwrap(),
        vec![workload],
    )
    .await
    .unwrap();
    let addr = ztunnel.local_addr();

    let hbone = connect(addr, client_tls(&client, &server_id))
        .await
        .unwrap();
    // Two streams on one connection, each half-closed by the client first (END_STREAM ->
    // FIN), then by the workload (FIN -> END_STREAM).
    for msg in [&b"first"[..], &b"second"[..]] {
        let mut stream = hbone.open(&workload.to_string()).await.unwrap();
        stream.write_all(msg).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, [&b"echo:"[..], msg].concat());
    }

    // No open relay: a listening address that is no workload of this node, and a name.
    let other = echo_after_eof().await;
    for authority in [
        other.to_string(),
        "sglang.demo.svc.cluster.local:8000".into(),
    ] {
        let err = hbone.open(&authority).await.err().unwrap();
        assert_eq!(
            err.status(),
            Some(http::StatusCode::BAD_REQUEST),
            "{authority}"
        );
    }

    // A mesh workload the destination does not accept (it trusts the server, so only the
    // server's check can stop it) never gets a stream.
    let intruder = mesh
        .workload("fra", &SpiffeId::workload(TD, "demo", "intruder"))
        .unwrap();
    if let Some(c) = connect(addr, client_tls(&intruder, &server_id)).await {
        assert!(c.open(&workload.to_string()).await.is_err());
    }

    ztunnel.shutdown().await;
}
