//! `eastwest-bench demo`: the seed's two-region path on this machine, measured.
//!
//! Open WebUI in "fra" calls sglang in "ash": client (fra workload cert) → WAN link (RTT)
//! → ash east-west gateway (eastwest-proxy, AUTO_PASSTHROUGH on the Istio SNI) → model
//! server (mTLS, SPIFFE). Three scenarios run one after the other against the same server:
//! direct in-region, cross-region over kept-alive connections, cross-region with a new
//! TCP+TLS connection per request; then Istio ambient's double HBONE through the same
//! gateway's `hbone` listener, with a warm and a cold outer connection ([`ambient`]).
//! Prints one comparison table, writes results.json and TTFT/ITL CDF plots (SVG) to `--out`.

pub mod ambient;
mod gateway_timing;
mod report;
mod svg;
pub mod topology;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::ambient::OuterConnection;
use crate::run::{run_benchmark, Backend, ConnectionMode, ProgressSink, RunConfig};
use report::ScenarioResult;
use topology::{Topology, TopologyOptions, GATEWAY_SNI, SERVICE_HOST, SERVICE_PORT};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Directory for results.json and the SVG plots.
    #[arg(long, default_value = "./demo-out")]
    pub out: PathBuf,
    /// A few short requests per scenario (CI): finishes in seconds.
    #[arg(long)]
    pub quick: bool,
    /// Round-trip time of the fra<->ash WAN link, e.g. 90ms; a bare number is milliseconds.
    #[arg(long, alias = "rtt-ms", default_value = "90ms", value_parser = eastwest_cli::duration_or_millis)]
    pub rtt: Duration,
    /// Requests per scenario [default: 80, --quick: 8].
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Output tokens per request [default: 64, --quick: 8].
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Requests in flight per scenario.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// The model server's time to first token, e.g. 20ms.
    #[arg(long, alias = "ttft-ms", default_value = "20ms", value_parser = eastwest_cli::duration_or_millis)]
    pub ttft: Duration,
    /// The model server's inter-token latency, e.g. 7ms.
    #[arg(long, alias = "itl-ms", default_value = "7ms", value_parser = eastwest_cli::duration_or_millis)]
    pub itl: Duration,
    /// No progress bars.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Where the gateway serves /metrics (Istio's 15020), e.g. 127.0.0.1:15020, so a
    /// Prometheus can be pointed at it before the demo starts [default: a free loopback port].
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// After the report, keep the gateway and its /metrics up this long (or until SIGINT or
    /// SIGTERM), so Prometheus takes a last scrape, e.g. 60s.
    #[arg(long, default_value = "0s", value_parser = eastwest_cli::duration_or_millis)]
    pub linger: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Serialize)]
struct Results<'a> {
    /// Which build ran, and when: results from different commits must not be mixed up.
    eastwest: serde_json::Value,
    options: serde_json::Value,
    topology: serde_json::Value,
    scenarios: &'a [ScenarioResult],
    checks: serde_json::Value,
    gateway_counters: std::collections::BTreeMap<String, f64>,
}

struct Scenario {
    name: &'static str,
    description: &'static str,
    cross_region: bool,
    connection: ConnectionMode,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "direct (in-region)",
        description: "fra client -> model server, mTLS, kept-alive connections, no WAN",
        cross_region: false,
        connection: ConnectionMode::Keepalive,
    },
    Scenario {
        name: "cross-region keepalive",
        description: "fra client -> WAN -> ash east-west gateway -> model server, kept-alive mTLS connections",
        cross_region: true,
        connection: ConnectionMode::Keepalive,
    },
    Scenario {
        name: "cross-region cold",
        description: "fra client -> WAN -> ash east-west gateway -> model server, new TCP+TLS connection per request",
        cross_region: true,
        connection: ConnectionMode::New,
    },
];

