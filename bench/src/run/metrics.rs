//! bench_serving's `calculate_metrics`: same definitions, same names, same table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::config::{Goodput, RunConfig};
use super::record::RequestRecord;

/// Aggregates of one run; field names are bench_serving's JSONL keys.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub backend: String,
    /// `--tag`, null when not given (as bench_serving writes it).
    pub tag: Option<String>,
    pub dataset_name: String,
    /// A number, or the string "inf" (bench_serving writes the non-JSON `Infinity`).
    pub request_rate: serde_json::Value,
    pub max_concurrency: Option<usize>,
    pub random_input_len: usize,
    pub random_output_len: usize,
    pub random_range_ratio: f64,
    pub connection: String,
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub input_throughput: f64,
    pub output_throughput: f64,
    pub total_throughput: f64,
    pub mean_e2e_latency_ms: f64,
    pub median_e2e_latency_ms: f64,
    pub std_e2e_latency_ms: f64,
    pub p99_e2e_latency_ms: f64,
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub std_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub mean_tpot_ms: f64,
    pub median_tpot_ms: f64,
    pub std_tpot_ms: f64,
    pub p99_tpot_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub std_itl_ms: f64,
    pub p95_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub max_itl_ms: f64,
    pub concurrency: f64,
    /// Requests per second that met every `--goodput` SLO (absent without `--goodput`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_goodput: Option<f64>,
    /// Fraction of all requests that met every SLO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput_fraction: Option<f64>,
    /// Failed requests per reason.
    pub errors: BTreeMap<String, usize>,
}

