//! `run` against the sglang-like ModelServer on loopback: exact counts from a known config,
//! JSONL keys, mTLS with --sni/--connect-to through a plain TCP forwarder, connection reuse.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eastwest_bench::run::{run_benchmark, Backend, RunConfig};
use eastwest_bench::serve::{ModelServer, ServeConfig};
use eastwest_certs::{Mesh, PeerPolicy, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SNI: &str = "outbound_.8000_._.sglang.demo.svc.cluster.local";

fn fast_server() -> ServeConfig {
    ServeConfig {
        ttft: Duration::from_millis(2),
        itl: Duration::from_millis(1),
        ..ServeConfig::default()
    }
}

fn config(url: String, backend: Backend) -> RunConfig {
    let mut cfg = RunConfig::new(url);
    cfg.backend = backend;
    cfg.num_prompts = 10;
    cfg.random_input_len = 32;
    cfg.random_output_len = 16;
    cfg.random_range_ratio = 1.0;
    cfg.max_concurrency = Some(4);
    cfg.warmup_requests = 1;
    cfg
}

#[tokio::test]
async fn known_workload_gives_exact_counts_for_both_backends() {
    let server = ModelServer::start("127.0.0.1:0".parse().unwrap(), fast_server())
        .await
        .unwrap();
    for backend in [Backend::SglangOaiChat, Backend::SglangOai] {
        let cfg = config(format!("http://{}", server.local_addr()), backend);
        // No --model: asked from /v1/models like bench_serving.
        let result = run_benchmark(&cfg, None).await.unwrap();
        let m = &result.metrics;
        assert_eq!(result.model, "demo-model");
        assert_eq!(m.completed, 10, "{backend:?}: {:?}", result.first_errors);
        assert_eq!(m.failed, 0);
        assert_eq!(m.total_output_tokens, 160);
        assert_eq!(m.total_input_tokens, 320);
        for r in &result.records {
            assert_eq!(r.output_len, 16);
            assert_eq!(r.content_chunks, 16);
            assert_eq!(r.itl.len(), 15, "ITL count = tokens - 1");
            assert!(r.ttft > 0.0 && r.e2e > r.ttft);
            assert!(r.tpot().unwrap() > 0.0);
        }
        assert!(m.mean_itl_ms > 0.0 && m.p99_itl_ms >= m.median_itl_ms);
        assert!(m.max_itl_ms >= m.p99_itl_ms);

        let text = result.json_line(true).unwrap();
        assert!(
            text.contains(r#""request_rate":Infinity,"#),
            "inf written as Python's json writes it: {text}"
        );
        let line: serde_json::Value = super::run_flags::parse_jsonl(&text);
        for key in [
            "backend",
            "request_rate",
            "max_concurrency",
            "completed",
            "total_input_tokens",
            "total_output_tokens",
            "duration",
            "request_throughput",
            "input_throughput",
            "output_throughput",
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p99_ttft_ms",
            "mean_tpot_ms",
            "median_tpot_ms",
            "p99_tpot_ms",
            "mean_itl_ms",
            "median_itl_ms",
            "p95_itl_ms",
            "p99_itl_ms",
            "max_itl_ms",
            "mean_e2e_latency_ms",
            "median_e2e_latency_ms",
            "p99_e2e_latency_ms",
            "concurrency",
            "itls",
            "ttfts",
            "output_lens",
            "errors",
        ] {
            assert!(line.get(key).is_some(), "JSONL misses {key}");
        }
        assert_eq!(line["backend"], backend.name());
        assert_eq!(line["request_rate"], "Infinity");
        assert_eq!(line["max_concurrency"], 4);
        assert_eq!(line["itls"][0].as_array().unwrap().len(), 15);
    }
    server.shutdown().await;
}

/// A plain TCP forwarder that remembers each connection's first bytes (the ClientHello).
struct Forwarder {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    first_bytes: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn forwarder(upstream: std::net::SocketAddr) -> Forwarder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let first_bytes = Arc::new(Mutex::new(Vec::new()));
    let (acc, fb) = (accepted.clone(), first_bytes.clone());
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((mut down, _)) = listener.accept().await else {
                return;
            };
            acc.fetch_add(1, Ordering::SeqCst);
            let fb = fb.clone();
            tokio::spawn(async move {
                let mut up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = down.read(&mut buf).await.unwrap_or(0);
                fb.lock().unwrap().push(buf[..n].to_vec());
                if up.write_all(&buf[..n]).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    Forwarder {
        addr,
        accepted,
        first_bytes,
    }
}

/// The model server with the mesh's server identity (mTLS), and a forwarder to it that
/// records each connection's ClientHello.
async fn mtls_server_behind_forwarder(files: &MeshFiles) -> (ModelServer, Forwarder) {
    let server = ModelServer::start(
        "127.0.0.1:0".parse().unwrap(),
        ServeConfig {
            tls: Some(files.server_tls.clone()),
            ..fast_server()
        },
    )
    .await
    .unwrap();
    let fwd = forwarder(server.local_addr()).await;
    (server, fwd)
}

struct MeshFiles {
    dir: tempfile::TempDir,
    server_tls: Arc<rustls::ServerConfig>,
}

fn mesh_files() -> MeshFiles {
    let mesh = Mesh::generate("cluster.local", &["fra", "ash"]).unwrap();
    let server_id = SpiffeId::workload("cluster.local", "demo", "sglang");
    let client_id = SpiffeId::workload("cluster.local", "demo", "open-webui");
    let server = mesh.workload("ash", &server_id).unwrap();
    let client = mesh.workload("fra", &client_id).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert-chain.pem"), client.chain_pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), client.key_pem()).unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), client.root_pem()).unwrap();
    MeshFiles {
        dir,
        server_tls: server
            .server_config(PeerPolicy::Exact(vec![client_id]))
            .unwrap(),
    }
}

async fn cli_run(
    files: &MeshFiles,
    connect_to: std::net::SocketAddr,
    extra: &[&str],
) -> (bool, serde_json::Value, String) {
    let out = files.dir.path().join(format!(
        "out-{}.jsonl",
        extra.join("_").replace(['/', ':'], "")
    ));
    let d = files.dir.path();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args([
            "run",
            "--base-url",
            "https://sglang.demo.svc.cluster.local:8000",
        ])
        .args(["--connect-to", &connect_to.to_string(), "--sni", SNI])
        // No ready check: it would add a connection to the counts below (and wait for
        // servers that fail TLS on purpose).
        .args(["--ready-check-timeout-sec", "0"])
        .arg("--tls-ca")
        .arg(d.join("root-cert.pem"))
        .arg("--tls-cert")
        .arg(d.join("cert-chain.pem"))
        .arg("--tls-key")
        .arg(d.join("key.pem"))
        .args([
            "--model",
            "demo-model",
            "--num-prompts",
            "6",
            "--max-concurrency",
            "2",
        ])
        .args([
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--random-range-ratio",
            "1",
        ])
        .args(["--disable-tqdm"])
        .args(extra)
        .arg("--output-file")
        .arg(&out)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = std::fs::read_to_string(&out).unwrap_or_default();
    let json = if line.trim().is_empty() {
        serde_json::Value::Null
    } else {
        super::run_flags::parse_jsonl(&line)
    };
    (output.status.success(), json, stdout)
}

#[tokio::test]
async fn mtls_with_sni_and_connect_to_through_a_tcp_forwarder() {
    let files = mesh_files();
    let (server, fwd) = mtls_server_behind_forwarder(&files).await;

    // SPIFFE verification of the server: its name is not sglang.demo..., its ID matches.
    let (ok, json, stdout) = cli_run(
        &files,
        fwd.addr,
        &[
            "--spiffe-id",
            "spiffe://cluster.local/ns/demo/sa/sglang",
            "--connection",
            "keepalive",
        ],
    )
    .await;
    assert!(ok, "{stdout}");
    assert_eq!(json["completed"], 6, "{stdout}");
    assert_eq!(json["total_output_tokens"], 24);
    // The dialled forwarder saw ClientHellos carrying the requested SNI.
    let hellos = fwd.first_bytes.lock().unwrap().clone();
    assert!(!hellos.is_empty());
    for h in &hellos {
        assert!(
            h.windows(SNI.len()).any(|w| w == SNI.as_bytes()),
            "SNI missing"
        );
    }
    // Keepalive: at most one connection per in-flight slot (+ warmup), not one per request.
    let keepalive_conns = fwd.accepted.load(Ordering::SeqCst);
    assert!(keepalive_conns <= 3, "{keepalive_conns} connections");

    // New connection per request: warmup + 6, then GET /server_info (as bench_serving).
    let before = fwd.accepted.load(Ordering::SeqCst);
    let (ok, json, _) = cli_run(
        &files,
        fwd.addr,
        &[
            "--spiffe-trust-domain",
            "cluster.local",
            "--connection",
            "new",
        ],
    )
    .await;
    assert!(ok);
    assert_eq!(json["completed"], 6);
    assert_eq!(fwd.accepted.load(Ordering::SeqCst) - before, 8);

    // A server that is not the expected SPIFFE ID: every request fails at TLS; the results
    // are written and the exit status is non-zero.
    let (ok, json, stdout) = cli_run(
        &files,
        fwd.addr,
        &[
            "--spiffe-id",
            "spiffe://cluster.local/ns/demo/sa/impostor",
            // A failed warmup would stop the run before it writes its results.
            "--warmup-requests",
            "0",
        ],
    )
    .await;
    assert!(!ok, "{stdout}");
    assert_eq!(json["completed"], 0);
    assert_eq!(json["errors"]["tls"], 6, "{stdout}");

    // Mesh client cert and no SPIFFE flag: the server must be in the client's trust
    // domain, its host name is not checked.
    let (ok, json, _) = cli_run(&files, fwd.addr, &[]).await;
    assert!(ok);
    assert_eq!(json["completed"], 6);

    // Host-name verification asked for fails: mesh certs carry no DNS names.
    let (ok, json, _) = cli_run(
        &files,
        fwd.addr,
        &["--verify-hostname", "--warmup-requests", "0"],
    )
    .await;
    assert!(!ok);
    assert_eq!(json["errors"]["tls"], 6);
    server.shutdown().await;
}

/// `sidecar`: a plain-HTTP client (as bench_serving is) reaches the mTLS server through it;
/// the sidecar sends the SNI and its client certificate, and checks the server's SPIFFE ID.
#[tokio::test]
async fn sidecar_lets_a_plain_client_reach_an_mtls_server_with_sni() {
    let files = mesh_files();
    let (server, fwd) = mtls_server_behind_forwarder(&files).await;
    let d = files.dir.path();
    let tls = eastwest_bench::run::TlsFlags {
        cacert: Some(d.join("root-cert.pem")),
        cert: Some(d.join("cert-chain.pem")),
        key: Some(d.join("key.pem")),
        spiffe_id: vec!["spiffe://cluster.local/ns/demo/sa/sglang".into()],
        ..Default::default()
    };
    let sidecar = eastwest_bench::sidecar::Sidecar::start(
        "127.0.0.1:0".parse().unwrap(),
        fwd.addr.to_string(),
        tls.client().unwrap(),
        SNI,
    )
    .await
    .unwrap();

    let cfg = config(
        format!("http://{}", sidecar.local_addr()),
        Backend::SglangOaiChat,
    );
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 10, "{:?}", result.first_errors);
    let hellos = fwd.first_bytes.lock().unwrap().clone();
    assert!(!hellos.is_empty());
    for h in &hellos {
        assert!(
            h.windows(SNI.len()).any(|w| w == SNI.as_bytes()),
            "SNI missing"
        );
    }

    // Expecting another SPIFFE ID: the sidecar refuses the server, every request fails.
    let wrong = eastwest_bench::run::TlsFlags {
        spiffe_id: vec!["spiffe://cluster.local/ns/demo/sa/impostor".into()],
        ..tls
    };
    let strict = eastwest_bench::sidecar::Sidecar::start(
        "127.0.0.1:0".parse().unwrap(),
        fwd.addr.to_string(),
        wrong.client().unwrap(),
        SNI,
    )
    .await
    .unwrap();
    let mut cfg = config(
        format!("http://{}", strict.local_addr()),
        Backend::SglangOaiChat,
    );
    cfg.warmup_requests = 0;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 0);
    sidecar.shutdown().await;
    strict.shutdown().await;
    server.shutdown().await;
}

/// `--backend sglang`: native /generate, counted as bench_serving counts it (tokens from
/// meta_info; an event bringing k tokens gives k ITLs of gap/k).
#[tokio::test]
async fn native_generate_backend_counts_tokens_as_bench_serving() {
    let server = ModelServer::start(
        "127.0.0.1:0".parse().unwrap(),
        ServeConfig {
            tokens_per_chunk: 2,
            ..fast_server()
        },
    )
    .await
    .unwrap();
    let mut cfg = config(format!("http://{}", server.local_addr()), Backend::Sglang);
    cfg.random_output_len = 6;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 10, "{:?}", result.first_errors);
    assert_eq!(result.metrics.backend, "sglang");
    for r in &result.records {
        assert_eq!(r.output_len, 6);
        assert_eq!(r.content_chunks, 3, "events at 2, 4, 6 tokens");
        assert_eq!(r.itl.len(), 4, "2 events after the first, 2 tokens each");
        assert_eq!(r.itl[0], r.itl[1], "a 2-token gap split evenly");
        assert_eq!(r.generated_text.split(' ').count(), 6, "cumulative text");
    }
    server.shutdown().await;
}
