//! `run` against raw HTTP/1.1 servers that misbehave in one way each: every bad response
//! fails only its own request, is counted with its reason, and the run goes on.

use eastwest_bench::run::{run_benchmark, ConnectionMode, RunConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request (head + Content-Length body).
async fn read_request(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(text);
            }
        }
    }
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

fn sse_head() -> &'static str {
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
}

fn content_event(text: &str) -> String {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
}

/// Serves connection i with `behaviours[i % len]`.
async fn serve(listener: TcpListener, behaviours: Vec<&'static str>) {
    for i in 0..100 {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let behaviour = behaviours[i % behaviours.len()];
        tokio::spawn(async move {
            if read_request(&mut sock).await.is_none() {
                return;
            }
            let reply = match behaviour {
                "404" => "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found".to_string(),
                "json" => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                    .to_string(),
                "cut" => {
                    // Two tokens, then the server dies mid-stream.
                    let mut s = sse_head().to_string();
                    s += &chunk(&content_event("a"));
                    s += &chunk(&content_event("b"));
                    s
                }
                "error" => {
                    let mut s = sse_head().to_string();
                    s += &chunk(&content_event("a"));
                    s += &chunk("data: {\"error\":{\"message\":\"out of memory\"}}\n\n");
                    s += &chunk("data: [DONE]\n\n");
                    s += "0\r\n\r\n";
                    s
                }
                "nousage" => {
                    // Completions shape, no usage chunk: tokens = content events.
                    let mut s = sse_head().to_string();
                    for t in ["p", "q", "", "r", "s"] {
                        s += &chunk(&format!(
                            "data: {{\"choices\":[{{\"index\":0,\"text\":\"{t}\"}}]}}\n\n"
                        ));
                    }
                    s += &chunk("data: [DONE]\n\n");
                    s += "0\r\n\r\n";
                    s
                }
                _ => {
                    // A good stream ("good", "drop-second") written like a lenient real server: `data:` without a
                    // space, comments, CRLF line ends, a usage chunk.
                    let mut s = sse_head().to_string();
                    s += &chunk(": keep-alive\r\n\r\n");
                    for t in ["x", "y", "z"] {
                        s += &chunk(&content_event(t).replace("data: ", "data:").replace('\n', "\r\n"));
                    }
                    s += &chunk("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3}}\n\n");
                    s += &chunk("data: [DONE]\n\n");
                    s += "0\r\n\r\n";
                    s
                }
            };
            let _ = sock.write_all(reply.as_bytes()).await;
            if behaviour == "drop-second" {
                // Keep the connection open as reusable, then drop the next request on it
                // unanswered: what a client sees when an idle connection is closed by the
                // server just as it sends.
                let _ = read_request(&mut sock).await;
                return;
            }
            let _ = sock.shutdown().await;
        });
    }
}

/// Starts [`serve`] with `behaviours` on a loopback port; returns its base URL.
async fn scripted_server(behaviours: Vec<&'static str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, behaviours));
    url
}

/// A loopback address nothing listens on (bound, then dropped).
fn dead_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn config(url: String) -> RunConfig {
    let mut cfg = RunConfig::new(url);
    cfg.model = Some("m".into());
    cfg.num_prompts = 10;
    cfg.random_input_len = 4;
    cfg.random_output_len = 3;
    cfg.random_range_ratio = 1.0;
    cfg.warmup_requests = 0;
    cfg.max_concurrency = Some(1);
    cfg.connection = ConnectionMode::New;
    cfg
}

#[tokio::test]
async fn each_bad_response_fails_its_request_only_and_is_counted() {
    let url = scripted_server(vec!["404", "json", "cut", "error", "good"]).await;

    let result = run_benchmark(&config(url), None).await.unwrap();
    let m = &result.metrics;
    assert_eq!(result.records.len(), 10);
    assert_eq!(m.completed, 2, "{:?}", m.errors);
    assert_eq!(m.failed, 8);
    assert_eq!(m.errors.get("HTTP 404"), Some(&2));
    assert_eq!(m.errors.get("not SSE"), Some(&2));
    assert_eq!(m.errors.get("stream broken"), Some(&2));
    assert_eq!(m.errors.get("server error event"), Some(&2));
    assert!(result.first_errors["server error event"].contains("out of memory"));
    // The good ones: usage says 3 tokens, 3 content chunks, 2 gaps.
    let good: Vec<_> = result
        .records
        .iter()
        .filter(|r| r.error.is_none())
        .collect();
    for r in good {
        assert_eq!(r.output_len, 3);
        assert_eq!(r.content_chunks, 3);
        assert_eq!(r.itl.len(), 2);
        assert!(r.ttft > 0.0 && r.e2e >= r.ttft);
    }
    assert_eq!(m.total_output_tokens, 6);
    let table = result.summary_table(f64::INFINITY);
    assert!(
        table.contains("Failed requests:                         8"),
        "{table}"
    );
    assert!(table.contains("HTTP 404:"), "{table}");
}

