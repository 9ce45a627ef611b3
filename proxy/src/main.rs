use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use eastwest_proxy::Proxy;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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

async fn run(cli: Cli, config: eastwest_routes::ProxyConfig) -> anyhow::Result<()> {
    let proxy = Proxy::start(config).await?;
    proxy.set_config_file(cli.config.clone());
    tracing::info!(admin = %proxy.admin_addr(), "eastwest-proxy started");
    eastwest_proxy::watch_config_file(proxy.clone(), cli.config.clone())?;
    shutdown_signal().await?;
    proxy.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
