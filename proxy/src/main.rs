use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use eastwest_proxy::{control_client, Proxy};

/// SNI-routing TLS passthrough east-west gateway, Istio-compatible.
#[derive(Debug, Parser)]
#[command(
    name = "eastwest-proxy",
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  eastwest-proxy --config gateway.yaml --check
  eastwest-proxy --config gateway.yaml --log-format json
  eastwest-proxy --config gateway.yaml --control https://eastwest-control.istio-system.svc:15010 --cluster ash --network network2 --tls-cert cert-chain.pem --tls-key key.pem --tls-ca root-cert.pem --route-cache /var/lib/eastwest/routes.json"
)]
struct Cli {
    /// YAML config file (listeners, upstream settings, admin, routes).
    #[arg(long, short = 'c', env = "EASTWEST_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Validate the config and exit: 0 when usable, 1 with every problem listed otherwise.
    #[arg(long, env = "EASTWEST_CHECK")]
    check: bool,
    /// eastwest-control to take route tables from (`https://host:15010`, or
    /// `http://127.0.0.1:port` for plain text on loopback). The config file's routes are used
    /// until the first table arrives.
    #[arg(long, env = "EASTWEST_CONTROL_URL", requires_all = ["cluster", "network"])]
    control: Option<String>,
    /// This gateway's cluster, as eastwest-control knows it (e.g. `ash`).
    #[arg(long, env = "EASTWEST_CLUSTER")]
    cluster: Option<String>,
    /// This gateway's network (e.g. `network2`).
    #[arg(long, env = "EASTWEST_NETWORK")]
    network: Option<String>,
    /// Certificate chain (PEM) of this gateway's mesh identity, for mTLS to eastwest-control.
    #[arg(long, env = "EASTWEST_TLS_CERT", alias = "control-cert", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "EASTWEST_TLS_KEY", alias = "control-key")]
    tls_key: Option<PathBuf>,
    /// Mesh root certificate (PEM); eastwest-control must chain to it and be in its trust domain.
    #[arg(long, env = "EASTWEST_TLS_CA", alias = "control-root")]
    tls_ca: Option<PathBuf>,
    /// Keeps the last complete (not partial) table from eastwest-control here, so a restart
    /// while control is down still routes.
    #[arg(long, env = "EASTWEST_ROUTE_CACHE")]
    route_cache: Option<PathBuf>,
    /// Threads relaying traffic (default: one per CPU the process may run on).
    #[arg(long, env = "EASTWEST_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(flatten)]
    log: eastwest_cli::LogArgs,
    #[command(subcommand)]
    command: Option<eastwest_cli::OnlyCompletions>,
}

