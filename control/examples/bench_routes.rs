//! Benchmark: EndpointSlice change at the API server → route table applied by a real
//! eastwest-proxy, at 10 000 services / 100 000 endpoints across two clusters.
//!
//! `cargo run --release -p eastwest-control --example bench_routes [-- ITERATIONS]`
//!
//! Three processes so memory is measured per component: this one runs the two in-process
//! Kubernetes API servers (fra, ash: 5 000 Services, 5 000 EndpointSlices of 10 endpoints and
//! 50 000 Pods labelled `version=v1` each), a child runs eastwest-control, another child runs eastwest-proxy fed by
//! control_client. Both clusters are in network1, so the proxy's table holds all 100 000
//! endpoints (the heaviest table). Each iteration changes one endpoint of one slice in ash and
//! waits for the proxy process to report the table containing it; changes are spaced beyond the
//! debounce interval, so each measures an isolated change including the debounce logic.
//! control_client subscribes with `&delta=1`: the first table arrives whole (~6 MB), each
//! change as a delta holding only the changed Service, merged into the proxy's current table.

#[path = "../tests/integration/support/apiserver/mod.rs"]
mod apiserver;
use eastwest_proxy::control_client;
#[path = "../tests/integration/support/objects.rs"]
mod objects;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use eastwest_control::{Control, ControlConfig, RemoteCluster};
use objects::{pod, ready, service, slice, Ep};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

const SERVICES_PER_CLUSTER: usize = 5_000;
const ENDPOINTS_PER_SLICE: usize = 10;
const PROBE: &str = "bench-0.bench.svc.cluster.local";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new()?;
    match args.get(1).map(String::as_str) {
        Some("control") => rt.block_on(control_role(&args[2], &args[3])),
        Some("proxy") => rt.block_on(proxy_role(&args[2])),
        other => {
            let iterations = other.and_then(|n| n.parse().ok()).unwrap_or(200);
            rt.block_on(driver(iterations))
        }
    }
}

fn ip(cluster: u8, n: usize) -> String {
    format!("10.{cluster}.{}.{}", n / 256 % 256, n % 256)
}

fn pod_name(i: usize, j: usize) -> String {
    format!("bench-{i}-{j}")
}

fn bench_slice(cluster: u8, i: usize, first_ip: Option<&str>) -> serde_json::Value {
    let ips: Vec<String> = (0..ENDPOINTS_PER_SLICE)
        .map(|j| ip(cluster, i * ENDPOINTS_PER_SLICE + j))
        .collect();
    let pods: Vec<String> = (0..ENDPOINTS_PER_SLICE).map(|j| pod_name(i, j)).collect();
    let mut eps: Vec<Ep> = ips
        .iter()
        .zip(&pods)
        .map(|(a, p)| Ep {
            pod: Some(p),
            ..ready(a)
        })
        .collect();
    if let Some(first) = first_ip {
        eps[0].ip = first;
    }
    let name = format!("bench-{i}");
    slice(
        "bench",
        &format!("{name}-{cluster}"),
        &name,
        &[("http", 8080)],
        &eps,
    )
}

async fn populate(server: &ApiServer, cluster: u8) {
    for i in 0..SERVICES_PER_CLUSTER {
        let name = format!("bench-{i}");
        server.apply("services", service("bench", &name, &[("http", 80)]));
        for j in 0..ENDPOINTS_PER_SLICE {
            let labels = [("app", name.as_str()), ("version", "v1")];
            server.apply("pods", pod("bench", &pod_name(i, j), &labels));
        }
        server.apply("endpointslices", bench_slice(cluster, i, None));
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Lines(tokio::io::Lines<BufReader<ChildStdout>>);

impl Lines {
    async fn expect(&mut self, prefix: &str) -> anyhow::Result<String> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(120), self.0.next_line())
                .await
                .map_err(|_| anyhow::anyhow!("no {prefix} line within 120 s"))??
                .ok_or_else(|| anyhow::anyhow!("child exited before {prefix}"))?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
    }
}

