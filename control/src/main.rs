//! `eastwest-control`: flags to [`ControlConfig`], then run until SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use eastwest_control::{Control, ControlConfig, RemoteCluster, TlsFiles};

#[derive(Debug, Parser)]
#[command(name = "eastwest-control", version, about)]
struct Args {
    /// This cluster's name (as in remote secrets), e.g. fra.
    #[arg(long)]
    cluster: String,
    /// This cluster's network, e.g. network1.
    #[arg(long)]
    network: String,
    /// Kubeconfig of the local cluster (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A remote cluster: NAME=KUBECONFIG_FILE (repeatable).
    #[arg(long = "remote", value_name = "NAME=KUBECONFIG")]
    remotes: Vec<String>,
    /// Network of a remote cluster: NAME=NETWORK (repeatable; wins over discovery).
    #[arg(long = "remote-network", value_name = "NAME=NETWORK")]
    remote_networks: Vec<String>,
    /// Namespace of `istio/multiCluster=true` remote secrets; empty disables them.
    #[arg(long, default_value = "istio-system")]
    secret_namespace: String,
    /// Route-stream listener (HTTP/2).
    #[arg(long, default_value = "0.0.0.0:15010")]
    listen: SocketAddr,
    /// Admin listener (/healthz/ready, /metrics, /debug/routes).
    #[arg(long, default_value = "0.0.0.0:15014")]
    admin: SocketAddr,
    #[arg(long, requires_all = ["tls_key", "tls_root"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires_all = ["tls_cert", "tls_root"])]
    tls_key: Option<PathBuf>,
    /// Root that proxies' client certificates must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_root: Option<PathBuf>,
    /// Serve h2c without TLS (only on a loopback --listen).
    #[arg(long, conflicts_with = "tls_cert")]
    plaintext: bool,
    /// Minimum interval between two publications (e.g. 100ms, 1s).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    debounce: Duration,
    /// Longest the first publication waits for all clusters to sync; also how long an unsynced
    /// remote cluster holds readiness back before control is first ready, and how long a rotated
    /// remote secret's cluster keeps its previous objects while the new watch cannot list.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    sync_timeout: Duration,
    /// Gateway of a network: NETWORK=HOST:PORT (repeatable; wins over discovered gateways).
    #[arg(long = "gateway", value_name = "NETWORK=HOST:PORT")]
    gateways: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Pod label keys copied onto endpoints for subsets, comma-separated; empty: Pods are not
    /// watched.
    #[arg(long, default_value = "version")]
    subset_labels: String,
    /// How often a cluster without Istio's DestinationRule CRD (or without access to it) is
    /// asked again; more than zero.
    #[arg(long, default_value = "60s", value_parser = parse_recheck)]
    destination_rule_recheck: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?}: a duration needs a unit (ms, s)"))?;
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: bad number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// A recheck of zero would ask a cluster without the CRD again in a busy loop.
fn parse_recheck(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "{s:?}: must be more than zero (how long to wait before asking a cluster without \
             DestinationRules again), e.g. 60s"
        ));
    }
    Ok(d)
}

fn pair<'a>(flag: &str, s: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    s.split_once('=')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| anyhow!("--{flag} {s:?}: expected NAME=VALUE"))
}

fn config(args: Args) -> anyhow::Result<ControlConfig> {
    let mut cfg = ControlConfig::new(&args.cluster, &args.network);
    cfg.kubeconfig = args.kubeconfig;
    for r in &args.remotes {
        let (name, file) = pair("remote", r)?;
        cfg.remotes.push(RemoteCluster {
            name: name.to_string(),
            kubeconfig: PathBuf::from(file),
        });
    }
    for r in &args.remote_networks {
        let (name, net) = pair("remote-network", r)?;
        cfg.remote_networks
            .insert(name.to_string(), net.to_string());
    }
    let mut gateways: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in &args.gateways {
        let (net, addr) = pair("gateway", g)?;
        gateways
            .entry(net.to_string())
            .or_default()
            .push(addr.to_string());
    }
    cfg.gateways = gateways;
    cfg.secret_namespace = Some(args.secret_namespace).filter(|s| !s.is_empty());
    cfg.listen = args.listen;
    cfg.admin = args.admin;
    cfg.tls = match (args.tls_cert, args.tls_key, args.tls_root) {
        (Some(cert), Some(key), Some(root)) => Some(TlsFiles { cert, key, root }),
        _ if args.plaintext => None,
        _ => bail!("the control channel needs --tls-cert, --tls-key and --tls-root (or --plaintext on loopback)"),
    };
    cfg.debounce = args.debounce;
    cfg.sync_timeout = args.sync_timeout;
    cfg.cluster_domain = args.cluster_domain;
    cfg.destination_rule_recheck = args.destination_rule_recheck;
    cfg.subset_labels = args
        .subset_labels
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = config(Args::parse())?;
    let control = Control::start(cfg)
        .await
        .context("starting eastwest-control")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    control.shutdown().await;
    Ok(())
}
