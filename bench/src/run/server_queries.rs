//! What the bench asks the server besides the measured requests: whether it is ready, its
//! model, its `/server_info`.

use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;

use super::client::Target;

/// GET `path` on the target: the status and (up to 1 MiB of) the body.
pub(super) async fn get(
    target: &Target,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    let exchange = async {
        let mut sender = target
            .checkout()
            .await
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        let req = http::Request::get(format!("{}{path}", target.path_prefix))
            .header(http::header::HOST, target.authority.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_bytes();
        target.checkin(sender);
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .context("timed out")?
}

/// The first model id of GET /v1/models.
pub(super) async fn fetch_model(target: &Target) -> anyhow::Result<String> {
    let (status, body) = get(target, "/v1/models", Duration::from_secs(10)).await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}");
    let v: serde_json::Value = serde_json::from_slice(&body).context("not JSON")?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .context("no data[0].id")
}

/// bench_serving's `wait_for_endpoint`: polls GET /v1/models once a second (5 s per try)
/// until it answers 200, for at most `timeout`.
pub(super) async fn wait_until_ready(
    target: &Target,
    base_url: &str,
    timeout: Duration,
    console: bool,
) -> anyhow::Result<()> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    if console {
        println!(
            "Waiting up to {}s for {url} to become ready...",
            timeout.as_secs()
        );
    }
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let attempt = get(target, "/v1/models", left.min(Duration::from_secs(5))).await;
        if matches!(&attempt, Ok((status, _)) if *status == http::StatusCode::OK) {
            if console {
                println!("Server ready in {:.1}s.", start.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let why = match attempt {
                Ok((status, _)) => format!("HTTP {status}"),
                Err(e) => format!("{e:#}"),
            };
            anyhow::bail!(
                "server at {url} is not ready after {}s (--ready-check-timeout-sec; last try: {why})",
                timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_secs(1).min(timeout.saturating_sub(start.elapsed())))
            .await;
    }
}
