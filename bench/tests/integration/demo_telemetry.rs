//! The demo's gateway as Kiali sees it: Istio's `istio_tcp_*` series name ash's
//! `istio-eastwestgateway` as the source and the `sglang` workload in `demo` behind
//! `sglang.demo.svc.cluster.local` as the destination, on 15443 and on 15008 alike.

use std::time::Duration;

use eastwest_bench::ambient::OuterConnection;
use eastwest_bench::demo::ambient::run_ambient;
use eastwest_bench::demo::topology::{
    Topology, TopologyOptions, GATEWAY_SNI, SERVICE_HOST, SERVICE_PORT,
};
use eastwest_bench::run::{run_benchmark, ConnectionMode, RunConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn one_request() -> RunConfig {
    let mut run = RunConfig::new(format!("https://{SERVICE_HOST}:{SERVICE_PORT}"));
    run.model = Some("demo-model".into());
    run.num_prompts = 1;
    run.random_input_len = 16;
    run.random_output_len = 4;
    run.random_range_ratio = 1.0;
    run.warmup_requests = 0;
    run
}

async fn scrape(topo: &Topology) -> String {
    let mut s = tokio::net::TcpStream::connect(topo.metrics_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_series_name_the_gateway_in_ash_and_the_sglang_workload() {
    let topo = Topology::start(&TopologyOptions {
        rtt: Duration::ZERO,
        ttft: Duration::from_millis(2),
        itl: Duration::from_millis(1),
    })
    .await
    .unwrap();
    // 15443: TLS passthrough with the Istio SNI.
    let mut run = one_request();
    run.connection = ConnectionMode::New;
    run.tls = Some(topo.client_tls.clone());
    run.sni = Some(GATEWAY_SNI.into());
    run.connect_to = Some(topo.gateway_addr.to_string());
    let result = run_benchmark(&run, None).await.unwrap();
    assert_eq!(result.metrics.completed, 1, "{:?}", result.first_errors);
    // 15008: double HBONE through the gateway's hbone listener.
    let mut run = one_request();
    let result = run_ambient(&topo, OuterConnection::PerConnection, &mut run, None)
        .await
        .unwrap();
    assert_eq!(result.metrics.completed, 1, "{:?}", result.first_errors);

    let body = scrape(&topo).await;
    let labels = |principal: &str| {
        format!(
            "istio_tcp_sent_bytes_total{{reporter=\"source\",source_workload=\"istio-eastwestgateway\",\
             source_workload_namespace=\"istio-system\",source_principal=\"{principal}\",\
             source_app=\"istio-eastwestgateway\",source_version=\"unknown\",\
             source_canonical_service=\"istio-eastwestgateway\",source_canonical_revision=\"latest\",\
             source_cluster=\"ash\",destination_workload=\"sglang\",\
             destination_workload_namespace=\"demo\",\
             destination_principal=\"spiffe://cluster.local/ns/demo/sa/sglang\",\
             destination_app=\"sglang\",destination_version=\"v1\",\
             destination_canonical_service=\"sglang\",destination_canonical_revision=\"v1\",\
             destination_service=\"sglang.demo.svc.cluster.local\",\
             destination_service_name=\"sglang\",destination_service_namespace=\"demo\",\
             destination_cluster=\"ash\",request_protocol=\"tcp\",response_flags=\"-\",\
             connection_security_policy=\"unknown\"}} "
        )
    };
    // 15443 sees no client certificate; 15008's outer mTLS names the source ztunnel's
    // workload (open-webui's certificate, as ztunnel presents the workload's).
    for principal in ["unknown", "spiffe://cluster.local/ns/demo/sa/open-webui"] {
        let series = labels(principal);
        let bytes: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no series {series}in\n{body}"))
            .trim()
            .parse()
            .unwrap();
        assert!(bytes > 0.0, "{series}{bytes}");
    }
    topo.shutdown().await;
}
