//! How closely `run --request-rate R` keeps to its arrival process, against a local `serve`
//! (zero TTFT, one output token):
//!
//! ```sh
//! cargo run --release -p eastwest-bench --example pacing            # 10, 100, 1000 req/s
//! cargo run --release -p eastwest-bench --example pacing -- 100 2000 # one rate, N requests
//! ```
//!
//! Per rate: the achieved rate and mean gap between sends against the schedule's own (the
//! pacing error `run` is responsible for) and against 1/R (adds the sampling noise of N
//! exponential draws), the gap quantiles against the exponential's, and the
//! Kolmogorov–Smirnov distance of the sent gaps from Exp(R) with its 5 % critical value.

use std::time::Duration;

use eastwest_bench::run::{run_benchmark, ConnectionMode, RunConfig};
use eastwest_bench::serve::{ModelServer, ServeConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan: Vec<(f64, usize)> = match args.as_slice() {
        [rate, n] => vec![(rate.parse()?, n.parse()?)],
        [] => vec![(10.0, 300), (100.0, 2000), (1000.0, 10000)],
        _ => anyhow::bail!("usage: pacing [RATE N]"),
    };
    let server = ModelServer::start(
        "127.0.0.1:0".parse()?,
        ServeConfig {
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            max_running: 4096,
            ..ServeConfig::default()
        },
    )
    .await?;
    println!(
        "{:>6} {:>6} | {:>9} {:>9} {:>8} | {:>9} {:>8} {:>8} | {:>23} {:>23} | {:>7} {:>7} | {:>9} {:>9}",
        "rate", "n", "achieved", "scheduled", "err", "mean gap", "vs sched", "vs 1/R",
        "gap p10/p50/p90 ms", "Exp(R) p10/p50/p90", "KS D", "D 5%", "late p50", "late p99"
    );
    for (rate, n) in plan {
        let mut cfg = RunConfig::new(format!("http://{}", server.local_addr()));
        cfg.num_prompts = n;
        cfg.request_rate = rate;
        cfg.random_input_len = 4;
        cfg.random_output_len = 1;
        cfg.warmup_requests = 0;
        // Reused connections: this measures when requests leave, not connection setup.
        cfg.connection = ConnectionMode::Keepalive;
        let result = run_benchmark(&cfg, None).await?;
        if result.metrics.failed > 0 {
            eprintln!(
                "{} failed: {:?}",
                result.metrics.failed, result.first_errors
            );
        }
        let sent: Vec<f64> = result.records.iter().map(|r| r.arrival).collect();
        let due: Vec<f64> = result
            .records
            .iter()
            .map(|r| r.scheduled.unwrap_or_default())
            .collect();
        let gaps: Vec<f64> = sent.windows(2).map(|w| w[1] - w[0]).collect();
        let span_sent = sent[n - 1] - sent[0];
        let span_due = due[n - 1] - due[0];
        let achieved = (n - 1) as f64 / span_sent;
        let intended = (n - 1) as f64 / span_due;
        let mean_gap = span_sent / (n - 1) as f64;
        let mean_due_gap = span_due / (n - 1) as f64;
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize] * 1e3;
        let eq = |p: f64| -(1.0 - p).ln() / rate * 1e3;
        // KS distance of the empirical gap distribution from Exp(rate).
        let m = sorted.len() as f64;
        let d = sorted
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                let f = 1.0 - (-rate * g).exp();
                (f - i as f64 / m).abs().max(((i + 1) as f64 / m - f).abs())
            })
            .fold(0.0, f64::max);
        let mut late: Vec<f64> = sent.iter().zip(&due).map(|(s, d)| (s - d) * 1e3).collect();
        late.sort_by(f64::total_cmp);
        let lq = |p: f64| late[((late.len() - 1) as f64 * p).round() as usize];
        println!(
            "{rate:>6} {n:>6} | {achieved:>9.2} {intended:>9.2} {:>+7.2}% | {:>7.3}ms {:>+7.2}% {:>+7.2}% | {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} | {d:>7.4} {:>7.4} | {:>7.3}ms {:>7.3}ms",
            (achieved / intended - 1.0) * 100.0,
            mean_gap * 1e3,
            (mean_gap / mean_due_gap - 1.0) * 100.0,
            (mean_gap * rate - 1.0) * 100.0,
            q(0.1), q(0.5), q(0.9), eq(0.1), eq(0.5), eq(0.9),
            1.36 / m.sqrt(),
            lq(0.5), lq(0.99),
        );
    }
    server.shutdown().await;
    Ok(())
}