pub async fn main(args: Args) -> anyhow::Result<()> {
    let num_prompts = args.num_prompts.unwrap_or(if args.quick { 8 } else { 80 });
    let output_len = args.output_len.unwrap_or(if args.quick { 8 } else { 64 });
    anyhow::ensure!(num_prompts > 0, "--num-prompts must be at least 1");
    anyhow::ensure!(output_len > 1, "--output-len must be at least 2");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let opts = TopologyOptions {
        rtt: args.rtt,
        ttft: args.ttft,
        itl: args.itl,
    };
    let started_at = std::time::SystemTime::now();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let started = Instant::now();

    gateway_timing::install();
    let metrics_address = args
        .metrics_address
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let topo = Topology::start_with_metrics_at(&opts, metrics_address).await?;
    println!("eastwest demo: Open WebUI in fra -> sglang in ash, all on 127.0.0.1");
    println!(
        "  model server (ash)   {}  {}  ttft {} ms, itl {} ms",
        topo.server_addr,
        topo.server_id,
        ms(args.ttft),
        ms(args.itl)
    );
    println!(
        "  east-west gateway    {}  AUTO_PASSTHROUGH, metrics {}",
        topo.gateway_addr, topo.metrics_addr
    );
    println!(
        "  WAN link fra->ash    {}  RTT {} ms",
        topo.wan_addr,
        ms(args.rtt)
    );
    println!(
        "  client (fra)         {}  SNI {GATEWAY_SNI}",
        topo.client_id
    );
    ambient::print_topology(&topo.ambient);
    println!(
        "  workload: {num_prompts} requests/scenario, {} in flight, {} prompt tokens, {output_len} output tokens\n",
        args.concurrency, args.input_len
    );

    // The topology takes the server's and the link's defaults for what the demo does not set.
    let server = crate::serve::ServeConfig::default();
    let wan = crate::wan::WanOptions::default();
    let topo_json = serde_json::json!({
        "server": {
            "address": topo.server_addr, "spiffe_id": topo.server_id.to_string(), "cluster": "ash",
            "ttft_ms": ms(args.ttft), "itl_ms": ms(args.itl), "ttft_jitter_ms": ms(server.ttft_jitter),
            "tokens_per_chunk": server.tokens_per_chunk, "max_running": server.max_running,
            "seed": server.seed,
        },
        "client": {"spiffe_id": topo.client_id.to_string(), "cluster": "fra"},
        "gateway": {"address": topo.gateway_addr, "metrics": topo.metrics_addr, "mode": "AUTO_PASSTHROUGH"},
        "ambient": {
            "gateway_hbone": topo.ambient.gateway_hbone_addr, "gateway_spiffe_id": ambient::gateway_id().to_string(),
            "wan": topo.ambient.wan_addr, "destination_ztunnel": topo.ambient.ztunnel_addr,
            "server": topo.ambient.server_addr,
        },
        "wan": {
            "address": topo.wan_addr, "rtt_ms": ms(args.rtt), "jitter_ms": ms(wan.jitter),
            "bandwidth_bytes_per_sec": wan.bandwidth_bytes_per_sec,
        },
        "service": format!("{SERVICE_HOST}:{SERVICE_PORT}"),
        "gateway_sni": GATEWAY_SNI,
    });
    let outcome = run_scenarios(&args, &topo, num_prompts, output_len).await;
    let gateway_text = report::fetch_metrics(topo.metrics_addr).await;
    // The ambient pod's server streams too: every event sent is counted.
    let server_chunks = topo.server.stats().chunks + topo.ambient.server.stats().chunks;
    let (scenarios, warmup_events) = match outcome {
        Ok(outcome) => outcome,
        Err(err) => {
            topo.shutdown().await;
            return Err(err);
        }
    };
    let reported = report_and_write(
        &args,
        &scenarios,
        warmup_events,
        server_chunks,
        gateway_text,
        topo_json,
        (num_prompts, output_len),
        (started_at, started),
    );
    if reported.is_ok() && !args.linger.is_zero() {
        linger(topo.metrics_addr, args.linger).await;
    }
    topo.shutdown().await;
    reported
}

/// Keeps the caller's gateway up for `linger` or until SIGINT/SIGTERM: a Prometheus scraping
/// it gets the final counters (the demo's scrape interval may be longer than its last step).
async fn linger(metrics: std::net::SocketAddr, linger: Duration) {
    println!(
        "Gateway /metrics stays up at http://{metrics}/metrics for {} s (SIGINT or SIGTERM ends it)",
        linger.as_secs_f64()
    );
    let stop = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    let _ = tokio::time::timeout(linger, stop).await;
}

