//! `serve` behind TLS and mTLS with eastwest-certs identities, configured from PEM files
//! as the CLI is (`--tls-cert/--tls-key/--tls-ca --require-client-cert`), the way the
//! sidecar-terminated sglang pod stands behind the gateway.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::serve_support::*;
use clap::Parser;
use eastwest_bench::serve::{self, ModelServer};
use eastwest_certs::{Identity, Mesh, PeerPolicy, SpiffeId};
use http::{Method, StatusCode};
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TD: &str = "cluster.local";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: serve::Args,
}

fn write_identity(dir: &Path, id: &Identity) -> [String; 3] {
    let files = [
        (dir.join("chain.pem"), id.chain_pem()),
        (dir.join("key.pem"), id.key_pem()),
        (dir.join("root.pem"), id.root_pem()),
    ];
    files.map(|(path, pem)| {
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    })
}

fn sglang_id() -> SpiffeId {
    SpiffeId::workload(TD, "llm", "sglang")
}

/// A model server started from CLI flags, as `eastwest-bench serve` would be.
async fn start_from_flags(dir: &Path, server: &Identity, mtls: bool) -> ModelServer {
    let [chain, key, root] = write_identity(dir, server);
    let mut argv = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ttft",
        "1ms",
        "--itl",
        "1ms",
        "--tls-cert",
        &chain,
        "--tls-key",
        &key,
    ];
    if mtls {
        argv.extend(["--tls-ca", &root, "--require-client-cert"]);
    }
    let args = Cli::try_parse_from(argv).unwrap().serve;
    let cfg = args.config().unwrap();
    ModelServer::start(args.listen, cfg).await.unwrap()
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    // SNI as an Istio sidecar would send it; the SPIFFE ID is what gets checked.
    let sni = ServerName::try_from("outbound_.30000_._.sglang.llm.svc.cluster.local").unwrap();
    TlsConnector::from(cfg).connect(sni, tcp).await
}

fn chat_body() -> String {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true}).to_string()
}

#[tokio::test]
async fn mtls_streams_over_h2_and_http1() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server_id = mesh.workload("ash", &sglang_id()).unwrap();
    let client_id = mesh
        .workload("fra", &SpiffeId::workload(TD, "webui", "open-webui"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_from_flags(dir.path(), &server_id, true).await;
    let addr = server.local_addr();

    for (alpn, want) in [
        (b"h2".as_slice(), http::Version::HTTP_2),
        (b"http/1.1", http::Version::HTTP_11),
    ] {
        let cfg = client_id
            .client_config_with_alpn(PeerPolicy::Exact(vec![sglang_id()]), vec![alpn.to_vec()])
            .unwrap();
        let tls = tls_connect(addr, cfg).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let req = build(
            Method::POST,
            "https://sglang/v1/chat/completions",
            Some(&chat_body()),
        );
        let resp = if want == http::Version::HTTP_2 {
            send_h2(tls, req).await
        } else {
            send_h1(tls, req).await
        };
        assert_eq!(resp.version(), want);
        let events = sse_events(resp).await;
        assert_eq!(
            events.len(),
            7,
            "role, 4 tokens, finish, [DONE]: {events:#?}"
        );
        assert_eq!(events[5].json()["choices"][0]["finish_reason"], "length");
    }
    assert_eq!(server.stats().requests, 2);
}

async fn ask_models(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<StatusCode> {
    let tls = tls_connect(addr, cfg).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let resp = tx
        .send_request(build(Method::GET, "/v1/models", None))
        .await
        .map_err(std::io::Error::other)?;
    Ok(resp.status())
}

#[tokio::test]
async fn mtls_refuses_unauthorised_clients_and_keeps_serving() {
    let mesh = Mesh::generate(TD, &["fra", "ash"]).unwrap();
    let server_id = mesh.workload("ash", &sglang_id()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_from_flags(dir.path(), &server_id, true).await;
    let addr = server.local_addr();

    // Same trust domain name, different root: its certificate must not be accepted.
    let foreign = Mesh::generate(TD, &["fra"]).unwrap();
    let stranger = foreign
        .workload("fra", &SpiffeId::workload(TD, "webui", "open-webui"))
        .unwrap();
    // Each client trusts the server, so only the server's check of the client can fail.
    let wrong_td = mesh
        .workload(
            "fra",
            &SpiffeId::workload("other.domain", "webui", "open-webui"),
        )
        .unwrap();
    for (who, client) in [
        ("foreign root", Some(&stranger)),
        ("other trust domain", Some(&wrong_td)),
        ("no certificate", None),
    ] {
        let cfg = TrustAnyServer::client_config(client, b"http/1.1");
        let outcome = tokio::time::timeout(DEADLINE, ask_models(addr, cfg))
            .await
            .expect("refused within deadline");
        assert!(outcome.is_err(), "{who}: got an answer: {outcome:?}");
    }
    // A mesh client still gets served.
    let client_id = mesh
        .workload("fra", &SpiffeId::workload(TD, "webui", "open-webui"))
        .unwrap();
    let cfg = client_id
        .client_config(PeerPolicy::Exact(vec![sglang_id()]))
        .unwrap();
    let tls = tls_connect(addr, cfg).await.unwrap();
    let (status, models) =
        json_body(send_h1(tls, build(Method::GET, "/v1/models", None)).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][0]["id"], "demo-model");
}

#[tokio::test]
async fn server_tls_without_client_certs() {
    let mesh = Mesh::generate(TD, &["ash"]).unwrap();
    let server_id = mesh.workload("ash", &sglang_id()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_from_flags(dir.path(), &server_id, false).await;
    // A client presenting no certificate is served when mTLS is off.
    let cfg = TrustAnyServer::client_config(None, b"h2");
    let tls = tls_connect(server.local_addr(), cfg).await.unwrap();
    let events = sse_events(
        send_h2(
            tls,
            build(
                Method::POST,
                "https://sglang/v1/chat/completions",
                Some(&chat_body()),
            ),
        )
        .await,
    )
    .await;
    assert_eq!(events.last().unwrap().data, "[DONE]");
}

#[test]
fn bad_cert_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not pem\n").unwrap();
    for (cert, key) in [(&missing, &empty), (&empty, &empty)] {
        let argv = [
            "serve",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        let err = Cli::try_parse_from(argv)
            .unwrap()
            .serve
            .config()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(cert.to_str().unwrap()), "{msg}");
    }
    // --require-client-cert without a root is refused by the CLI.
    let argv = [
        "serve",
        "--tls-cert",
        "c",
        "--tls-key",
        "k",
        "--require-client-cert",
    ];
    assert!(Cli::try_parse_from(argv).is_err());
}
