//! `eastwest-bench run`: a streaming load generator with sglang `bench_serving`'s flags,
//! metric definitions, console table and JSONL fields, so its numbers compare directly.
//!
//! TTFT runs until the first non-empty content delta, ITL are the gaps between content
//! chunks, TPOT = (E2E − TTFT) / (output tokens − 1); every SSE event is timestamped when
//! the body frame completing it arrives (hyper 1, HTTP/1.1, no buffering).

mod arrivals;
mod client;
mod compat;
mod config;
mod dataset;
mod metrics;
mod numpy_random;
mod record;
mod request;
pub mod sse;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;
use rand::SeedableRng;
use serde::Serialize;

pub use config::{
    Backend, ConnectionMode, Dataset, Goodput, RunConfig, TlsClient, TlsFiles, TlsFlags,
};
pub use dataset::Prompt;
pub use metrics::{mean, percentile, std_dev, Metrics, SloMap};
pub use record::{Failure, RequestRecord};

use client::Target;

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

/// Progress reporting for [`run_benchmark`]: a tqdm-like bar on stderr, hidden when stderr
/// is not a terminal.
#[derive(Clone)]
pub struct ProgressSink {
    bar: indicatif::ProgressBar,
}

impl ProgressSink {
    /// A bar on stderr (drawn only on a TTY).
    pub fn stderr(label: &str) -> ProgressSink {
        ProgressSink::from_bar(indicatif::ProgressBar::new(0), label)
    }

