//! Applying a control-plane route table of 10 000 services / 100 000 endpoints in which one
//! endpoint changed: the proxy's share of "EndpointSlice change -> routed" latency. As a whole
//! new table (a resubscription, a file reload) and as a delta from eastwest-control (the
//! steady state: merge into the current table, then apply sharing unchanged services).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use eastwest_proxy::Proxy;
use std::sync::Arc;

use eastwest_routes::{
    Endpoint, ListenerConfig, ListenerMode, ProxyConfig, RouteDelta, RouteTable, Service,
    ServicePort,
};

fn table(version: u64, moved: u16) -> RouteTable {
    let services = (0..10_000u32)
        .map(|s| Arc::new(service(s, moved)))
        .collect();
    RouteTable {
        version,
        services,
        ..Default::default()
    }
}

fn service(s: u32, moved: u16) -> Service {
    Service {
        hostname: format!("svc-{s}.ns-{}.svc.cluster.local", s % 100),
        subsets: vec![],
        ports: vec![ServicePort {
            port: 8080,
            name: Some("http".into()),
            waypoint: Vec::new(),
            endpoints: (0..10u32)
                .map(|e| {
                    let n = s * 10 + e;
                    let port = if s == 0 && e == 0 { moved } else { 8080 };
                    Endpoint {
                        address: SocketAddr::from((
                            [10, (n >> 16) as u8, (n >> 8) as u8, n as u8],
                            port,
                        )),
                        labels: BTreeMap::from([("version".to_string(), format!("v{}", e % 2))]),
                        hbone_port: None,
                        workload: None,
                    }
                })
                .collect(),
        }],
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        "tls",
        "127.0.0.1:0".parse().unwrap(),
        ListenerMode::AutoPassthrough,
    )]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    let proxy = rt.block_on(Proxy::start(cfg)).unwrap();
    proxy.apply_routes(table(1, 8080)).unwrap();
    let mut version = 1;
    let mut group = c.benchmark_group("apply_routes");
    group.sample_size(20);
    group.bench_function("10k_services_100k_endpoints_one_changed", |b| {
        b.iter_batched(
            || {
                version += 1;
                table(version, 8000 + (version % 2) as u16)
            },
            |t| proxy.apply_routes(t).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("10k_services_100k_endpoints_one_changed_by_delta", |b| {
        b.iter_batched(
            || {
                version += 1;
                Arc::new(service(0, 8000 + (version % 2) as u16))
            },
            |changed| {
                // As control_client does per delta line: merge into the current table, apply.
                let current = proxy.routes();
                let delta = RouteDelta {
                    version: current.version + 1,
                    base: current.version,
                    services: vec![changed],
                    ..Default::default()
                };
                let table = delta.apply_to(&current).unwrap();
                proxy.apply_routes(table).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    // The other half of the proxy's share: parsing the table as it arrives from control.
    let line = serde_json::to_vec(&table(1, 8080)).unwrap();
    group.throughput(criterion::Throughput::Bytes(line.len() as u64));
    group.bench_function("parse_json_10k_services_100k_endpoints", |b| {
        b.iter(|| serde_json::from_slice::<RouteTable>(std::hint::black_box(&line)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
