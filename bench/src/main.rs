use clap::{Parser, Subcommand};
use eastwest_bench::{demo, run, serve, sidecar, wan};

/// Streaming-LLM latency harness for eastwest.
#[derive(Debug, Parser)]
#[command(name = "eastwest-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// An sglang-like OpenAI-compatible model server (no GPU).
    Serve(serve::Args),
    /// Load generator compatible with sglang's bench_serving.
    Run(run::Args),
    /// A userspace WAN link: a TCP relay adding delay in each direction.
    Wan(wan::Args),
    /// The two-region demo: fra client -> WAN -> eastwest-proxy -> ash model server.
    Demo(demo::Args),
    /// Plain TCP in, mTLS with SNI out: lets TLS-less clients reach a gateway.
    Sidecar(sidecar::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve::main(args).await,
        Command::Run(args) => run::main(args).await,
        Command::Wan(args) => wan::main(args).await,
        Command::Demo(args) => demo::main(args).await,
        Command::Sidecar(args) => sidecar::main(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("eastwest-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
