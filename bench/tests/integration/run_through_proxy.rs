//! Through eastwest-proxy the number of SSE events received equals the number sent: the
//! gateway relays bytes as they come and never merges tokens (TCP may still coalesce bytes
//! of two events into one read; the client counts SSE events, not reads).

use std::time::Duration;

use eastwest_bench::demo::topology::{
    Topology, TopologyOptions, GATEWAY_SNI, SERVICE_HOST, SERVICE_PORT,
};
use eastwest_bench::run::{run_benchmark, ConnectionMode, RunConfig};

#[tokio::test]
async fn every_sse_event_sent_arrives_through_the_gateway() {
    const N: usize = 8;
    const M: usize = 24;
    // The demo's ash side: mTLS model server behind the AUTO_PASSTHROUGH gateway. The
    // client dials the gateway directly; the WAN link is not under test here.
    let topo = Topology::start(&TopologyOptions {
        rtt: Duration::ZERO,
        ttft: Duration::from_millis(2),
        itl: Duration::from_millis(1),
    })
    .await
    .unwrap();

    let mut run = RunConfig::new(format!("https://{SERVICE_HOST}:{SERVICE_PORT}"));
    run.model = Some("demo-model".into());
    run.num_prompts = N;
    run.random_input_len = 16;
    run.random_output_len = M;
    run.random_range_ratio = 1.0;
    run.max_concurrency = Some(4);
    run.warmup_requests = 0;
    run.connection = ConnectionMode::New;
    run.tls = Some(topo.client_tls.clone());
    run.sni = Some(GATEWAY_SNI.into());
    run.connect_to = Some(topo.gateway_addr.to_string());

    let result = run_benchmark(&run, None).await.unwrap();
    assert_eq!(result.metrics.completed, N, "{:?}", result.first_errors);
    let content: usize = result.records.iter().map(|r| r.content_chunks).sum();
    assert_eq!(content, N * M, "content events received");
    for r in &result.records {
        assert_eq!(r.itl.len(), M - 1, "one ITL per gap between tokens");
    }
    let received: u64 = result.records.iter().map(|r| r.sse_events).sum();
    let sent = topo.server.stats().chunks;
    assert_eq!(received, sent, "SSE events received == sent by the server");
    assert!(sent >= (N * M) as u64);

    topo.shutdown().await;
}