fn spawn(args: &[&str]) -> anyhow::Result<(Child, Lines)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    Ok((child, Lines(BufReader::new(out).lines())))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn driver(iterations: usize) -> anyhow::Result<()> {
    let fra = ApiServer::start_with(Duration::from_secs(1)).await;
    let ash = ApiServer::start_with(Duration::from_secs(1)).await;
    let t = Instant::now();
    populate(&fra, 1).await;
    populate(&ash, 2).await;
    println!(
        "populated 2 API servers: {} services, {} endpoints (and as many Pods) in {:?}",
        2 * SERVICES_PER_CLUSTER,
        2 * SERVICES_PER_CLUSTER * ENDPOINTS_PER_SLICE,
        t.elapsed()
    );
    let dir = tempfile::tempdir()?;
    let (fra_kc, ash_kc) = (dir.path().join("fra.yaml"), dir.path().join("ash.yaml"));
    std::fs::write(&fra_kc, fra.kubeconfig("fra"))?;
    std::fs::write(&ash_kc, ash.kubeconfig("ash"))?;

    let start = Instant::now();
    let (control, mut control_out) = spawn(&[
        "control",
        fra_kc.to_str().unwrap_or_default(),
        ash_kc.to_str().unwrap_or_default(),
    ])?;
    let routes = control_out.expect("ROUTES").await?;
    let synced_ms = control_out.expect("SYNCED").await?;
    let (proxy, mut proxy_out) = spawn(&["proxy", &routes])?;
    let first = proxy_out.expect("APPLIED").await?;
    let first_applied = start.elapsed();
    println!("initial sync: control synced both clusters in {synced_ms} ms; first full table applied by the proxy {first_applied:?} after control started ({first})");

    let mut latencies = Vec::with_capacity(iterations);
    let mut applies = Vec::with_capacity(iterations);
    for k in 0..iterations {
        // Spaced beyond the 100 ms debounce so each change is measured on its own.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let marker = format!("10.255.{}.{}", k / 256 % 256, k % 256);
        let t0 = Instant::now();
        ash.apply("endpointslices", bench_slice(2, 0, Some(&marker)));
        loop {
            let applied = proxy_out.expect("APPLIED").await?;
            if applied.split_whitespace().any(|w| w == marker) {
                let us = applied
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("apply_us="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                applies.push(Duration::from_micros(us));
                break;
            }
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / latencies.len().max(1) as u32;
    println!(
        "change -> applied over {iterations} changes: p50 {:?}  p99 {:?}  max {:?}  mean {mean:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    applies.sort();
    println!(
        "  of which Proxy::apply_routes (validate + compile + swap of the merged table): p50 {:?}  p99 {:?}",
        percentile(&applies, 0.50),
        percentile(&applies, 0.99),
    );
    for (name, child) in [("control", &control), ("proxy", &proxy)] {
        if let Some(pid) = child.id() {
            println!(
                "memory {name}: VmRSS {} MiB, VmHWM (peak) {} MiB",
                rss_kib(pid, "VmRSS:") / 1024,
                rss_kib(pid, "VmHWM:") / 1024
            );
        }
    }
    Ok(())
}

/// Child: eastwest-control with fra local and ash remote, both network1.
async fn control_role(fra_kc: &str, ash_kc: &str) -> anyhow::Result<()> {
    let mut cfg = ControlConfig::new("fra", "network1");
    cfg.kubeconfig = Some(fra_kc.into());
    cfg.remotes.push(RemoteCluster {
        name: "ash".into(),
        kubeconfig: ash_kc.into(),
    });
    cfg.remote_networks.insert("ash".into(), "network1".into());
    cfg.secret_namespace = None;
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.admin = SocketAddr::from(([127, 0, 0, 1], 0));
    let start = Instant::now();
    let control = Control::start(cfg).await?;
    println!("ROUTES {}", control.routes_addr());
    while !control.not_synced().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!("SYNCED {}", start.elapsed().as_millis());
    wait_stdin_eof().await;
    control.shutdown().await;
    Ok(())
}

/// Child: a real eastwest-proxy fed by control_client; prints each applied version and the
/// probe service's endpoint IPs.
async fn proxy_role(routes: &str) -> anyhow::Result<()> {
    use eastwest_routes::{ListenerConfig, ListenerMode, ProxyConfig};
    let mut cfg = ProxyConfig::with_listeners(vec![ListenerConfig::new(
        "gw",
        "127.0.0.1:0".parse()?,
        ListenerMode::AutoPassthrough,
    )]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    let proxy = Arc::new(eastwest_proxy::Proxy::start(cfg).await?);
    let applier = proxy.clone();
    tokio::spawn(control_client::run(
        control_client::ControlClientConfig::plain_text(
            format!("http://{routes}"),
            "fra",
            "network1",
        ),
        move |table| {
            let version = table.version;
            let probe: Vec<String> = table
                .service(PROBE)
                .map(|s| {
                    s.ports[0]
                        .endpoints
                        .iter()
                        .map(|e| e.address.ip().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let t = Instant::now();
            let result = applier.apply_routes(table);
            if result.is_ok() {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "APPLIED {version} {} apply_us={}",
                    probe.join(" "),
                    t.elapsed().as_micros()
                );
                let _ = out.flush();
            }
            result
        },
    ));
    wait_stdin_eof().await;
    Ok(())
}

async fn wait_stdin_eof() {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let mut stdin = tokio::io::stdin();
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}
