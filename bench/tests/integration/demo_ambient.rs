//! The demo's ambient scenarios in-process: a fra app through the source ztunnel, double
//! HBONE over the WAN link through the gateway's `hbone` listener, the destination ztunnel,
//! to the ambient model server. Every SSE event arrives as its own event, and no first
//! token arrives before the WAN round trips the tunnel needs (the link is never early, so
//! that lower bound is deterministic; there is no upper bound here).

use std::time::Duration;

use eastwest_bench::demo::ambient::{run_ambient, SCENARIOS};
use eastwest_bench::demo::topology::{Topology, TopologyOptions};
use eastwest_bench::run::RunConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_double_hbone_streams_every_event_after_the_tunnels_round_trips() {
    const N: usize = 6;
    const M: usize = 12;
    let rtt = Duration::from_millis(20);
    let topo = Topology::start(&TopologyOptions {
        rtt,
        ttft: Duration::from_millis(2),
        itl: Duration::from_millis(1),
    })
    .await
    .unwrap();

    for sc in &SCENARIOS {
        let sent_before = topo.ambient.server.stats().chunks;
        let mut run = RunConfig::new("http://set-by-run-ambient");
        run.model = Some("demo-model".into());
        run.num_prompts = N;
        run.random_input_len = 16;
        run.random_output_len = M;
        run.random_range_ratio = 1.0;
        run.max_concurrency = Some(3);
        run.warmup_requests = 0;
        let result = run_ambient(&topo, sc.outer, &mut run, None).await.unwrap();

        assert_eq!(
            result.metrics.completed, N,
            "{}: {:?}",
            sc.name, result.first_errors
        );
        let content: usize = result.records.iter().map(|r| r.content_chunks).sum();
        assert_eq!(content, N * M, "{}: content events received", sc.name);
        let received: u64 = result.records.iter().map(|r| r.sse_events).sum();
        let sent = topo.ambient.server.stats().chunks - sent_before;
        assert_eq!(received, sent, "{}: SSE events received == sent", sc.name);
        for r in &result.records {
            assert_eq!(r.itl.len(), M - 1, "{}: one ITL per gap", sc.name);
            let floor = rtt.as_secs_f64() * f64::from(sc.round_trips);
            assert!(
                r.ttft >= floor,
                "{}: TTFT {:.1} ms < {} RTT ({:.0} ms)",
                sc.name,
                r.ttft * 1e3,
                sc.round_trips,
                floor * 1e3
            );
        }
    }
    topo.shutdown().await;
}
