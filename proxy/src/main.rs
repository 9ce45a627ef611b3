use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use eastwest_proxy::{control_client, Proxy};

/// SNI-routing TLS passthrough east-west gateway, Istio-compatible.
#[derive(Debug, Parser)]
#[command(name = "eastwest-proxy", version, about)]
struct Cli {
    /// YAML config file (listeners, upstream settings, admin, routes).
    #[arg(long, short = 'c', env = "EASTWEST_CONFIG")]
    config: PathBuf,
    /// Validate the config and exit: 0 when usable, 1 with every problem listed otherwise.
    #[arg(long)]
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
    #[arg(long, requires_all = ["control_key", "control_root"])]
    control_cert: Option<PathBuf>,
    /// Private key (PEM) for --control-cert.
    #[arg(long)]
    control_key: Option<PathBuf>,
    /// Mesh root certificate (PEM); eastwest-control must chain to it and be in its trust domain.
    #[arg(long)]
    control_root: Option<PathBuf>,
    /// Keeps the last complete (not partial) table from eastwest-control here, so a restart
    /// while control is down still routes.
    #[arg(long, env = "EASTWEST_ROUTE_CACHE")]
    route_cache: Option<PathBuf>,
    /// Threads relaying traffic (default: one per CPU the process may run on).
    #[arg(long, env = "EASTWEST_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let config = match eastwest_routes::load_proxy_config(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        println!(
            "{}: ok ({} listeners, {} services)",
            cli.config.display(),
            config.listeners.len(),
            config.routes.services.len()
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime(cli.worker_threads) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("eastwest-proxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("eastwest-proxy: {err:#}");
            ExitCode::FAILURE
        }
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

async fn run(cli: Cli, config: eastwest_routes::ProxyConfig) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM or SIGHUP that arrives while starting must not kill the process
    // the default way. (A SIGHUP before the config watcher runs is moot: the file was just read.)
    let shutdown = shutdown_signal()?;
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
    let proxy = Proxy::start(config).await?;
    proxy.set_config_file(cli.config.clone());
    tracing::info!(admin = %proxy.admin_addr(), "eastwest-proxy started");
    eastwest_proxy::watch_config_file(proxy.clone(), cli.config.clone())?;
    if let Some(control) = control {
        // Not ready until there are routes from control (or from the cache of its last table).
        proxy.set_ready(false);
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
    shutdown.await;
    proxy.shutdown().await;
    Ok(())
}

fn control_client_config(cli: &Cli) -> anyhow::Result<Option<control_client::ControlClientConfig>> {
    let Some(url) = cli.control.clone() else {
        return Ok(None);
    };
    let tls = match (&cli.control_cert, &cli.control_key, &cli.control_root) {
        (Some(cert), Some(key), Some(root)) => {
            let identity = eastwest_certs::Identity::load(cert, key, root)?;
            let trust_domain = identity.spiffe_id().trust_domain.clone();
            Some(identity.client_config(eastwest_certs::PeerPolicy::TrustDomain(trust_domain))?)
        }
        _ if url.starts_with("https://") => {
            anyhow::bail!("--control {url} needs --control-cert, --control-key and --control-root")
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

/// Registers for SIGTERM and SIGINT now; the future resolves on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into `kubectl logs` or a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
