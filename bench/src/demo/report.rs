//! The demo's outputs: comparison table, sanity checks, results JSON, plots, gateway
//! counters scraped from its `/metrics` (the metrics server).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use serde::Serialize;

use super::svg::{cdf_chart, cdf_panels, Series};
use crate::run::{BenchResult, Metrics};

/// One scenario's outcome, as written to results.json.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub description: String,
    /// The load generator's settings for this scenario.
    pub settings: serde_json::Value,
    pub metrics: Metrics,
    /// Per successful request, ms.
    pub ttfts_ms: Vec<f64>,
    /// Every inter-token gap of successful requests, ms.
    pub itls_ms: Vec<f64>,
    pub content_chunks: usize,
    pub sse_events: u64,
    /// When the scenario started (before its warmup) and finished, Unix time in seconds: the
    /// window to query the gateway's metrics over (e.g. Kiali's graph at that time).
    pub started_unix_s: f64,
    pub finished_unix_s: f64,
}

impl ScenarioResult {
    pub fn new(
        name: &str,
        description: &str,
        settings: serde_json::Value,
        r: &BenchResult,
    ) -> ScenarioResult {
        let ok = r.records.iter().filter(|r| r.success());
        ScenarioResult {
            name: name.into(),
            description: description.into(),
            settings,
            metrics: r.metrics.clone(),
            ttfts_ms: ok.clone().map(|r| r.ttft * 1e3).collect(),
            itls_ms: ok
                .clone()
                .flat_map(|r| r.itl.iter().map(|x| x * 1e3))
                .collect(),
            content_chunks: r.records.iter().map(|r| r.content_chunks).sum(),
            sse_events: r.records.iter().map(|r| r.sse_events).sum(),
            started_unix_s: 0.0,
            finished_unix_s: 0.0,
        }
    }

    /// With the scenario's window (Unix seconds).
    pub fn during(mut self, started_unix_s: f64, finished_unix_s: f64) -> Self {
        self.started_unix_s = started_unix_s;
        self.finished_unix_s = finished_unix_s;
        self
    }
}

/// Now as Unix time in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// TTFT, ITL, TPOT, E2E as mean/p50/p99 per scenario.
pub fn comparison_table(scenarios: &[ScenarioResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<26} {:>5} {:>4} | {:^23} | {:^23} | {:^23} | {:^23} |",
        "", "", "", "TTFT ms", "ITL ms", "TPOT ms", "E2E ms"
    );
    let sub = format!(" {:>7} {:>7} {:>7} |", "mean", "p50", "p99");
    let _ = writeln!(
        s,
        "{:<26} {:>5} {:>4} |{}",
        "scenario",
        "ok",
        "fail",
        sub.repeat(4)
    );
    let _ = writeln!(s, "{}", "-".repeat(26 + 11 + 2 + 4 * 26));
    for sc in scenarios {
        let m = &sc.metrics;
        let trio = |a: f64, b: f64, c: f64| format!("{a:>7.1} {b:>7.1} {c:>7.1}");
        let _ = writeln!(
            s,
            "{:<26} {:>5} {:>4} | {} | {} | {} | {} |",
            sc.name,
            m.completed,
            m.failed,
            trio(m.mean_ttft_ms, m.median_ttft_ms, m.p99_ttft_ms),
            trio(m.mean_itl_ms, m.median_itl_ms, m.p99_itl_ms),
            trio(m.mean_tpot_ms, m.median_tpot_ms, m.p99_tpot_ms),
            trio(
                m.mean_e2e_latency_ms,
                m.median_e2e_latency_ms,
                m.p99_e2e_latency_ms
            ),
        );
    }
    s
}

/// Writes `ttft_cdf.svg`, `ttft_by_scenario.svg` and `itl_cdf.svg` into `dir`; returns their
/// paths.
pub fn write_plots(dir: &Path, scenarios: &[ScenarioResult]) -> anyhow::Result<Vec<String>> {
    let series = |pick: fn(&ScenarioResult) -> &[f64]| -> Vec<Series<'_>> {
        scenarios
            .iter()
            .enumerate()
            .map(|(i, sc)| Series {
                name: &sc.name,
                color: COLORS[i % COLORS.len()],
                values: pick(sc),
            })
            .collect()
    };
    let ttft = cdf_chart(
        "Time to first token per request (CDF)",
        "TTFT (ms)",
        &series(|s| &s.ttfts_ms),
        1.0,
    );
    // On the shared axis each scenario is a near-vertical line (its spread is a few ms, the
    // scenarios are RTTs apart); one panel per scenario with its own axis shows the spread.
    let ttft_panels = cdf_panels(
        "Time to first token per scenario (CDF, own x axis each)",
        "TTFT (ms)",
        "ms",
        &series(|s| &s.ttfts_ms),
    );
    // ITL: cut the x axis at the 99.5th percentile so the body of the distribution shows.
    let itl = cdf_chart(
        "Inter-token latency, every gap (CDF, x axis to p99.5)",
        "ITL (ms)",
        &series(|s| &s.itls_ms),
        0.995,
    );
    let mut written = Vec::new();
    for (name, svg) in [
        ("ttft_cdf.svg", ttft),
        ("ttft_by_scenario.svg", ttft_panels),
        ("itl_cdf.svg", itl),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// GET `http://<metrics address>/metrics` (Prometheus text).
pub async fn fetch_metrics(metrics: SocketAddr) -> anyhow::Result<String> {
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(metrics)
            .await
            .with_context(|| format!("connecting to the gateway's metrics server {metrics}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = http::Request::get("/metrics")
            .header(http::header::HOST, metrics.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("gateway /metrics timed out")?
}

/// Connection and byte counters from Prometheus text, summed per series name and
/// `direction` label (other labels, e.g. route, are summed over).
pub fn gateway_counters(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if !(name.contains("connection") || name.contains("bytes") || name.contains("streams")) {
            continue;
        }
        if name.ends_with("_bucket") || name.ends_with("_sum") || name.ends_with("_count") {
            continue;
        }
        let direction = series
            .split("direction=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next());
        let key = match direction {
            Some(d) => format!("{name}{{direction=\"{d}\"}}"),
            None => name.to_string(),
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_routes_per_direction() {
        let text = "# HELP x\neastwest_bytes_total{route=\"a\",direction=\"upstream\"} 10\n\
                    eastwest_bytes_total{route=\"b\",direction=\"upstream\"} 5\n\
                    eastwest_connections_opened_total{listener=\"tls\"} 3\n\
                    eastwest_connect_duration_seconds_bucket{le=\"1\"} 3\n";
        let c = gateway_counters(text);
        assert_eq!(c["eastwest_bytes_total{direction=\"upstream\"}"], 15.0);
        assert_eq!(c["eastwest_connections_opened_total"], 3.0);
        assert_eq!(c.len(), 2);
    }
}
