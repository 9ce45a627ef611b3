//! The `run` subcommand's flags (bench_serving's names and defaults) and the [`RunConfig`]
//! they make.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::compat;
use super::config::{Backend, ConnectionMode, Dataset, Goodput, RunConfig, TlsFlags};
use super::tokenizer;

/// The `run` subcommand's flags (boxed: they are many, and the subcommand enum holds them).
#[derive(Debug, clap::Args)]
// A repeated flag takes its last value, as with bench_serving's argparse.
#[command(args_override_self = true)]
pub struct Args {
    #[command(flatten)]
    pub flags: Box<RunFlags>,
}

#[derive(Debug, clap::Args)]
pub struct RunFlags {
    /// Server base URL, e.g. http://127.0.0.1:30000 (overrides --host/--port).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Server host when --base-url is not given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port when --base-url is not given.
    #[arg(long, default_value_t = 30000)]
    pub port: u16,
    /// bench_serving's backend names: *-chat → /v1/chat/completions, the others →
    /// /v1/completions; the JSON output reports the name given.
    #[arg(long, value_enum, default_value = "sglang-oai-chat")]
    pub backend: Backend,
    /// "random" (bench_serving's lengths; prompts of random words) or "random-ids" (prompts
    /// of token ids decoded with --tokenizer, as bench_serving makes them).
    #[arg(long, default_value = "random", value_parser = ["random", "random-ids", "sharegpt"])]
    pub dataset_name: String,
    /// A tokenizer.json, or a directory holding one: retokenizes the output
    /// (total_output_tokens_retokenized), shortens prompts by the special tokens the
    /// tokenizer adds and decodes random-ids prompts, as bench_serving does.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model name; asked from GET /v1/models when not given.
    #[arg(long)]
    pub model: Option<String>,
    /// The model name sent in requests (default: --model), as bench_serving.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A JSON object merged into every request body, over the defaults.
    #[arg(long)]
    pub extra_request_body: Option<String>,
    /// Send "ignore_eos": false.
    #[arg(long)]
    pub disable_ignore_eos: bool,
    /// Sampling temperature for sglang's native backend (OpenAI backends send 0.0 unless
    /// --extra-request-body sets it, as bench_serving does).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// top_p for sglang's native backend (as --temperature).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Extra request headers, KEY=VALUE.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Set)]
    pub header: Vec<String>,
    /// Written as "tag" into the JSON output.
    #[arg(long)]
    pub tag: Option<String>,
    /// Requests to send (after the warmup).
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Requests per second, Poisson arrivals; "inf" sends all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Most requests in flight at once (default: no limit).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Prompt length in tokens (words), at most.
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Output tokens asked for (max_tokens), at most.
    #[arg(long, default_value_t = 1024)]
    pub random_output_len: usize,
    /// Lengths are drawn from [len*ratio, len].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Requests sent and discarded before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup_requests: usize,
    /// Seeds numpy's generator as bench_serving does (0..=4294967295): same seed, same
    /// lengths and arrival times.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Append one JSON line of results to this file.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
    /// Also write per-request ttfts, itls, output_lens and errors into the JSON line.
    #[arg(long)]
    pub output_details: bool,
    /// No progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// SLOs in ms for goodput, e.g. `--goodput ttft:200 tpot:50` (also e2el).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Set)]
    pub goodput: Vec<String>,
    /// new: a TCP(+TLS) connection per request (like bench_serving); keepalive: reuse.
    #[arg(long, value_enum, default_value = "new")]
    pub connection: ConnectionMode,
    /// TLS even with an http:// URL.
    #[arg(long)]
    pub tls: bool,
    #[command(flatten)]
    pub tls_files: TlsFlags,
    /// TLS server name to send, e.g. outbound_.8000_._.sglang.demo.svc.cluster.local.
    #[arg(long)]
    pub sni: Option<String>,
    /// Dial HOST:PORT instead of the URL's host; Host header and SNI are unchanged.
    #[arg(long)]
    pub connect_to: Option<String>,
    /// Wait up to this many seconds for GET /v1/models to answer 200 before starting, as
    /// bench_serving does; 0 skips the check.
    #[arg(long, default_value_t = 60)]
    pub ready_check_timeout_sec: u64,
    /// Give up on one request after this long, e.g. 10m; a bare number is seconds.
    #[arg(long, default_value = "600s", value_parser = eastwest_cli::duration_or_secs)]
    pub request_timeout: Duration,
    #[command(flatten)]
    pub ignored: compat::IgnoredFlags,
}