fn main() -> ExitCode {
    let cli: Cli = eastwest_cli::parse();
    if let Some(eastwest_cli::OnlyCompletions::Completions(completions)) = &cli.command {
        completions.print::<Cli>();
        return ExitCode::SUCCESS;
    }
    // clap requires --config unless a subcommand is given.
    let Some(config_path) = cli.config.clone() else {
        return ExitCode::FAILURE;
    };
    cli.log.init("info");
    let config = match eastwest_routes::load_proxy_config(&config_path) {
        Ok(config) => config,
        Err(err) => return eastwest_cli::exit_failure(&err.into()),
    };
    if cli.check {
        println!(
            "{}: ok ({}, {})",
            config_path.display(),
            counted(config.listeners.len(), "listener"),
            counted(config.routes.services.len(), "service")
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime(cli.worker_threads) {
        Ok(rt) => rt,
        Err(err) => {
            return eastwest_cli::exit_failure(
                &anyhow::Error::new(err).context("cannot start the runtime"),
            )
        }
    };
    match runtime.block_on(run(cli, config_path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => eastwest_cli::exit_failure(&err),
    }
}

/// `1 service`, `2 services`.
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `--worker-threads` threads (default: the CPUs this process may use, cgroup limits included).
/// Even one worker gets the multi-thread scheduler: measured against the current-thread one
/// on this box it relayed ~2 % more kept-alive requests per CPU second (its LIFO slot runs the
/// task a wake-up targets next) and tied on new connections.
fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = worker_threads
        .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
        .unwrap_or(1)
        .max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

async fn run(
    cli: Cli,
    config_path: PathBuf,
    config: eastwest_routes::ProxyConfig,
) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM or SIGHUP that arrives while starting must not kill the process
    // the default way. (A SIGHUP before the config watcher runs is moot: the file was just read.)
    let mut signals = ShutdownSignals::new()?;
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    // Read everything that can fail before binding, so a mistake exits at once.
    let control = control_client_config(&cli)?;
    // A cache that can't be read (torn by a full disk, or written by another version) must
    // not keep the gateway down: it starts without it and waits for control.
    let cached =
        cli.route_cache
            .as_deref()
            .and_then(|path| match control_client::load_route_cache(path) {
                Ok(table) => table,
                Err(err) => {
                    tracing::warn!(error = format!("{err:#}"), "ignoring the route cache");
                    None
                }
            });
    // Before anything is bound: max_connections' default is derived from it.
    match eastwest_proxy::fd_limit::raise() {
        Ok(limit) => tracing::info!(
            soft_before = limit.before,
            soft = limit.now,
            hard = limit.hard,
            "open-file limit"
        ),
        Err(err) => tracing::warn!(%err, soft = eastwest_proxy::fd_limit::current(),
            "cannot raise the open-file limit to the hard limit"),
    }
    // With control, not ready until there are routes from it (or from the cache of its last
    // table): never ready in between.
    let proxy = Proxy::start_with_readiness(config, control.is_none()).await?;
    proxy.set_config_file(config_path.clone());
    tracing::info!(
        status = %proxy.status_addr(),
        metrics = %proxy.metrics_addr(),
        debug = %proxy.debug_addr(),
        "eastwest-proxy started"
    );
    eastwest_proxy::watch_config_file(proxy.clone(), config_path)?;
    if let Some(control) = control {
        if let Some(table) = cached {
            let version = table.version;
            match proxy.apply_routes(table) {
                Ok(()) => {
                    tracing::info!(
                        version,
                        "routing with the cached table until control answers"
                    );
                    proxy.set_ready(true);
                }
                Err(why) => tracing::warn!(%why, "ignoring the route cache"),
            }
        }
        let applier = proxy.clone();
        tokio::spawn(control_client::run(control, move |table| {
            applier.apply_routes(table)?;
            applier.set_ready(true);
            Ok(())
        }));
    }
    signals.next().await;
    tokio::select! {
        () = proxy.shutdown() => Ok(()),
        // An operator (or a second Ctrl-C) who does not want to wait for the drain.
        () = signals.next() => {
            tracing::warn!("second signal: exiting without finishing the drain");
            std::process::exit(1)
        }
    }
}

fn control_client_config(cli: &Cli) -> anyhow::Result<Option<control_client::ControlClientConfig>> {
    let Some(url) = cli.control.clone() else {
        return Ok(None);
    };
    let tls = match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) {
        (Some(cert), Some(key), Some(root)) => {
            let identity = eastwest_certs::Identity::load(cert, key, root)?;
            let trust_domain = identity.spiffe_id().trust_domain.clone();
            Some(identity.client_config(eastwest_certs::PeerPolicy::TrustDomain(trust_domain))?)
        }
        _ if url.starts_with("https://") => {
            anyhow::bail!("--control {url} needs --tls-cert, --tls-key and --tls-ca")
        }
        _ => None,
    };
    Ok(Some(control_client::ControlClientConfig {
        url,
        cluster: cli.cluster.clone().unwrap_or_default(),
        network: cli.network.clone().unwrap_or_default(),
        tls,
        route_cache: cli.route_cache.clone(),
        subscribe_timeout: control_client::SUBSCRIBE_TIMEOUT,
    }))
}

/// SIGTERM and SIGINT, registered at once: the first starts the drain, a second ends it.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: draining"),
            _ = self.int.recv() => tracing::info!("SIGINT: draining"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        eastwest_cli::assert_help_complete::<Cli>(true);
    }
}
