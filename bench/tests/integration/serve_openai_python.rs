//! Wire compatibility: the official OpenAI Python client (PyPI `openai`) streams chat and
//! completions from `serve`. Uses `$EASTWEST_PYTHON` (default `python3`), which must be
//! able to `import openai`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use eastwest_bench::serve::{ModelServer, ServeConfig};
use tokio::process::Command;

const TIMEOUT: Duration = Duration::from_secs(120);

fn python() -> String {
    std::env::var("EASTWEST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

#[tokio::test]
async fn openai_python_client_streams_from_serve() {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python:?} (set EASTWEST_PYTHON): {e}"));
    assert!(
        probe.status.success(),
        "{python:?} cannot import openai: run `pip install openai` (e.g. `python3 -m venv /work/venv && \
         /work/venv/bin/pip install openai`, then EASTWEST_PYTHON=/work/venv/bin/python): {}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let cfg = ServeConfig {
        ttft: Duration::from_millis(2),
        itl: Duration::from_millis(1),
        ..Default::default()
    };
    let server = ModelServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
        .await
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py");
    let run = Command::new(&python)
        .arg(&script)
        .arg("--base-url")
        .arg(format!("http://{}/v1", server.local_addr()))
        .args(["--max-tokens", "12"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TIMEOUT, run)
        .await
        .expect("the OpenAI client check finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai_client_check.py failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(stdout.contains("openai client check: ok"), "{stdout}");
    // Two streams of 12 tokens, plus one non-streamed request.
    assert_eq!(server.stats().requests, 3);
}
