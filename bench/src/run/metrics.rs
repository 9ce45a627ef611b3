//! bench_serving's `calculate_metrics`: same definitions, same names, same table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::config::RunConfig;
use super::record::RequestRecord;

/// Aggregates of one run: bench_serving's JSONL keys in its order, then eastwest's own
/// (`failed`, `connection`, `max_itl_ms`, `errors`).
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// `--tag`, null when not given (as bench_serving writes it).
    pub tag: Option<String>,
    pub backend: String,
    pub dataset_name: String,
    /// A number, or the string "inf" here; the JSON line writes `Infinity` as bench_serving
    /// (Python's `json.dumps(float("inf"))`) does.
    pub request_rate: serde_json::Value,
    pub max_concurrency: Option<usize>,
    /// Always null: there is no sharegpt dataset here.
    pub sharegpt_output_len: Option<usize>,
    pub random_input_len: usize,
    pub random_output_len: usize,
    pub random_range_ratio: f64,
    /// The server's GET /server_info JSON, null unless it answered 200.
    pub server_info: Option<serde_json::Value>,
    pub duration: f64,
    pub completed: usize,
    pub total_input_tokens: usize,
    /// All input is text here.
    pub total_input_text_tokens: usize,
    pub total_input_vision_tokens: usize,
    pub total_output_tokens: usize,
    /// Output tokens counted by retokenizing each generated text with `--tokenizer`;
    /// without one, the same as `total_output_tokens`.
    pub total_output_tokens_retokenized: usize,
    pub request_throughput: f64,
    pub input_throughput: f64,
    pub output_throughput: f64,
    pub total_throughput: f64,
    pub mean_e2e_latency_ms: f64,
    pub median_e2e_latency_ms: f64,
    pub std_e2e_latency_ms: f64,
    pub p90_e2e_latency_ms: f64,
    pub p95_e2e_latency_ms: f64,
    pub p99_e2e_latency_ms: f64,
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub std_ttft_ms: f64,
    pub p90_ttft_ms: f64,
    pub p95_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub mean_tpot_ms: f64,
    pub median_tpot_ms: f64,
    pub std_tpot_ms: f64,
    pub p90_tpot_ms: f64,
    pub p95_tpot_ms: f64,
    pub p99_tpot_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub std_itl_ms: f64,
    pub p90_itl_ms: f64,
    pub p95_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub concurrency: f64,
    /// Speculative decoding's accept length: always null here.
    pub accept_length: Option<f64>,
    /// Most output tokens in one whole second of the run (bench_serving's 1 s buckets).
    pub max_output_tokens_per_s: f64,
    /// Most requests in flight during one whole second (same buckets).
    pub max_concurrent_requests: usize,
    /// With `--goodput`: the SLOs given, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput_slos_ms: Option<SloMap>,
    /// Requests per second that met every `--goodput` SLO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_goodput: Option<f64>,
    /// Fraction of all requests that met every SLO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_attainment: Option<f64>,
    /// Fraction of all requests that met each SLO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_attainment_by_metric: Option<SloMap>,
    /// eastwest: failed requests.
    pub failed: usize,
    /// eastwest: `--connection` (new or keepalive).
    pub connection: String,
    /// eastwest: the largest ITL (bench_serving prints it but does not write it).
    pub max_itl_ms: f64,
    /// eastwest: failed requests per reason.
    pub errors: BTreeMap<String, usize>,
}

/// Per-SLO figures keyed by metric name, written as a JSON object in the order the SLOs were
/// given (as bench_serving's dicts are).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SloMap(pub Vec<(String, f64)>);

