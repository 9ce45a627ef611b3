//! Through eastwest-proxy the number of SSE events received equals the number sent: the
//! gateway relays bytes as they come and never merges tokens (TCP may still coalesce bytes
//! of two events into one read; the client counts SSE events, not reads).

use std::time::Duration;

use eastwest_bench::run::{run_benchmark, ConnectionMode, RunConfig, TlsClient};
use eastwest_bench::serve::{ModelServer, ServeConfig};
use eastwest_certs::{Mesh, PeerPolicy, SpiffeId};
use eastwest_routes::{
    Endpoint, ListenerConfig, ListenerMode, ProxyConfig, RouteTable, Service, ServicePort,
};

#[tokio::test]
async fn every_sse_event_sent_arrives_through_the_gateway() {
    const N: usize = 8;
    const M: usize = 24;
    let mesh = Mesh::generate("cluster.local", &["fra", "ash"]).unwrap();
    let server_id = SpiffeId::workload("cluster.local", "demo", "sglang");
    let client_id = SpiffeId::workload("cluster.local", "demo", "open-webui");
    let server_tls = mesh
        .workload("ash", &server_id)
        .unwrap()
        .server_config(PeerPolicy::Exact(vec![client_id.clone()]))
        .unwrap();
    let client_tls = mesh
        .workload("fra", &client_id)
        .unwrap()
        .client_config(PeerPolicy::Exact(vec![server_id]))
        .unwrap();

    let server = ModelServer::start(
        "127.0.0.1:0".parse().unwrap(),
        ServeConfig {
            ttft: Duration::from_millis(2),
            itl: Duration::from_millis(1),
            tls: Some(server_tls),
            ..ServeConfig::default()
        },
    )
    .await
    .unwrap();

    let loopback = "127.0.0.1:0".parse().unwrap();
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        "tls",
        loopback,
        ListenerMode::AutoPassthrough,
    )]);
    cfg.admin.address = loopback;
    cfg.routes = RouteTable {
        services: vec![Service {
            hostname: "sglang.demo.svc.cluster.local".into(),
            subsets: vec![],
            ports: vec![ServicePort {
                port: 8000,
                name: None,
                endpoints: vec![Endpoint {
                    address: server.local_addr(),
                    labels: Default::default(),
                }],
            }],
        }],
        ..Default::default()
    };
    let proxy = eastwest_proxy::Proxy::start(cfg).await.unwrap();
    let gateway = proxy.listener_addr("tls").unwrap();

    let mut run = RunConfig::new("https://sglang.demo.svc.cluster.local:8000");
    run.model = Some("demo-model".into());
    run.num_prompts = N;
    run.random_input_len = 16;
    run.random_output_len = M;
    run.random_range_ratio = 1.0;
    run.max_concurrency = Some(4);
    run.warmup_requests = 0;
    run.connection = ConnectionMode::New;
    run.tls = Some(TlsClient { config: client_tls });
    run.sni = Some("outbound_.8000_._.sglang.demo.svc.cluster.local".into());
    run.connect_to = Some(gateway.to_string());

    let result = run_benchmark(&run, None).await.unwrap();
    assert_eq!(result.metrics.completed, N, "{:?}", result.first_errors);
    let content: usize = result.records.iter().map(|r| r.content_chunks).sum();
    assert_eq!(content, N * M, "content events received");
    for r in &result.records {
        assert_eq!(r.itl.len(), M - 1, "one ITL per gap between tokens");
    }
    let received: u64 = result.records.iter().map(|r| r.sse_events).sum();
    let sent = server.stats().chunks;
    assert_eq!(received, sent, "SSE events received == sent by the server");
    assert!(sent >= (N * M) as u64);

    proxy.shutdown().await;
    server.shutdown().await;
}
