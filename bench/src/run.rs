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
mod flags;
mod metrics;
mod numpy_random;
mod progress;
mod record;
mod request;
mod result;
mod server_queries;
pub mod sse;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::SeedableRng;

pub use config::{
    Backend, ConnectionMode, Dataset, Goodput, RunConfig, TlsClient, TlsFiles, TlsFlags,
};
pub use dataset::Prompt;
pub use flags::{Args, RunFlags};
pub use metrics::{mean, percentile, std_dev, Metrics, SloMap};
pub use progress::ProgressSink;
pub use record::{Failure, RequestRecord};
pub use result::BenchResult;

use client::Target;
use server_queries::{fetch_model, get, wait_until_ready};

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