impl SloMap {
    pub fn iter(&self) -> impl Iterator<Item = &(String, f64)> {
        self.0.iter()
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

impl Serialize for SloMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
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

/// mean, median, std, p90, p95, p99, max of seconds, in milliseconds.
struct Stats {
    mean: f64,
    median: f64,
    std: f64,
    p90: f64,
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
        p90: percentile(&secs, 90.0) * 1e3,
        p95: percentile(&secs, 95.0) * 1e3,
        p99: percentile(&secs, 99.0) * 1e3,
        max: secs.last().copied().unwrap_or(0.0) * 1e3,
    }
}

pub fn calculate(cfg: &RunConfig, records: &[RequestRecord], duration: f64) -> Metrics {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success()).collect();
    let completed = ok.len();
    let total_input: usize = ok.iter().map(|r| r.prompt_len).sum();
    let total_output: usize = ok.iter().map(|r| r.output_len).sum();
    let total_output_retokenized = match &cfg.tokenizer {
        Some(tok) => ok
            .iter()
            .map(|r| {
                tok.count(&r.generated_text).unwrap_or_else(|e| {
                    tracing::warn!("retokenizing a generated text: {e:#}");
                    0
                })
            })
            .sum(),
        None => total_output,
    };
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
    let (max_output_tokens_per_s, max_concurrent_requests) = peaks(&ok);
    let goodput = cfg.goodput.is_set().then(|| {
        let slos = cfg.goodput.slos();
        let mut met: Vec<usize> = vec![0; slos.0.len()];
        let mut good = 0;
        for r in records.iter().filter(|r| r.success()) {
            let observed = |name: &str| match name {
                "ttft" => r.ttft * 1e3,
                "tpot" => r.tpot().unwrap_or(0.0) * 1e3,
                _ => r.e2e * 1e3,
            };
            let mut all = true;
            for ((name, slo), met) in slos.iter().zip(met.iter_mut()) {
                if observed(name) <= *slo {
                    *met += 1;
                } else {
                    all = false;
                }
            }
            good += usize::from(all);
        }
        let n = records.len().max(1) as f64;
        let by_metric = SloMap(
            slos.iter()
                .zip(&met)
                .map(|((k, _), c)| (k.clone(), *c as f64 / n))
                .collect(),
        );
        (slos, good as f64 / duration, good as f64 / n, by_metric)
    });
    let (goodput_slos_ms, request_goodput, slo_attainment, slo_attainment_by_metric) = match goodput
    {
        Some((a, b, c, d)) => (Some(a), Some(b), Some(c), Some(d)),
        None => (None, None, None, None),
    };
    Metrics {
        tag: cfg.tag.clone(),
        backend: cfg.backend.name().to_string(),
        dataset_name: cfg.dataset.name().to_string(),
        request_rate: if cfg.request_rate.is_finite() {
            serde_json::json!(cfg.request_rate)
        } else {
            serde_json::json!("inf")
        },
        max_concurrency: cfg.max_concurrency,
        sharegpt_output_len: None,
        random_input_len: cfg.random_input_len,
        random_output_len: cfg.random_output_len,
        random_range_ratio: cfg.random_range_ratio,
        server_info: None,
        duration,
        completed,
        total_input_tokens: total_input,
        total_input_text_tokens: total_input,
        total_input_vision_tokens: 0,
        total_output_tokens: total_output,
        total_output_tokens_retokenized: total_output_retokenized,
        request_throughput: completed as f64 / duration,
        input_throughput: total_input as f64 / duration,
        output_throughput: total_output as f64 / duration,
        total_throughput: (total_input + total_output) as f64 / duration,
        mean_e2e_latency_ms: e2e.mean,
        median_e2e_latency_ms: e2e.median,
        std_e2e_latency_ms: e2e.std,
        p90_e2e_latency_ms: e2e.p90,
        p95_e2e_latency_ms: e2e.p95,
        p99_e2e_latency_ms: e2e.p99,
        mean_ttft_ms: ttft.mean,
        median_ttft_ms: ttft.median,
        std_ttft_ms: ttft.std,
        p90_ttft_ms: ttft.p90,
        p95_ttft_ms: ttft.p95,
        p99_ttft_ms: ttft.p99,
        mean_tpot_ms: tpot.mean,
        median_tpot_ms: tpot.median,
        std_tpot_ms: tpot.std,
        p90_tpot_ms: tpot.p90,
        p95_tpot_ms: tpot.p95,
        p99_tpot_ms: tpot.p99,
        mean_itl_ms: itl.mean,
        median_itl_ms: itl.median,
        std_itl_ms: itl.std,
        p90_itl_ms: itl.p90,
        p95_itl_ms: itl.p95,
        p99_itl_ms: itl.p99,
        concurrency,
        accept_length: None,
        max_output_tokens_per_s,
        max_concurrent_requests,
        goodput_slos_ms,
        request_goodput,
        slo_attainment,
        slo_attainment_by_metric,
        failed: records.len() - completed,
        connection: cfg.connection.name().to_string(),
        max_itl_ms: itl.max,
        errors,
    }
}

