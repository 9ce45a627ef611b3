//! `run --request-rate`: requests go out on the arrival process's absolute schedule.
//! Asserts the schedule itself (what was due when, and that nothing left before it was
//! due), not speed; the accuracy figures come from `examples/pacing.rs`.

use std::time::Duration;

use eastwest_bench::run::{run_benchmark, RunConfig};
use eastwest_bench::serve::{ModelServer, ServeConfig};

/// A model server that answers at once: the schedule, not generation, sets the pace.
async fn instant_server() -> ModelServer {
    ModelServer::start(
        "127.0.0.1:0".parse().unwrap(),
        ServeConfig {
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            ..ServeConfig::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn requests_leave_on_an_absolute_schedule_never_early() {
    let server = instant_server().await;
    let mut cfg = RunConfig::new(format!("http://{}", server.local_addr()));
    cfg.num_prompts = 40;
    cfg.request_rate = 400.0;
    cfg.random_input_len = 4;
    cfg.random_output_len = 1;
    cfg.warmup_requests = 0;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.completed, 40, "{:?}", result.first_errors);
    let scheduled: Vec<f64> = result
        .records
        .iter()
        .map(|r| r.scheduled.expect("a finite rate schedules every request"))
        .collect();
    assert_eq!(scheduled[0], 0.0, "the first request goes at once");
    assert!(scheduled.windows(2).all(|w| w[0] <= w[1]), "{scheduled:?}");
    for r in &result.records {
        let due = r.scheduled.unwrap_or_default();
        assert!(r.arrival >= due, "sent at {} before due {}", r.arrival, due);
    }

    // Infinite rate: no schedule, all at once.
    cfg.request_rate = f64::INFINITY;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert!(result.records.iter().all(|r| r.scheduled.is_none()));
    server.shutdown().await;
}

/// With sglang's seed and flags, `run` sends the lengths and keeps the arrival times numpy
/// draws for bench_serving (fixture made by `tests/fixtures/numpy_streams.py`).
#[tokio::test]
async fn same_seed_same_lengths_and_schedule_as_bench_serving() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/numpy_streams.json")).unwrap();
    let w = &fixture["workloads"][0];
    assert_eq!(w["seed"], 42, "sglang's default seed");
    let server = instant_server().await;
    let mut cfg = RunConfig::new(format!("http://{}", server.local_addr()));
    // bench_serving's defaults: --seed 42, --random-range-ratio 0.0.
    assert_eq!((cfg.seed, cfg.random_range_ratio), (42, 0.0));
    cfg.num_prompts = w["num_prompts"].as_u64().unwrap() as usize;
    cfg.random_input_len = w["random_input_len"].as_u64().unwrap() as usize;
    cfg.random_output_len = w["random_output_len"].as_u64().unwrap() as usize;
    cfg.request_rate = w["request_rate"].as_f64().unwrap();
    cfg.warmup_requests = 0;
    let result = run_benchmark(&cfg, None).await.unwrap();
    assert_eq!(result.metrics.failed, 0, "{:?}", result.first_errors);

    let ints = |key: &str| -> Vec<usize> {
        w[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    };
    let sent_in: Vec<usize> = result.records.iter().map(|r| r.prompt_len).collect();
    let sent_out: Vec<usize> = result.records.iter().map(|r| r.output_len).collect();
    assert_eq!(sent_in, ints("input_lens"));
    assert_eq!(
        sent_out,
        ints("output_lens"),
        "max_tokens as drawn, all generated"
    );
    // Request i is due at the sum of the first i intervals (bench_serving sleeps each one).
    let mut due = 0.0;
    for (i, (r, gap)) in result
        .records
        .iter()
        .zip(w["intervals"].as_array().unwrap())
        .enumerate()
    {
        let scheduled = r.scheduled.unwrap();
        assert!(
            (scheduled - due).abs() < 1e-9,
            "request {i}: {scheduled} vs {due}"
        );
        due += gap.as_f64().unwrap();
    }
    server.shutdown().await;
}
