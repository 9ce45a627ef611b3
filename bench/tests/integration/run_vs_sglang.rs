//! Drop-in check against the real thing: sglang's own `bench_serving` (PyPI `sglang`, run
//! unchanged through bench/scripts/sglang_bench_serving.py) and `eastwest-bench run`, same
//! flags and seed, against one in-process `serve`. A relay between the clients and the
//! server records every request as it went over the wire. Asserts: the JSON line has
//! sglang's keys in sglang's order (eastwest's extras after them), the same lengths and
//! token counts, and the request bodies are the same, body for body.
//!
//! Uses `$EASTWEST_PYTHON` (scripts/test.sh makes a venv with sglang and what its
//! bench_serving imports); without that variable the test says so and passes, so that a bare
//! `cargo test` does not need PyPI.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eastwest_bench::serve::{ModelServer, ServeConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Everything each client connection sent, one entry per connection.
type Captured = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP relay to `upstream` that keeps a copy of what clients send.
async fn capture_relay(upstream: SocketAddr) -> (SocketAddr, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let captured: Captured = Arc::default();
    let store = captured.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                    store.lock().unwrap().push(seen);
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, captured)
}

/// The JSON bodies of the POSTs to `path` in the captured connections (requests with a
/// Content-Length, as both clients send them).
fn bodies(captured: &Captured, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for conn in captured.lock().unwrap().iter() {
        let mut rest = conn.as_slice();
        while let Some(end) = find(rest, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&rest[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let body = &rest[end + 4..(end + 4 + len).min(rest.len())];
            if head.starts_with(&format!("POST {path} ")) {
                out.push(serde_json::from_slice(body).expect("request body is JSON"));
            }
            rest = &rest[(end + 4 + len).min(rest.len())..];
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The top-level keys of a JSON line in their order (Python's `Infinity` read as a string).
fn keys_in_order(line: &str) -> (Vec<String>, BTreeMap<String, Value>) {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Ordered;
    impl<'de> Visitor<'de> for Ordered {
        type Value = Vec<(String, Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry::<String, Value>()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    let fixed = line
        .replace(": Infinity", ": \"Infinity\"")
        .replace(":Infinity", ":\"Infinity\"");
    let mut de = serde_json::Deserializer::from_str(&fixed);
    let entries = de.deserialize_map(Ordered).expect("a JSON object");
    let keys = entries.iter().map(|(k, _)| k.clone()).collect();
    (keys, entries.into_iter().collect())
}

fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

async fn run_tool(program: &str, pre: &[&str], flags: &[String], out: &Path) -> String {
    let run = Command::new(program)
        .args(pre)
        .args(flags)
        .arg("--output-file")
        .arg(out)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .kill_on_drop(true)
        .output();
    let o = tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{program} {pre:?} finishes in time"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{program} {pre:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(out).unwrap()
}

#[tokio::test]
async fn sglang_bench_serving_and_run_agree_on_keys_and_bodies() {
    let Ok(python) = std::env::var("EASTWEST_PYTHON") else {
        eprintln!(
            "skipped: set EASTWEST_PYTHON to a python with sglang's bench_serving (scripts/test.sh makes one)"
        );
        return;
    };
    let cfg = ServeConfig {
        ttft: Duration::from_millis(2),
        itl: Duration::from_millis(1),
        model: "demo-model".into(),
        ..Default::default()
    };
    let server = ModelServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
        .await
        .unwrap();
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sglang_bench_serving.py");
    let dir = tempfile::tempdir().unwrap();

    for (backend, path) in [
        ("sglang-oai", "/v1/completions"),
        ("sglang-oai-chat", "/v1/chat/completions"),
        ("sglang", "/generate"),
    ] {
        let mut lines = Vec::new();
        let mut sent = Vec::new();
        for tool in ["sglang", "eastwest"] {
            // A relay per tool and backend, so each capture is one tool's requests.
            let (relay, captured) = capture_relay(server.local_addr()).await;
            let flags: Vec<String> = [
                "--backend",
                backend,
                "--base-url",
                &format!("http://{relay}"),
                "--model",
                "demo-model",
                "--tokenizer",
                tokenizer_dir().to_str().unwrap(),
                "--dataset-name",
                "random-ids",
                "--num-prompts",
                "6",
                "--random-input-len",
                "12",
                "--random-output-len",
                "5",
                "--random-range-ratio",
                "0.5",
                "--seed",
                "7",
                "--disable-tqdm",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let out = dir.path().join(format!("{tool}-{backend}.jsonl"));
            let line = if tool == "sglang" {
                run_tool(&python, &[wrapper.to_str().unwrap()], &flags, &out).await
            } else {
                run_tool(env!("CARGO_BIN_EXE_eastwest-bench"), &["run"], &flags, &out).await
            };
            lines.push(line);
            let mut b = bodies(&captured, path);
            // Arrival order differs between runs at rate inf; compare as sets.
            b.sort_by_key(|v| v.to_string());
            sent.push(b);
        }

        let (sg_keys, sg) = keys_in_order(lines[0].trim());
        let (ew_keys, ew) = keys_in_order(lines[1].trim());
        assert_eq!(
            ew_keys[..sg_keys.len()],
            sg_keys[..],
            "{backend}: eastwest's JSON keys, in order, start with sglang's"
        );
        assert!(
            lines[0].contains("\"request_rate\": Infinity")
                && lines[1].contains("\"request_rate\":Infinity"),
            "both write request_rate inf as Infinity:\n{}\n{}",
            lines[0],
            lines[1]
        );
        for key in [
            "backend",
            "dataset_name",
            "completed",
            "total_input_tokens",
            "total_output_tokens",
            "total_output_tokens_retokenized",
            "max_concurrency",
            "tag",
        ] {
            assert_eq!(ew[key], sg[key], "{backend}: {key}");
        }
        assert_eq!(
            sg["completed"], 6,
            "{backend}: sglang completed every request"
        );
        // One warmup request and six benchmark requests each, the same bodies.
        assert_eq!(sent[0].len(), 7, "{backend}: sglang sent {:?}", sent[0]);
        assert_eq!(
            sent[1], sent[0],
            "{backend}: eastwest's request bodies are sglang's"
        );
    }
    server.shutdown().await;
}
