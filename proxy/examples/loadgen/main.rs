//! Load generator for comparing eastwest-proxy with nginx and haproxy (bench/compare/run.sh).
//!
//! Three subcommands:
//! - `certs --out DIR`: a throwaway mesh PKI (client and backend identities, like two sidecars).
//! - `backend --listen ADDR --certs DIR`: an mTLS request/response server (TLS 1.3, ALPN istio).
//! - `client --target ADDR --mode ...`: drives load like an Istio sidecar (mesh client cert,
//!   ALPN istio-peer-exchange/istio, SNI `outbound_.8000_._.bench.svc.cluster.local`) and
//!   prints one JSON line of results.
//!
//! The wire protocol is in [`wire`]: a 16-byte header (request length, response length, and
//! optionally the records to answer in), then the request body; the backend answers with the
//! response length in bytes.

mod backend;
mod client;
mod tls;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for eastwest-proxy comparisons"
)]
struct Cli {
    /// Tokio worker threads; 1 runs a current-thread runtime (the script pins it to a core).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes client and backend identities of a fresh mesh PKI to DIR.
    Certs {
        #[arg(long)]
        out: PathBuf,
    },
    /// Serves the request/response protocol over mTLS.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        /// Directory written by `certs`.
        #[arg(long)]
        certs: PathBuf,
    },
    /// Generates load and prints one JSON line with the results.
    Client(ClientArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Requests back to back on kept-alive connections.
    Keepalive,
    /// A new TLS connection (full handshake) per request.
    Connect,
    /// The backend streams to each connection as fast as it can.
    Bulk,
    /// Opens `--connections` connections, one request each, prints, then holds them.
    Idle,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value = "outbound_.8000_._.bench.svc.cluster.local")]
    sni: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Concurrent connections (idle: total connections to hold).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load (idle: seconds to hold after opening).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Request body bytes.
    #[arg(long, default_value_t = 256)]
    request_size: u32,
    /// Response bytes.
    #[arg(long, default_value_t = 1024)]
    response_size: u32,
    /// The backend writes the response in records of this many bytes, each flushed alone
    /// (a token stream); 0: in as few writes as it can.
    #[arg(long, default_value_t = 0)]
    record_size: u32,
    /// Microseconds the backend waits between those records (0: back to back).
    #[arg(long, default_value_t = 0)]
    record_gap_us: u32,
    /// Directory written by `certs`.
    #[arg(long)]
    certs: PathBuf,
    /// Idle mode: handshakes in flight while opening.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
}

impl ClientArgs {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.clamp(0.1, 3600.0))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("loadgen: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Certs { out } => tls::write_certs(&out),
            Command::Backend { listen, certs } => backend::run(listen, &certs).await,
            Command::Client(args) => client::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}
