use clap::{Parser, Subcommand};
use eastwest_bench::{demo, run, serve, sidecar, wan};

/// Streaming-LLM latency harness for eastwest.
#[derive(Debug, Parser)]
#[command(
    name = "eastwest-bench",
    about,
    after_help = "Examples:
  eastwest-bench demo --quick
  eastwest-bench serve --listen 127.0.0.1:30000 --ttft 20ms --itl 7ms
  eastwest-bench run --base-url http://127.0.0.1:30000 --num-prompts 200 --max-concurrency 8"
)]
struct Cli {
    #[command(flatten)]
    log: eastwest_cli::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// An sglang-like OpenAI-compatible model server (no GPU).
    #[command(after_help = "Examples:
  eastwest-bench serve --listen 127.0.0.1:30000 --ttft 20ms --ttft-jitter 5ms --itl 7ms
  eastwest-bench serve --listen 0.0.0.0:8000 --tls-cert cert-chain.pem --tls-key key.pem --tls-ca root-cert.pem --require-client-cert")]
    Serve(serve::Args),
    /// Load generator compatible with sglang's bench_serving.
    #[command(after_help = "Examples:
  eastwest-bench run --base-url http://127.0.0.1:30000 --num-prompts 200 --max-concurrency 8
  eastwest-bench run --base-url https://sglang.demo.svc.cluster.local:8000 --connect-to 10.0.0.7:15443 --sni outbound_.8000_._.sglang.demo.svc.cluster.local --tls-ca root-cert.pem --tls-cert cert-chain.pem --tls-key key.pem
  eastwest-bench run --num-prompts 100 --request-rate 4 --output-file results.jsonl --goodput ttft:200 tpot:50")]
    Run(run::Args),
    /// A userspace WAN link: a TCP relay adding delay in each direction.
    #[command(after_help = "Examples:
  eastwest-bench wan --listen 127.0.0.1:9000 --upstream 127.0.0.1:30000 --rtt 90ms --jitter 2ms
  eastwest-bench wan --measure 1000 --rtt 90ms")]
    Wan(wan::Args),
    /// The two-region demo: fra client -> WAN -> eastwest-proxy -> ash model server.
    #[command(after_help = "Examples:
  eastwest-bench demo
  eastwest-bench demo --quick --out /tmp/demo-out
  eastwest-bench demo --rtt 150ms --num-prompts 200 --concurrency 8")]
    Demo(demo::Args),
    /// Plain TCP in, mTLS with SNI out: lets TLS-less clients (bench_serving) reach a gateway.
    #[command(after_help = "Examples:
  eastwest-bench sidecar --listen 127.0.0.1:15001 --upstream 10.0.0.7:15443 --sni outbound_.8000_._.sglang.demo.svc.cluster.local --tls-ca root-cert.pem --tls-cert cert-chain.pem --tls-key key.pem
  eastwest-bench sidecar --upstream gateway.example:15443 --tls-ca root-cert.pem --tls-cert cert-chain.pem --tls-key key.pem --spiffe-id spiffe://cluster.local/ns/demo/sa/sglang")]
    Sidecar(sidecar::Args),
    Completions(eastwest_cli::Completions),
}

fn main() -> std::process::ExitCode {
    let cli: Cli = eastwest_cli::parse();
    cli.log.init("warn");
    let result = match cli.command {
        Command::Completions(completions) => {
            completions.print::<Cli>();
            Ok(())
        }
        command => run_async(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => eastwest_cli::exit_failure(&err),
    }
}

#[tokio::main]
async fn run_async(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve::main(args).await,
        Command::Run(args) => run::main(args).await,
        Command::Wan(args) => wan::main(args).await,
        Command::Demo(args) => demo::main(args).await,
        Command::Sidecar(args) => sidecar::main(args).await,
        Command::Completions(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        eastwest_cli::assert_help_complete::<Cli>(false);
    }
}
