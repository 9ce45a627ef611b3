//! `run` with command lines copied from sglang's bench_serving docs: every flag is
//! accepted (the ones that cannot apply warn), a repeated flag takes its last value, and
//! the request bodies and headers are bench_serving's.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server that records each request (head and body) and streams one content event.
pub(crate) async fn recording_server() -> (String, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for _ in 0..100 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let head = text[..end].to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse::<usize>().unwrap())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break (head, text[end + 4..end + 4 + len].to_string());
                    }
                };
                let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                log.lock().unwrap().push((head, json));
                // Readable as OpenAI (choices) and as sglang's native stream (text, meta_info).
                let events = "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"delta\":{\"content\":\"a\"}}],\"text\":\"a\",\"meta_info\":{\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{events}",
                    events.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

/// A JSON line of `run` (or bench_serving): `request_rate` inf is Python's `Infinity`, which
/// is not JSON; read as the string "Infinity".
pub(crate) fn parse_jsonl(text: &str) -> serde_json::Value {
    let fixed = text.trim().replacen(
        r#""request_rate":Infinity"#,
        r#""request_rate":"Infinity""#,
        1,
    );
    serde_json::from_str(&fixed).unwrap_or_else(|e| panic!("{e}: {text}"))
}

pub(crate) fn run(url: &str, out: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["run", "--base-url", url, "--disable-tqdm"])
        .args(["--random-input-len", "4", "--random-output-len", "2"])
        .args(["--random-range-ratio", "1"])
        .args(["--ready-check-timeout-sec", "0", "--warmup-requests", "0"])
        .args(["--request-timeout", "30"])
        .args(args)
        .arg("--output-file")
        .arg(out)
        .output()
        .unwrap()
}

// Multi-threaded: the CLI runs as a blocking child process while the server task answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_bench_serving_command_lines_work_with_its_bodies_and_headers() {
    let (url, log) = recording_server().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("res.jsonl");
    let output = run(
        &url,
        &out,
        &[
            "--backend",
            "vllm",
            "--dataset-name",
            "random",
            "--num-prompts",
            "9",
            "--num-prompts",
            "3",
            "--model",
            "org/model",
            "--served-model-name",
            "served",
            "--tokenizer",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer"),
            "--disable-stream",
            "--flush-cache",
            "--apply-chat-template",
            "--tag",
            "nightly",
            "--extra-request-body",
            r#"{"temperature": 0.7, "top_k": 5}"#,
            "--header",
            "X-Bench=first",
            "--header",
            "X-Bench=second",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for flag in ["--disable-stream", "--flush-cache", "--apply-chat-template"] {
        let warned = stderr
            .lines()
            .any(|l| l.contains("warning") && l.contains(&format!("{flag} is ignored")));
        assert!(warned, "no warning for {flag}: {stderr}");
    }
    let line: serde_json::Value = parse_jsonl(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(line["backend"], "vllm", "the backend as asked for");
    assert_eq!(line["tag"], "nightly");
    assert_eq!(line["completed"], 3, "the last --num-prompts wins");

    let seen = log.lock().unwrap().clone();
    let (posts, info): (Vec<_>, Vec<_>) =
        seen.iter().partition(|(head, _)| head.starts_with("post "));
    assert_eq!(posts.len(), 3);
    assert!(
        info.len() == 1 && info[0].0.starts_with("get /server_info "),
        "then GET /server_info, as bench_serving: {info:?}"
    );
    for (head, body) in posts {
        assert!(head.starts_with("post /v1/completions "), "{head}");
        assert!(
            head.contains("\r\nx-bench: second"),
            "last --header wins: {head}"
        );
        let obj = body.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "best_of",
                "ignore_eos",
                "max_tokens",
                "model",
                "prompt",
                "stream",
                "temperature",
                "top_k"
            ],
            "bench_serving's completions body (no stream_options): {body}"
        );
        assert_eq!(body["model"], "served");
        assert_eq!(body["temperature"], 0.7, "--extra-request-body overrides");
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["max_tokens"], 2);
    }

    // Chat: max_completion_tokens; --disable-ignore-eos.
    let out = dir.path().join("chat.jsonl");
    let output = run(
        &url,
        &out,
        &[
            "--backend",
            "sglang-oai-chat",
            "--num-prompts",
            "1",
            "--model",
            "m",
            "--disable-ignore-eos",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen = log.lock().unwrap().clone();
    let (head, body) = seen
        .iter()
        .rev()
        .find(|(h, _)| h.starts_with("post "))
        .unwrap();
    assert!(head.starts_with("post /v1/chat/completions "), "{head}");
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "ignore_eos",
            "max_completion_tokens",
            "messages",
            "model",
            "stream",
            "temperature"
        ],
        "bench_serving's chat body: {body}"
    );
    assert_eq!(body["ignore_eos"], false);
    assert_eq!(body["max_completion_tokens"], 2);
    assert_eq!(body["messages"][0]["role"], "user");
}

#[test]
fn sharegpt_is_refused_with_a_reason() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["run", "--dataset-name", "sharegpt"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--dataset-name sharegpt is not supported"),
        "{stderr}"
    );
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
}

/// One TLS flag vocabulary across the binaries (--tls-cert/--tls-key/--tls-ca); the old
/// names stay accepted, hidden from --help.
#[test]
fn tls_flags_use_the_shared_names_and_keep_the_old_ones() {
    let bin = env!("CARGO_BIN_EXE_eastwest-bench");
    let help = std::process::Command::new(bin)
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--tls-cert", "--tls-key", "--tls-ca"] {
        assert!(help.contains(flag), "run --help lacks {flag}");
    }
    assert!(!help.contains("--cacert"), "old names are hidden");
    let serve_help = std::process::Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let serve_help = String::from_utf8_lossy(&serve_help.stdout);
    assert!(serve_help.contains("--tls-ca") && !serve_help.contains("--tls-root"));

    // Old and new names reach the same setting: the missing file is named by its new flag.
    for names in [
        ["--cacert", "--cert", "--key"],
        ["--tls-ca", "--tls-cert", "--tls-key"],
    ] {
        let out = std::process::Command::new(bin)
            .args(["run", names[0], "/nonexistent/ca.pem"])
            .args([
                names[1],
                "/nonexistent/c.pem",
                names[2],
                "/nonexistent/k.pem",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("--tls-ca /nonexistent/ca.pem"),
            "{names:?}: {stderr}"
        );
    }
    let out = std::process::Command::new(bin)
        .args(["serve", "--tls-root", "/nonexistent/root.pem", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "serve still takes --tls-root");
}
