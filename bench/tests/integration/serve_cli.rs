//! The `eastwest-bench serve` and `wan` binaries: start, print where they listen, serve
//! through each other.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(30);

/// Starts the binary and returns it with the address from its "listening on" line.
async fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("listening line within deadline")
        .unwrap()
        .expect("a listening line");
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_start_matches("http://")
        .to_owned();
    (child, addr)
}

#[tokio::test]
async fn serve_behind_wan_answers_a_raw_http1_stream() {
    // The old millisecond spellings stay as aliases that take bare numbers.
    let (_serve, serve_addr) = spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ttft-ms",
        "1",
        "--itl-ms",
        "1",
    ])
    .await;
    let (_wan, wan_addr) = spawn(&[
        "wan",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &serve_addr,
        "--rtt",
        "4ms",
    ])
    .await;
    let body =
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(&wan_addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut reply))
        .await
        .expect("reply within deadline")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("text/event-stream"), "{reply}");
    assert_eq!(
        reply.matches("\"finish_reason\":\"length\"").count(),
        1,
        "{reply}"
    );
    assert!(reply.contains("data: [DONE]"), "{reply}");
}

#[tokio::test]
async fn bad_flags_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["serve", "--itl-ms=-3"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--itl"));
    let out = Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["wan", "--measure", "1", "--rtt", "90 parsecs"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rtt") && err.contains("expected a duration such as 30s"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["wan", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "wan without --upstream must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"));
}