impl RunFlags {
    /// What the user asked for that cannot apply here, one line each.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.ignored.warnings();
        if !self.backend.is_native() {
            for (given, flag) in [
                (self.temperature.is_some(), "--temperature"),
                (self.top_p.is_some(), "--top-p"),
            ] {
                if given {
                    out.push(format!(
                        "{flag} is ignored with --backend {}: as in bench_serving it applies to the native sglang backend only; \
                         use --extra-request-body '{{\"temperature\": ...}}'",
                        self.backend.name()
                    ));
                }
            }
        }
        out
    }

    pub fn to_config(&self) -> anyhow::Result<RunConfig> {
        let base_url = self
            .base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}:{}", self.host, self.port));
        let mut cfg = RunConfig::new(base_url);
        cfg.backend = self.backend;
        cfg.model = self
            .served_model_name
            .clone()
            .or_else(|| self.model.clone());
        cfg.disable_ignore_eos = self.disable_ignore_eos;
        cfg.temperature = self.temperature.unwrap_or(0.0);
        cfg.top_p = self.top_p.unwrap_or(1.0);
        cfg.tag = self.tag.clone();
        if let Some(extra) = &self.extra_request_body {
            match serde_json::from_str(extra).context("--extra-request-body is not JSON")? {
                serde_json::Value::Object(map) => cfg.extra_request_body = map,
                _ => anyhow::bail!("--extra-request-body must be a JSON object"),
            }
        }
        for h in &self.header {
            // bench_serving's parse_custom_headers: KEY=VALUE, items without both are skipped.
            let Some((k, v)) = h
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            else {
                continue;
            };
            let name = http::HeaderName::try_from(k).with_context(|| format!("--header {h:?}"))?;
            let value =
                http::HeaderValue::try_from(v).with_context(|| format!("--header {h:?}"))?;
            cfg.headers.push((name, value));
        }
        if self.dataset_name == "sharegpt" {
            anyhow::bail!(
                "--dataset-name sharegpt is not supported (it needs the ShareGPT file and a tokenizer); \
                 use --dataset-name random, which draws the same lengths as bench_serving"
            );
        }
        cfg.dataset = if self.dataset_name == "random-ids" {
            Dataset::RandomIds
        } else {
            Dataset::Random
        };
        if let Some(path) = &self.tokenizer {
            cfg.tokenizer = Some(Arc::new(tokenizer::Tokenizer::load(path)?));
        }
        cfg.num_prompts = self.num_prompts;
        cfg.request_rate = self.request_rate;
        cfg.max_concurrency = self.max_concurrency;
        cfg.random_input_len = self.random_input_len;
        cfg.random_output_len = self.random_output_len;
        cfg.random_range_ratio = self.random_range_ratio;
        cfg.warmup_requests = self.warmup_requests;
        cfg.seed = self.seed;
        cfg.connection = self.connection;
        cfg.sni = self.sni.clone();
        cfg.connect_to = self.connect_to.clone();
        cfg.goodput = Goodput::parse(&self.goodput)?;
        if self.request_timeout.is_zero() {
            anyhow::bail!("--request-timeout must be more than zero");
        }
        cfg.request_timeout = self.request_timeout;
        cfg.ready_check_timeout = Duration::from_secs(self.ready_check_timeout_sec);
        cfg.console = true;
        if self.tls || cfg.base_url.starts_with("https://") || self.tls_files.any() {
            cfg.tls = Some(self.tls_files.client()?);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
