//! `eastwest-bench serve`: an sglang-like OpenAI-compatible model server without a GPU.
//!
//! `POST /v1/chat/completions` and `/v1/completions` (streamed or not), `GET /v1/models`,
//! `GET /health`. Streams in sglang's SSE shape, one event per token chunk, each flushed
//! the moment its token is "generated", so clients can measure TTFT and inter-token
//! latency through whatever sits in between (the gateway, the WAN).

mod body;
mod engine;
mod handler;
mod server;
mod tls;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub use server::ModelServer;
pub use tls::server_config as tls_server_config;

/// What the fake model does. The defaults resemble a small model on one GPU.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Time to first token, counted from when the request gets a running slot.
    pub ttft: Duration,
    /// TTFT is uniform in `[ttft - jitter, ttft + jitter]` (floored at zero).
    pub ttft_jitter: Duration,
    /// Inter-token latency.
    pub itl: Duration,
    /// Tokens per streamed chunk (sglang's `--stream-interval`).
    pub tokens_per_chunk: usize,
    /// Output length when a request sets no `max_tokens` (finish reason `stop`).
    pub default_output_tokens: usize,
    /// Requests generating at once; the rest queue.
    pub max_running: usize,
    /// Request `n` of a server with seed `s` always sees the same randomness.
    pub seed: u64,
    /// Listed by `/v1/models`; echoed when a request names none.
    pub model: String,
    /// Serve TLS (ALPN h2 and http/1.1 are added if the config offers none).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            ttft: Duration::from_millis(20),
            ttft_jitter: Duration::ZERO,
            itl: Duration::from_millis(7),
            tokens_per_chunk: 1,
            default_output_tokens: 128,
            max_running: 256,
            seed: 0,
            model: "demo-model".to_owned(),
            tls: None,
        }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests fully served (streamed to `[DONE]`, or answered).
    pub requests: u64,
    /// SSE events sent (role, content, finish, usage and `[DONE]` events).
    pub chunks: u64,
    /// Requests generating now.
    pub running: usize,
    /// Requests queued for a running slot now.
    pub waiting: usize,
    /// Most requests ever generating at once.
    pub peak_running: usize,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on (sglang's default port is 30000).
    #[arg(long, default_value = "127.0.0.1:30000")]
    pub listen: SocketAddr,
    /// Model name listed by /v1/models.
    #[arg(long, default_value = "demo-model")]
    pub model: String,
    /// Time to first token (after the request gets a running slot), e.g. 20ms; a bare number
    /// is milliseconds.
    #[arg(long, alias = "ttft-ms", default_value = "20ms", value_parser = eastwest_cli::duration_or_millis)]
    pub ttft: Duration,
    /// TTFT jitter: TTFT is uniform in [ttft - jitter, ttft + jitter], e.g. 5ms.
    #[arg(long, alias = "ttft-jitter-ms", default_value = "0ms", value_parser = eastwest_cli::duration_or_millis)]
    pub ttft_jitter: Duration,
    /// Inter-token latency, e.g. 7ms.
    #[arg(long, alias = "itl-ms", default_value = "7ms", value_parser = eastwest_cli::duration_or_millis)]
    pub itl: Duration,
    /// Tokens per streamed chunk.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub tokens_per_chunk: u32,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests generating at once; more queue.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running: u32,
    /// Seed for token text, TTFT jitter and ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mesh root (PEM) that client certificates must chain to; clients must also carry a
    /// SPIFFE ID in the trust domain of --tls-cert.
    #[arg(long, alias = "tls-root", requires = "require_client_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Require a client certificate chaining to --tls-ca (mTLS).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub require_client_cert: bool,
}

impl Args {
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let root = self.tls_ca.as_deref().filter(|_| self.require_client_cert);
                Some(tls::server_config(cert, key, root).context("loading --tls-cert/--tls-key")?)
            }
            _ => None,
        };
        Ok(ServeConfig {
            ttft: self.ttft,
            ttft_jitter: self.ttft_jitter,
            itl: self.itl,
            tokens_per_chunk: self.tokens_per_chunk as usize,
            default_output_tokens: self.output_len,
            max_running: self.max_running as usize,
            seed: self.seed,
            model: self.model.clone(),
            tls,
        })
    }
}

pub async fn main(args: Args) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let server = ModelServer::start(args.listen, cfg).await?;
    // Scripts wait for this line to learn the port.
    println!(
        "eastwest-bench serve: listening on {scheme}://{}",
        server.local_addr()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    let stats = server.stats();
    server.shutdown().await;
    eprintln!(
        "eastwest-bench serve: served {} requests, {} chunks",
        stats.requests, stats.chunks
    );
    Ok(())
}