/// bench_serving's peaks: output tokens and requests in flight per whole second since the
/// first successful request started (a token at its TTFT and after each ITL).
fn peaks(ok: &[&RequestRecord]) -> (f64, usize) {
    let Some(first) = ok.iter().map(|r| r.start).min_by(f64::total_cmp) else {
        return (0.0, 0);
    };
    let last = ok
        .iter()
        .map(|r| r.start + r.e2e)
        .fold(f64::NEG_INFINITY, f64::max);
    // Bounded by the run's length in seconds (+1, as bench_serving).
    let buckets = (last - first).ceil().max(0.0) as usize + 1;
    let mut tokens = vec![0usize; buckets];
    let mut running = vec![0usize; buckets];
    for r in ok {
        let mut t = r.start + r.ttft;
        for gap in std::iter::once(0.0).chain(r.itl.iter().copied()) {
            t += gap;
            if let Some(b) = tokens.get_mut((t - first).max(0.0) as usize) {
                *b += 1;
            }
        }
        let from = (r.start - first).max(0.0) as usize;
        let to = ((r.start + r.e2e - first).max(0.0) as usize + 1).min(buckets);
        for b in running.iter_mut().take(to).skip(from) {
            *b += 1;
        }
    }
    let max_tokens = tokens.iter().copied().max().unwrap_or(0) as f64;
    (max_tokens, running.iter().copied().max().unwrap_or(0))
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

/// bench_serving's console table, line for line in its order; then eastwest's lines
/// (connection mode, failures per reason with one example).
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
    line("Successful requests:", m.completed.to_string());
    line("Benchmark duration (s):", f2(m.duration));
    line("Total input tokens:", m.total_input_tokens.to_string());
    line(
        "Total input text tokens:",
        m.total_input_text_tokens.to_string(),
    );
    line("Total generated tokens:", m.total_output_tokens.to_string());
    line(
        "Total generated tokens (retokenized):",
        m.total_output_tokens_retokenized.to_string(),
    );
    line("Request throughput (req/s):", f2(m.request_throughput));
    line("Input token throughput (tok/s):", f2(m.input_throughput));
    line("Output token throughput (tok/s):", f2(m.output_throughput));
    line(
        "Peak output token throughput (tok/s):",
        f2(m.max_output_tokens_per_s),
    );
    line(
        "Peak concurrent requests:",
        m.max_concurrent_requests.to_string(),
    );
    line("Total token throughput (tok/s):", f2(m.total_throughput));
    line("Concurrency:", f2(m.concurrency));
    if let (Some(slos), Some(goodput), Some(attained), Some(by_metric)) = (
        &m.goodput_slos_ms,
        m.request_goodput,
        m.slo_attainment,
        &m.slo_attainment_by_metric,
    ) {
        let _ = writeln!(out, "{:-^50}", "Goodput");
        let given: Vec<String> = slos.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let _ = writeln!(out, "{:<40} {:<10}", "SLOs (ms):", given.join(" "));
        let _ = writeln!(out, "{:<40} {:<10.2}", "Request goodput (req/s):", goodput);
        let _ = writeln!(
            out,
            "{:<40} {:<10.2}",
            "SLO attainment (%):",
            attained * 100.0
        );
        for (name, a) in by_metric.iter() {
            let label = format!("{} SLO attainment (%):", name.to_uppercase());
            let _ = writeln!(out, "{label:<40} {:<10.2}", a * 100.0);
        }
    }
    let sections: [(&str, &[(&str, f64)]); 4] = [
        (
            "End-to-End Latency",
            &[
                ("Mean E2E Latency (ms):", m.mean_e2e_latency_ms),
                ("Median E2E Latency (ms):", m.median_e2e_latency_ms),
                ("P90 E2E Latency (ms):", m.p90_e2e_latency_ms),
                ("P95 E2E Latency (ms):", m.p95_e2e_latency_ms),
                ("P99 E2E Latency (ms):", m.p99_e2e_latency_ms),
            ],
        ),
        (
            "Time to First Token",
            &[
                ("Mean TTFT (ms):", m.mean_ttft_ms),
                ("Median TTFT (ms):", m.median_ttft_ms),
                ("P90 TTFT (ms):", m.p90_ttft_ms),
                ("P95 TTFT (ms):", m.p95_ttft_ms),
                ("P99 TTFT (ms):", m.p99_ttft_ms),
            ],
        ),
        (
            "Time per Output Token (excl. 1st token)",
            &[
                ("Mean TPOT (ms):", m.mean_tpot_ms),
                ("Median TPOT (ms):", m.median_tpot_ms),
                ("P90 TPOT (ms):", m.p90_tpot_ms),
                ("P95 TPOT (ms):", m.p95_tpot_ms),
                ("P99 TPOT (ms):", m.p99_tpot_ms),
            ],
        ),
        (
            "Inter-Token Latency",
            &[
                ("Mean ITL (ms):", m.mean_itl_ms),
                ("Median ITL (ms):", m.median_itl_ms),
                ("P90 ITL (ms):", m.p90_itl_ms),
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
    let _ = writeln!(out, "{:-^50}", "eastwest");
    let _ = writeln!(out, "{:<40} {:<10}", "Connection:", m.connection);
    let _ = writeln!(out, "{:<40} {:<10}", "Failed requests:", m.failed);
    for (kind, n) in &m.errors {
        let _ = writeln!(out, "{:<40} {:<10}", format!("{kind}:"), n);
        if let Some(example) = first_errors.get(kind) {
            let _ = writeln!(out, "  e.g. {example}");
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
