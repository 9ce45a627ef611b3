//! `run --request-rate`: requests go out on the arrival process's absolute schedule.
//! Asserts the schedule itself (what was due when, and that nothing left before it was
//! due), not speed; the accuracy figures come from `examples/pacing.rs`.

use std::time::Duration;

use eastwest_bench::run::{run_benchmark, RunConfig};
use eastwest_bench::serve::{ModelServer, ServeConfig};

#[tokio::test]
async fn requests_leave_on_an_absolute_schedule_never_early() {
    let server = ModelServer::start(
        "127.0.0.1:0".parse().unwrap(),
        ServeConfig {
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            ..ServeConfig::default()
        },
    )
    .await
    .unwrap();
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