/// numpy's default (linear) percentile; 0 for no samples, as bench_serving's `x or 0`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Population standard deviation (numpy's default ddof=0).
pub fn std_dev(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// mean, median, std, p95, p99, max of seconds, in milliseconds.
struct Stats {
    mean: f64,
    median: f64,
    std: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn stats_ms(mut secs: Vec<f64>) -> Stats {
    secs.sort_by(f64::total_cmp);
    Stats {
        mean: mean(&secs) * 1e3,
        median: percentile(&secs, 50.0) * 1e3,
        std: std_dev(&secs) * 1e3,
        p95: percentile(&secs, 95.0) * 1e3,
        p99: percentile(&secs, 99.0) * 1e3,
        max: secs.last().copied().unwrap_or(0.0) * 1e3,
    }
}

fn meets(goodput: &Goodput, r: &RequestRecord) -> bool {
    r.success()
        && goodput.ttft_ms.is_none_or(|slo| r.ttft * 1e3 <= slo)
        && goodput
            .tpot_ms
            .is_none_or(|slo| r.tpot().unwrap_or(0.0) * 1e3 <= slo)
        && goodput.e2el_ms.is_none_or(|slo| r.e2e * 1e3 <= slo)
}

pub fn calculate(cfg: &RunConfig, records: &[RequestRecord], duration: f64) -> Metrics {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success()).collect();
    let completed = ok.len();
    let total_input: usize = ok.iter().map(|r| r.prompt_len).sum();
    let total_output: usize = ok.iter().map(|r| r.output_len).sum();
    let ttft = stats_ms(ok.iter().map(|r| r.ttft).collect());
    let tpot = stats_ms(ok.iter().filter_map(|r| r.tpot()).collect());
    let itl = stats_ms(ok.iter().flat_map(|r| r.itl.iter().copied()).collect());
    let e2e_secs: Vec<f64> = ok.iter().map(|r| r.e2e).collect();
    let concurrency = e2e_secs.iter().fold(0.0, |a, b| a + b) / duration;
    let e2e = stats_ms(e2e_secs);
    let mut errors = BTreeMap::new();
    for r in records {
        if let Some(f) = &r.error {
            *errors.entry(f.kind.clone()).or_insert(0) += 1;
        }
    }
    let good = cfg
        .goodput
        .is_set()
        .then(|| records.iter().filter(|r| meets(&cfg.goodput, r)).count());
    Metrics {
        backend: cfg.backend.name().to_string(),
        tag: cfg.tag.clone(),
        dataset_name: "random".to_string(),
        request_rate: if cfg.request_rate.is_finite() {
            serde_json::json!(cfg.request_rate)
        } else {
            serde_json::json!("inf")
        },
        max_concurrency: cfg.max_concurrency,
        random_input_len: cfg.random_input_len,
        random_output_len: cfg.random_output_len,
        random_range_ratio: cfg.random_range_ratio,
        connection: cfg.connection.name().to_string(),
        duration,
        completed,
        failed: records.len() - completed,
        total_input_tokens: total_input,
        total_output_tokens: total_output,
        request_throughput: completed as f64 / duration,
        input_throughput: total_input as f64 / duration,
        output_throughput: total_output as f64 / duration,
        total_throughput: (total_input + total_output) as f64 / duration,
        mean_e2e_latency_ms: e2e.mean,
        median_e2e_latency_ms: e2e.median,
        std_e2e_latency_ms: e2e.std,
        p99_e2e_latency_ms: e2e.p99,
        mean_ttft_ms: ttft.mean,
        median_ttft_ms: ttft.median,
        std_ttft_ms: ttft.std,
        p99_ttft_ms: ttft.p99,
        mean_tpot_ms: tpot.mean,
        median_tpot_ms: tpot.median,
        std_tpot_ms: tpot.std,
        p99_tpot_ms: tpot.p99,
        mean_itl_ms: itl.mean,
        median_itl_ms: itl.median,
        std_itl_ms: itl.std,
        p95_itl_ms: itl.p95,
        p99_itl_ms: itl.p99,
        max_itl_ms: itl.max,
        concurrency,
        request_goodput: good.map(|g| g as f64 / duration),
        goodput_fraction: good.map(|g| g as f64 / records.len().max(1) as f64),
        errors,
    }
}

/// Python's `str(float)` for the rate line: `inf`, `10.0`, `2.5`.
fn py_float(x: f64) -> String {
    if x.is_infinite() {
        "inf".into()
    } else if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// The console table of bench_serving (plus TPOT, failures and goodput).
pub fn summary_table(m: &Metrics, rate: f64, first_errors: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{:=^50}", " Serving Benchmark Result ");
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<40} {value:<10}");
    };
    let f2 = |x: f64| format!("{x:.2}");
    line("Backend:", m.backend.clone());
    line("Traffic request rate:", py_float(rate));
    line(
        "Max request concurrency:",
        m.max_concurrency
            .map_or("not set".to_string(), |c| c.to_string()),
    );
    line("Connection:", m.connection.clone());
    line("Successful requests:", m.completed.to_string());
    line("Failed requests:", m.failed.to_string());
    line("Benchmark duration (s):", f2(m.duration));
    line("Total input tokens:", m.total_input_tokens.to_string());
    line("Total generated tokens:", m.total_output_tokens.to_string());
    line("Request throughput (req/s):", f2(m.request_throughput));
    if let Some(g) = m.request_goodput {
        line("Request goodput (req/s):", f2(g));
    }
    if let Some(g) = m.goodput_fraction {
        line("Goodput (% requests meeting SLOs):", f2(g * 100.0));
    }
    line("Input token throughput (tok/s):", f2(m.input_throughput));
    line("Output token throughput (tok/s):", f2(m.output_throughput));
    line("Total token throughput (tok/s):", f2(m.total_throughput));
    line("Concurrency:", f2(m.concurrency));
    let sections: [(&str, &[(&str, f64)]); 4] = [
        (
            "End-to-End Latency",
            &[
                ("Mean E2E Latency (ms):", m.mean_e2e_latency_ms),
                ("Median E2E Latency (ms):", m.median_e2e_latency_ms),
                ("P99 E2E Latency (ms):", m.p99_e2e_latency_ms),
            ],
        ),
        (
            "Time to First Token",
            &[
                ("Mean TTFT (ms):", m.mean_ttft_ms),
                ("Median TTFT (ms):", m.median_ttft_ms),
                ("P99 TTFT (ms):", m.p99_ttft_ms),
            ],
        ),
        (
            "Time per Output Token (excl. 1st token)",
            &[
                ("Mean TPOT (ms):", m.mean_tpot_ms),
                ("Median TPOT (ms):", m.median_tpot_ms),
                ("P99 TPOT (ms):", m.p99_tpot_ms),
            ],
        ),
        (
            "Inter-Token Latency",
            &[
                ("Mean ITL (ms):", m.mean_itl_ms),
                ("Median ITL (ms):", m.median_itl_ms),
                ("P95 ITL (ms):", m.p95_itl_ms),
                ("P99 ITL (ms):", m.p99_itl_ms),
                ("Max ITL (ms):", m.max_itl_ms),
            ],
        ),
    ];
    for (title, rows) in sections {
        let _ = writeln!(out, "{title:-^50}");
        for (label, v) in rows {
            let _ = writeln!(out, "{label:<40} {:<10.2}", v);
        }
    }
    if !m.errors.is_empty() {
        let _ = writeln!(out, "{:-^50}", "Failed Requests");
        for (kind, n) in &m.errors {
            let _ = writeln!(out, "{:<40} {:<10}", format!("{kind}:"), n);
            if let Some(example) = first_errors.get(kind) {
                let _ = writeln!(out, "  e.g. {example}");
            }
        }
    }
    let _ = writeln!(out, "{}", "=".repeat(50));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert!((percentile(&xs, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(std_dev(&[1.0, 3.0]), 1.0);
    }
}
