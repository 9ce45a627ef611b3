//! What one request produced.

use serde::Serialize;

/// Why a request failed: `kind` groups failures in the summary, `detail` is this one's text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub kind: String,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: impl Into<String>, detail: impl Into<String>) -> Failure {
        Failure {
            kind: kind.into(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Timings of one request, in seconds from just before its connection was taken, like
/// bench_serving's `RequestFuncOutput`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    pub prompt_len: usize,
    /// `max_tokens` asked for.
    pub requested_output_len: usize,
    /// Output tokens: the usage chunk's `completion_tokens` when sent, else content chunks.
    pub output_len: usize,
    /// The content received (bench_serving's `generated_text`).
    pub generated_text: String,
    /// Time to the first non-empty content delta.
    pub ttft: f64,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<f64>,
    /// Time to the last SSE event (bench_serving's `latency`).
    pub e2e: f64,
    /// SSE events whose delta carried non-empty content.
    pub content_chunks: usize,
    /// All SSE `data` events, including usage and `[DONE]`.
    pub sse_events: u64,
    /// Completion tokens reported by the server's usage chunk, if any.
    pub usage_completion_tokens: Option<usize>,
    pub error: Option<Failure>,
    /// When the arrival process wanted this request sent, in seconds from the benchmark's
    /// start (`None` for `--request-rate inf`).
    pub scheduled: Option<f64>,
    /// When it was sent (its arrival; it may then wait for `--max-concurrency`), seconds
    /// from the benchmark's start.
    pub arrival: f64,
    /// When it started (after any `--max-concurrency` wait), seconds from the benchmark's
    /// start: bench_serving's `start_time`, for the per-second peaks.
    pub start: f64,
}

impl RequestRecord {
    pub fn success(&self) -> bool {
        self.error.is_none()
    }

    /// (e2e − TTFT) / (output tokens − 1); `None` with fewer than 2 tokens.
    pub fn tpot(&self) -> Option<f64> {
        (self.success() && self.output_len > 1)
            .then(|| (self.e2e - self.ttft) / (self.output_len - 1) as f64)
    }
}
