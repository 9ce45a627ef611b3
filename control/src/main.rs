//! `eastwest-control`: flags to [`ControlConfig`], then run until SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use std::process::ExitCode;

use clap::Parser;
use eastwest_control::{Control, ControlConfig, RemoteCluster, TlsFiles};

#[derive(Debug, Parser)]
#[command(
    name = "eastwest-control",
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  eastwest-control --cluster fra --network network1 --tls-cert cert-chain.pem --tls-key key.pem --tls-ca root-cert.pem
  eastwest-control --cluster fra --network network1 --remote ash=ash.kubeconfig --remote-network ash=network2 --secret-namespace= --plaintext --listen 127.0.0.1:15010
  eastwest-control --cluster fra --network network1 --tls-cert cert-chain.pem --tls-key key.pem --tls-ca root-cert.pem --gateway network2=203.0.113.7:15443 --debounce 250ms"
)]
struct Args {
    /// This cluster's name (as in remote secrets), e.g. fra.
    #[arg(long, env = "EASTWEST_CLUSTER", required = true)]
    cluster: Option<String>,
    /// This cluster's network, e.g. network1.
    #[arg(long, env = "EASTWEST_NETWORK", required = true)]
    network: Option<String>,
    /// Kubeconfig of the local cluster (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "EASTWEST_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// A remote cluster: NAME=KUBECONFIG_FILE (repeatable; in the variable, comma-separated).
    #[arg(
        long = "remote",
        value_name = "NAME=KUBECONFIG",
        env = "EASTWEST_REMOTES",
        value_delimiter = ','
    )]
    remotes: Vec<String>,
    /// Network of a remote cluster: NAME=NETWORK (repeatable; wins over discovery).
    #[arg(
        long = "remote-network",
        value_name = "NAME=NETWORK",
        env = "EASTWEST_REMOTE_NETWORKS",
        value_delimiter = ','
    )]
    remote_networks: Vec<String>,
    /// Namespace of `istio/multiCluster=true` remote secrets; empty disables them.
    #[arg(
        long,
        default_value = "istio-system",
        env = "EASTWEST_SECRET_NAMESPACE"
    )]
    secret_namespace: String,
    /// Route-stream listener (HTTP/2).
    #[arg(long, default_value = "0.0.0.0:15010", env = "EASTWEST_LISTEN")]
    listen: SocketAddr,
    /// Admin listener (/healthz/ready, /metrics, /debug/routes).
    #[arg(long, default_value = "0.0.0.0:15014", env = "EASTWEST_ADMIN")]
    admin: SocketAddr,
    /// Certificate chain (PEM) of control's mesh identity (an eastwest-certs workload leaf).
    #[arg(long, env = "EASTWEST_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "EASTWEST_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// Mesh root (PEM) that proxies' client certificates must chain to.
    #[arg(
        long,
        env = "EASTWEST_TLS_CA",
        alias = "tls-root",
        requires_all = ["tls_cert", "tls_key"]
    )]
    tls_ca: Option<PathBuf>,
    /// Serve h2c without TLS (only on a loopback --listen).
    #[arg(long, env = "EASTWEST_PLAINTEXT", conflicts_with = "tls_cert")]
    plaintext: bool,
    /// Minimum interval between two publications (e.g. 100ms, 1s).
    #[arg(long, default_value = "100ms", env = "EASTWEST_DEBOUNCE", value_parser = eastwest_cli::duration)]
    debounce: Duration,
    /// Longest the first publication waits for all clusters to sync; also how long an unsynced
    /// remote cluster holds readiness back before control is first ready, and how long a rotated
    /// remote secret's cluster keeps its previous objects while the new watch cannot list.
    #[arg(long, default_value = "60s", env = "EASTWEST_SYNC_TIMEOUT", value_parser = eastwest_cli::duration)]
    sync_timeout: Duration,
    /// Gateway of a network: NETWORK=HOST:PORT (repeatable; wins over discovered gateways).
    #[arg(
        long = "gateway",
        value_name = "NETWORK=HOST:PORT",
        env = "EASTWEST_GATEWAYS",
        value_delimiter = ','
    )]
    gateways: Vec<String>,
    /// DNS suffix of the clusters' Services (Kubernetes' --cluster-domain): hostnames in the
    /// route tables are <svc>.<ns>.svc.<this>.
    #[arg(long, default_value = "cluster.local", env = "EASTWEST_CLUSTER_DOMAIN")]
    cluster_domain: String,
    /// Pod label keys copied onto endpoints for subsets, comma-separated; empty: none (Pods
    /// are still watched, for ambient capture and workload names).
    #[arg(long, default_value = "version", env = "EASTWEST_SUBSET_LABELS")]
    subset_labels: String,
    /// How often a cluster without Istio's DestinationRule CRD (or without access to it) is
    /// asked again; more than zero.
    #[arg(
        long,
        default_value = "60s",
        env = "EASTWEST_DESTINATION_RULE_RECHECK",
        value_parser = parse_recheck
    )]
    destination_rule_recheck: Duration,
    #[command(flatten)]
    log: eastwest_cli::LogArgs,
    #[command(subcommand)]
    command: Option<eastwest_cli::OnlyCompletions>,
}

/// A recheck of zero would ask a cluster without the CRD again in a busy loop.
fn parse_recheck(s: &str) -> Result<Duration, String> {
    let d = eastwest_cli::duration(s)?;
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
    // clap requires both unless a subcommand is given, and main handles subcommands first.
    let (Some(cluster), Some(network)) = (&args.cluster, &args.network) else {
        bail!("--cluster and --network are required");
    };
    let mut cfg = ControlConfig::new(cluster, network);
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
    cfg.tls = match (args.tls_cert, args.tls_key, args.tls_ca) {
        (Some(cert), Some(key), Some(root)) => Some(TlsFiles { cert, key, root }),
        _ if args.plaintext => None,
        _ => bail!("the control channel needs --tls-cert, --tls-key and --tls-ca (or --plaintext on loopback)"),
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

fn main() -> ExitCode {
    let args: Args = eastwest_cli::parse();
    if let Some(eastwest_cli::OnlyCompletions::Completions(completions)) = &args.command {
        completions.print::<Args>();
        return ExitCode::SUCCESS;
    }
    args.log.init("info");
    match config(args).and_then(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => eastwest_cli::exit_failure(&err),
    }
}

#[tokio::main]
async fn serve(cfg: ControlConfig) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        eastwest_cli::assert_help_complete::<Args>(true);
    }
}