    /// Wraps an existing bar, e.g. one inside an `indicatif::MultiProgress`.
    pub fn from_bar(bar: indicatif::ProgressBar, label: &str) -> ProgressSink {
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>24} {percent:>3}%|{bar:40}| {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("█▉▊▋▌▍▎▏ ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        ProgressSink { bar }
    }

    fn start(&self, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(0);
        self.bar.reset_elapsed();
    }

    fn inc(&self, failed: bool) {
        self.bar.inc(1);
        if failed {
            self.bar.set_message("(failures)");
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

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

/// Runs the benchmark `cfg` describes. Request failures are recorded, never returned as
/// errors; `Err` only for a configuration that cannot run at all.
pub async fn run_benchmark(
    cfg: &RunConfig,
    progress: Option<&ProgressSink>,
) -> anyhow::Result<BenchResult> {
    cfg.validate()?;
    let target = Target::resolve(cfg).await?;
    if !cfg.ready_check_timeout.is_zero() {
        wait_until_ready(&target, &cfg.base_url, cfg.ready_check_timeout, cfg.console).await?;
    }
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => fetch_model(&target).await.unwrap_or_else(|e| {
            tracing::warn!("no --model and GET /v1/models failed ({e:#}); using \"default\"");
            "default".to_string()
        }),
    };
    // One numpy stream for lengths then arrivals, in bench_serving's order.
    let mut np = numpy_random::RandomState::seed(cfg.numpy_seed()?);
    let mut words = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let prompts = dataset::sample(
        &mut np,
        &mut words,
        cfg.dataset,
        cfg.tokenizer.as_deref(),
        cfg.num_prompts,
        cfg.random_input_len,
        cfg.random_output_len,
        cfg.random_range_ratio,
    )?;
    if cfg.console {
        // As sample_random_requests prints them.
        println!(
            "#Input tokens: {}",
            prompts.iter().map(|p| p.input_len).sum::<usize>()
        );
        println!(
            "#Output tokens: {}",
            prompts.iter().map(|p| p.output_len).sum::<usize>()
        );
    }

    // Warmup (like bench_serving: the first prompt, at most 32 output tokens, all at once).
    let mut warmup_failed = 0;
    let mut warmup_sse_events = 0;
    if cfg.warmup_requests > 0 {
        if cfg.console {
            println!("Starting warmup with {} sequences...", cfg.warmup_requests);
        }
        let mut warm = prompts[0].clone();
        warm.output_len = warm.output_len.min(32);
        let body = request::request_body(cfg, &model, &warm);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..cfg.warmup_requests {
            let (target, body, warm) = (target.clone(), body.clone(), warm.clone());
            let (backend, timeout) = (cfg.backend, cfg.request_timeout);
            set.spawn(
                async move { request::run_one(&target, backend, body, &warm, timeout).await },
            );
        }
        let mut first_error = None;
        while let Some(r) = set.join_next().await {
            let r = r.context("warmup task")?;
            warmup_sse_events += r.sse_events;
            if let Some(err) = r.error {
                warmup_failed += 1;
                tracing::warn!("warmup request failed: {err}");
                first_error.get_or_insert(err);
            }
        }
        // As bench_serving: a benchmark whose every warmup request failed cannot succeed.
        if let (true, Some(err)) = (warmup_failed == cfg.warmup_requests, first_error) {
            anyhow::bail!(
                "Warmup failed - Please make sure benchmark arguments are correctly specified. Error: {err}"
            );
        }
        if cfg.console {
            println!(
                "Warmup completed with {} sequences. Starting main benchmark run...",
                cfg.warmup_requests
            );
        }
    }

    let bodies: Vec<_> = prompts
        .iter()
        .map(|p| request::request_body(cfg, &model, p))
        .collect();
    let schedule = arrivals::schedule(&mut np, cfg.request_rate, prompts.len());
    let semaphore = cfg
        .max_concurrency
        .map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    if let Some(p) = progress {
        p.start(prompts.len());
    }

    let started = Instant::now();
    let mut alarm = crate::timer::Alarm::new();
    let mut set = tokio::task::JoinSet::new();
    for (i, (prompt, body)) in prompts.iter().cloned().zip(bodies).enumerate() {
        let scheduled = schedule.as_ref().and_then(|s| s.get(i)).copied();
        if let Some(offset) = scheduled {
            alarm
                .sleep_until(tokio::time::Instant::from_std(started + offset))
                .await;
        }
        let arrival = started.elapsed().as_secs_f64();
        let target = target.clone();
        let semaphore = semaphore.clone();
        let progress = progress.cloned();
        let (backend, timeout) = (cfg.backend, cfg.request_timeout);
        set.spawn(async move {
            let _permit = match &semaphore {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            let start = started.elapsed().as_secs_f64();
            let mut record = request::run_one(&target, backend, body, &prompt, timeout).await;
            record.start = start;
            record.scheduled = scheduled.map(|d| d.as_secs_f64());
            record.arrival = arrival;
            if let Some(p) = &progress {
                p.inc(record.error.is_some());
            }
            (i, record)
        });
    }
    let mut records: Vec<Option<RequestRecord>> = vec![None; prompts.len()];
    while let Some(joined) = set.join_next().await {
        let (i, record) = joined.context("request task")?;
        records[i] = Some(record);
    }
    let duration = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.finish();
    }
    let records: Vec<RequestRecord> = records.into_iter().flatten().collect();
    let mut first_errors = BTreeMap::new();
    for r in &records {
        if let Some(f) = &r.error {
            first_errors
                .entry(f.kind.clone())
                .or_insert_with(|| f.detail.clone());
        }
    }
    let mut metrics = metrics::calculate(cfg, &records, duration);
    // As bench_serving: the server's /server_info in the results, null if it has none.
    metrics.server_info = match get(&target, "/server_info", Duration::from_secs(5)).await {
        Ok((status, body)) if status == http::StatusCode::OK => serde_json::from_slice(&body).ok(),
        _ => None,
    };
    Ok(BenchResult {
        model,
        metrics,
        warmup_failed,
        warmup_sse_events,
        first_errors,
        records,
    })
}

/// GET `path` on the target: the status and (up to 1 MiB of) the body.
async fn get(
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
async fn fetch_model(target: &Target) -> anyhow::Result<String> {
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
async fn wait_until_ready(
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

pub async fn main(args: Args) -> anyhow::Result<()> {
    let args = args.flags;
    let cfg = args.to_config()?;
    for warning in args.warnings() {
        eprintln!("eastwest-bench run: warning: {warning}");
    }
    println!("benchmark_args={args:?}");
    let progress = (!args.disable_tqdm).then(|| ProgressSink::stderr("requests"));
    let result = run_benchmark(&cfg, progress.as_ref()).await?;
    print!("{}", result.summary_table(cfg.request_rate));
    if let Some(path) = &args.output_file {
        let line = result.json_line(args.output_details)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--output-file {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    }
    let m = &result.metrics;
    if m.completed == 0 {
        let first = result
            .first_errors
            .iter()
            .next()
            .map(|(kind, detail)| format!(" (first: {kind}: {detail})"))
            .unwrap_or_default();
        anyhow::bail!("all {} requests failed{first}", m.failed);
    }
    Ok(())
}