#[tokio::test]
async fn refused_connection_fails_every_request_but_the_run_completes() {
    let addr = dead_addr();
    let mut cfg = config(format!("http://{addr}"));
    cfg.max_concurrency = None;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 0);
    assert_eq!(result.metrics.errors.get("connect"), Some(&10));
    assert!(result.first_errors["connect"].contains(&addr.to_string()));
}

#[test]
fn cli_exit_codes_bad_flags_vs_failed_requests() {
    let bin = env!("CARGO_BIN_EXE_eastwest-bench");
    let bad = std::process::Command::new(bin)
        .args(["run", "--request-rate", "fast"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let bad = std::process::Command::new(bin)
        .args(["run", "--goodput", "ttft"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--goodput"));
    // random-ids is token ids of a vocabulary: without a tokenizer there is none.
    let bad = std::process::Command::new(bin)
        .args(["run", "--dataset-name", "random-ids"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("random-ids needs --tokenizer"), "{stderr}");
    let bad = std::process::Command::new(bin)
        .args(["run", "--tokenizer", "/nonexistent/tokenizer.json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--tokenizer /nonexistent/tokenizer.json"),
        "{stderr}"
    );

    let addr = dead_addr();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("res.jsonl");
    let run = std::process::Command::new(bin)
        .args([
            "run",
            "--base-url",
            &format!("http://{addr}"),
            "--model",
            "m",
        ])
        .args([
            "--num-prompts",
            "3",
            "--disable-tqdm",
            "--warmup-requests",
            "0",
            "--ready-check-timeout-sec",
            "0",
        ])
        .args(["--goodput", "ttft:100", "tpot:20"])
        .arg("--output-file")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // Every request failed: the results are still printed and written, but the exit status
    // says so, with the reason on one line.
    assert!(!run.status.success(), "{stdout}\n{stderr}");
    let reason: Vec<&str> = stderr.lines().filter(|l| l.contains("failed")).collect();
    assert_eq!(reason.len(), 1, "{stderr}");
    assert!(
        reason[0].contains("all 3 requests failed (first: connect:"),
        "{stderr}"
    );
    assert!(stdout.contains("============ Serving Benchmark Result ============"));
    assert!(stdout.contains("connect:"), "{stdout}");
    let line: serde_json::Value =
        super::run_flags::parse_jsonl(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(line["completed"], 0);
    assert_eq!(line["failed"], 3);
    assert_eq!(line["request_goodput"], 0.0);
}

#[test]
fn cli_waits_for_the_server_and_gives_up_after_the_ready_check_timeout() {
    let addr = dead_addr();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["run", "--base-url", &format!("http://{addr}")])
        .args(["--num-prompts", "3", "--disable-tqdm"])
        .args(["--ready-check-timeout-sec", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "Waiting up to 1s for http://{addr}/v1/models to become ready..."
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("is not ready after 1s (--ready-check-timeout-sec"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("Serving Benchmark Result"),
        "never started"
    );
}

#[tokio::test]
async fn every_warmup_request_failing_stops_the_run_as_bench_serving_does() {
    let mut cfg = config(format!("http://{}", dead_addr()));
    cfg.warmup_requests = 2;
    let err = run_benchmark(&cfg, None).await.unwrap_err();
    assert!(
        format!("{err:#}").starts_with("Warmup failed - Please make sure benchmark arguments"),
        "{err:#}"
    );
}

#[tokio::test]
async fn without_usage_output_tokens_are_the_requested_ones_as_bench_serving_counts() {
    let url = scripted_server(vec!["nousage"]).await;
    let mut cfg = config(url);
    cfg.backend = eastwest_bench::run::Backend::SglangOai;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 10, "{:?}", result.first_errors);
    for r in &result.records {
        // max_tokens (3), not the 4 content events; the empty-text event is not content.
        assert_eq!(r.output_len, 3);
        assert_eq!(r.content_chunks, 4);
        assert_eq!(r.itl.len(), 3);
        assert_eq!(r.usage_completion_tokens, None);
    }
}

#[tokio::test]
async fn keepalive_retries_once_when_a_reused_connection_dies() {
    // The server answers once per connection, then drops the next request unanswered:
    // a reused connection dies under the client, which must retry on a new one, not fail.
    let url = scripted_server(vec!["drop-second"]).await;
    let mut cfg = config(url);
    cfg.connection = ConnectionMode::Keepalive;
    cfg.warmup_requests = 1;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 10, "{:?}", result.first_errors);
}