/// Prints the comparison, the sanity checks and the gateway counters; writes results.json
/// (whole, by rename: a script may be waiting for it) and the plots.
#[allow(clippy::too_many_arguments)]
fn report_and_write(
    args: &Args,
    scenarios: &[ScenarioResult],
    warmup_events: u64,
    server_chunks: u64,
    gateway_text: anyhow::Result<String>,
    topo_json: serde_json::Value,
    (num_prompts, output_len): (usize, usize),
    (started_at, started): (std::time::SystemTime, Instant),
) -> anyhow::Result<()> {
    println!("\n{}", report::comparison_table(scenarios));
    let rtt = ms(args.rtt);
    let ttft = |i: usize| scenarios[i].metrics.mean_ttft_ms;
    let keep_delta = ttft(1) - ttft(0);
    let cold_delta = ttft(2) - ttft(0);
    println!("Sanity checks (RTT {rtt} ms):");
    println!(
        "  cross-region keepalive TTFT - direct = {keep_delta:>7.1} ms = {} (expected ~1: the request's round trip)",
        in_rtts(keep_delta, rtt)
    );
    println!(
        "  cross-region cold TTFT - direct      = {cold_delta:>7.1} ms = {} (expected ~3: TCP + TLS 1.3 + request)",
        in_rtts(cold_delta, rtt)
    );
    let ambient_checks = ambient::print_checks(scenarios, rtt);
    let itls: Vec<String> = scenarios
        .iter()
        .map(|s| format!("{:.2}", s.metrics.mean_itl_ms))
        .collect();
    println!(
        "  mean ITL per scenario                = {} ms (server ITL {} ms: the gateway must not delay or bunch tokens)",
        itls.join(" / "),
        ms(args.itl)
    );
    let client_events: u64 = scenarios.iter().map(|s| s.sse_events).sum::<u64>() + warmup_events;
    println!(
        "  SSE events sent by server / received = {server_chunks} / {client_events}{}",
        if server_chunks == client_events {
            " (every event arrived as its own event)"
        } else {
            " (MISMATCH)"
        }
    );

    let counters = match &gateway_text {
        Ok(text) => report::gateway_counters(text),
        Err(e) => {
            println!("  gateway /metrics unavailable: {e:#}");
            Default::default()
        }
    };
    if !counters.is_empty() {
        println!("\nGateway counters (/metrics):");
        for (k, v) in &counters {
            println!("  {k:<60} {v:>12.0}");
        }
    }

    let plots = report::write_plots(&args.out, scenarios)?;
    let results = Results {
        eastwest: serde_json::json!({
            "version": eastwest_cli::PKG_VERSION,
            "commit": eastwest_cli::GIT_COMMIT,
            "started_at": humantime::format_rfc3339_seconds(started_at).to_string(),
            "command": std::env::args().collect::<Vec<_>>(),
        }),
        // Every setting the run used, defaults included (`num_prompts`/`output_len` resolved).
        options: serde_json::json!({
            "rtt_ms": ms(args.rtt), "ttft_ms": ms(args.ttft), "itl_ms": ms(args.itl),
            "num_prompts": num_prompts, "input_len": args.input_len, "output_len": output_len,
            "concurrency": args.concurrency, "quick": args.quick,
            "out": args.out, "disable_tqdm": args.disable_tqdm,
            "metrics_address": args.metrics_address, "linger_s": args.linger.as_secs_f64(),
        }),
        topology: topo_json,
        scenarios,
        checks: serde_json::json!({
            "keepalive_ttft_delta_ms": keep_delta,
            "keepalive_ttft_delta_rtts": keep_delta / rtt.max(1e-9),
            "cold_ttft_delta_ms": cold_delta,
            "cold_ttft_delta_rtts": cold_delta / rtt.max(1e-9),
            "ambient": ambient_checks,
            "server_sse_events": server_chunks,
            "client_sse_events": client_events,
        }),
        gateway_counters: counters,
    };
    let json_path = args.out.join("results.json");
    let partial = args.out.join("results.json.partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &json_path)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "\nWrote {} and {} in {:.1} s",
        json_path.display(),
        plots.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the scenarios in order; returns their results and the warmup SSE events.
async fn run_scenarios(
    args: &Args,
    topo: &Topology,
    num_prompts: usize,
    output_len: usize,
) -> anyhow::Result<(Vec<ScenarioResult>, u64)> {
    let bars = if args.disable_tqdm {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        indicatif::MultiProgress::new()
    };
    let progress = |name: &'static str| {
        let bar = bars.add(indicatif::ProgressBar::new(num_prompts as u64));
        ProgressSink::from_bar(bar, name)
    };
    // Above the progress bars while they draw; plain lines when they are hidden.
    let print_line = |line: &str| -> anyhow::Result<()> {
        if bars.is_hidden() {
            println!("{line}");
        } else {
            bars.println(line)?;
        }
        Ok(())
    };
    let mut results = Vec::new();
    let mut warmup_events = 0;
    for sc in &SCENARIOS {
        let mut cfg = load_config(args, num_prompts, output_len);
        cfg.base_url = format!("https://{SERVICE_HOST}:{SERVICE_PORT}");
        cfg.connection = sc.connection;
        // Keepalive: warm one connection per in-flight slot so no measured request dials.
        cfg.warmup_requests = match sc.connection {
            ConnectionMode::Keepalive => args.concurrency,
            ConnectionMode::New => 1,
        };
        cfg.tls = Some(topo.client_tls.clone());
        if sc.cross_region {
            cfg.connect_to = Some(topo.wan_addr.to_string());
            cfg.sni = Some(GATEWAY_SNI.into());
        } else {
            cfg.connect_to = Some(topo.server_addr.to_string());
            cfg.sni = Some(SERVICE_HOST.into());
        }
        let started = report::unix_now();
        let result = run_benchmark(&cfg, Some(&progress(sc.name)))
            .await
            .with_context(|| format!("scenario {}", sc.name))?;
        let finished = report::unix_now();
        let path = serde_json::json!({"cross_region": sc.cross_region});
        let m = &result.metrics;
        if let Some(line) =
            gateway_timing::take_line(m.median_ttft_ms, m.median_itl_ms, ms(args.rtt))
        {
            print_line(&format!("{}: {line}", sc.name))?;
        }
        results.push(
            scenario_result(sc.name, sc.description, path, &cfg, &result).during(started, finished),
        );
        warmup_events += result.warmup_sse_events;
    }
    for sc in &ambient::SCENARIOS {
        let mut cfg = load_config(args, num_prompts, output_len);
        // The pooled outer connection is open before the run; warming one request per
        // in-flight slot also leaves the ztunnels' TLS session caches as in steady state.
        cfg.warmup_requests = match sc.outer {
            OuterConnection::Pooled => args.concurrency,
            OuterConnection::PerConnection => 1,
        };
        let started = report::unix_now();
        let result = ambient::run_ambient(topo, sc.outer, &mut cfg, Some(&progress(sc.name)))
            .await
            .with_context(|| format!("scenario {}", sc.name))?;
        let finished = report::unix_now();
        let path = serde_json::json!({
            "cross_region": true,
            "ambient_outer_connection": format!("{:?}", sc.outer).to_lowercase(),
        });
        results.push(
            scenario_result(sc.name, sc.description, path, &cfg, &result).during(started, finished),
        );
        warmup_events += result.warmup_sse_events;
    }
    Ok((results, warmup_events))
}

/// The load every scenario runs; the scenario sets the target and connection handling.
fn load_config(args: &Args, num_prompts: usize, output_len: usize) -> RunConfig {
    let mut cfg = RunConfig::new(format!("https://{SERVICE_HOST}:{SERVICE_PORT}"));
    cfg.backend = Backend::SglangOaiChat;
    cfg.model = Some("demo-model".into());
    cfg.num_prompts = num_prompts;
    cfg.max_concurrency = Some(args.concurrency);
    cfg.random_input_len = args.input_len;
    cfg.random_output_len = output_len;
    cfg.random_range_ratio = 1.0;
    cfg
}

/// A scenario's results.json entry; reports failed requests on stderr.
fn scenario_result(
    name: &str,
    description: &str,
    path: serde_json::Value,
    cfg: &RunConfig,
    result: &crate::run::BenchResult,
) -> ScenarioResult {
    if result.metrics.failed > 0 {
        eprintln!(
            "{name}: {} of {} requests failed: {:?}",
            result.metrics.failed, cfg.num_prompts, result.first_errors
        );
    }
    let mut settings = serde_json::json!({
        "connection": format!("{:?}", cfg.connection).to_lowercase(),
        "backend": format!("{:?}", cfg.backend),
        "num_prompts": cfg.num_prompts,
        "max_concurrency": cfg.max_concurrency,
        "request_rate": cfg.request_rate.to_string(),
        "random_input_len": cfg.random_input_len,
        "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio,
        "warmup_requests": cfg.warmup_requests,
        "seed": cfg.seed,
        "sni": cfg.sni,
        "connect_to": cfg.connect_to,
        "request_timeout_s": cfg.request_timeout.as_secs_f64(),
    });
    if let (Some(settings), serde_json::Value::Object(path)) = (settings.as_object_mut(), path) {
        settings.extend(path);
    }
    ScenarioResult::new(name, description, settings, result)
}

/// `ms` as a count of round trips; with `--rtt 0` there is no round trip to count in.
pub(crate) fn in_rtts(ms: f64, rtt_ms: f64) -> String {
    if rtt_ms > 0.0 {
        format!("{:.2} RTT", ms / rtt_ms)
    } else {
        "n/a RTT (no WAN delay)".to_string()
    }
}
