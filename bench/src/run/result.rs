//! The outcome of a run, and the JSON line bench_serving appends to its `--output-file`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::metrics::{self, Metrics};
use super::record::RequestRecord;

/// The outcome of a run: aggregates plus every request's record (in prompt order).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model: String,
    #[serde(flatten)]
    pub metrics: Metrics,
    pub warmup_failed: usize,
    /// SSE events the warmup requests received (to match server-side event counts).
    pub warmup_sse_events: u64,
    /// One example detail per failure kind.
    pub first_errors: BTreeMap<String, String>,
    pub records: Vec<RequestRecord>,
}

impl BenchResult {
    /// bench_serving's console table.
    pub fn summary_table(&self, request_rate: f64) -> String {
        metrics::summary_table(&self.metrics, request_rate, &self.first_errors)
    }

    /// One JSON line as bench_serving appends it: its keys in its order (then eastwest's
    /// own), with `output_details` also per-request `input_lens, output_lens, ttfts, itls,
    /// generated_texts, errors` (seconds, like sglang); an infinite `request_rate` is written
    /// `Infinity`, as Python's json module writes it.
    pub fn json_line(&self, output_details: bool) -> anyhow::Result<String> {
        let r = &self.records;
        let details = output_details.then(|| Details {
            input_lens: r.iter().map(|r| r.prompt_len).collect(),
            output_lens: r.iter().map(|r| r.output_len).collect(),
            ttfts: r.iter().map(|r| r.ttft).collect(),
            itls: r.iter().map(|r| r.itl.as_slice()).collect(),
            generated_texts: r.iter().map(|r| r.generated_text.as_str()).collect(),
            errors: r
                .iter()
                .map(|r| r.error.as_ref().map(|e| e.to_string()).unwrap_or_default())
                .collect(),
        });
        // Serialized straight from the structs (not through serde_json::Value, whose map
        // would sort the keys).
        let line = serde_json::to_string(&JsonLine {
            metrics: &self.metrics,
            details,
        })?;
        Ok(if self.metrics.request_rate.as_str() == Some("inf") {
            // The key is the first "request_rate" outside a string: a tag's quotes are escaped.
            line.replacen(r#""request_rate":"inf""#, r#""request_rate":Infinity"#, 1)
        } else {
            line
        })
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    #[serde(flatten)]
    metrics: &'a Metrics,
    #[serde(flatten)]
    details: Option<Details<'a>>,
}

/// bench_serving's `result_details`.
#[derive(Serialize)]
struct Details<'a> {
    input_lens: Vec<usize>,
    output_lens: Vec<usize>,
    ttfts: Vec<f64>,
    itls: Vec<&'a [f64]>,
    generated_texts: Vec<&'a str>,
    errors: Vec<String>,
}
