//! `eastwest-bench wan`: a userspace WAN link. A TCP relay that adds a one-way delay of
//! `rtt / 2` in each direction (optionally jitter and a bandwidth cap), keeps each chunk's
//! timing (no batching), bounds its memory (a full queue stops reading, so TCP pushes
//! back), and passes half-closes through.

mod link;
mod measure;
mod pipe;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

pub use link::WanLink;
pub use measure::{measure, Measurement};
pub use pipe::QUEUE_BYTES;

/// The link's shape.
#[derive(Debug, Clone, Default)]
pub struct WanOptions {
    /// Round-trip time added: `rtt / 2` each way.
    pub rtt: Duration,
    /// Each chunk's one-way delay is uniform in `[rtt/2 - jitter, rtt/2 + jitter]`
    /// (chunks still arrive in order).
    pub jitter: Duration,
    /// Serialization rate per direction; `None` for unlimited.
    pub bandwidth_bytes_per_sec: Option<u64>,
}

/// Counters since start, over all relayed connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WanStats {
    pub connections: u64,
    /// Bytes delivered client → upstream.
    pub bytes_up: u64,
    /// Bytes delivered upstream → client.
    pub bytes_down: u64,
    /// Most bytes ever queued in one connection's client → upstream direction
    /// (never more than [`QUEUE_BYTES`]).
    pub peak_queued_up: usize,
    /// Same, upstream → client.
    pub peak_queued_down: usize,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to accept connections on.
    #[arg(long, required_unless_present = "measure")]
    pub listen: Option<SocketAddr>,
    /// Address every connection is relayed to.
    #[arg(long, required_unless_present = "measure")]
    pub upstream: Option<SocketAddr>,
    /// Round-trip time to add (half each way), e.g. 90ms; a bare number is milliseconds.
    #[arg(long, alias = "rtt-ms", default_value = "90ms", value_parser = eastwest_cli::duration_or_millis)]
    pub rtt: Duration,
    /// One-way jitter (uniform +-; order is kept), e.g. 2ms.
    #[arg(long, alias = "jitter-ms", default_value = "0ms", value_parser = eastwest_cli::duration_or_millis)]
    pub jitter: Duration,
    /// Bandwidth cap per direction, megabits per second.
    #[arg(long)]
    pub bandwidth_mbps: Option<f64>,
    /// Instead of relaying: measure the link's added delay on loopback over this many
    /// ping-pong round trips and print p50/p99.
    #[arg(long)]
    pub measure: Option<usize>,
    /// Ping-pong message size for --measure, bytes.
    #[arg(long, default_value_t = 64)]
    pub measure_bytes: usize,
}

impl Args {
    pub fn options(&self) -> anyhow::Result<WanOptions> {
        let bandwidth_bytes_per_sec = match self.bandwidth_mbps {
            None => None,
            Some(m) if m.is_finite() && m > 0.0 => Some((m * 1e6 / 8.0) as u64),
            Some(m) => anyhow::bail!("--bandwidth-mbps {m}: must be a positive number"),
        };
        Ok(WanOptions {
            rtt: self.rtt,
            jitter: self.jitter,
            bandwidth_bytes_per_sec,
        })
    }
}

pub async fn main(args: Args) -> anyhow::Result<()> {
    let opts = args.options()?;
    if let Some(rounds) = args.measure {
        let m = measure(opts, rounds, args.measure_bytes).await?;
        println!("{m}");
        return Ok(());
    }
    let (Some(listen), Some(upstream)) = (args.listen, args.upstream) else {
        anyhow::bail!("--listen and --upstream are required");
    };
    let link = WanLink::start(listen, upstream, opts.clone()).await?;
    println!(
        "eastwest-bench wan: listening on {} -> {upstream} (rtt {:?}, jitter {:?}, bandwidth {})",
        link.local_addr(),
        opts.rtt,
        opts.jitter,
        opts.bandwidth_bytes_per_sec
            .map(|b| format!("{b} B/s"))
            .unwrap_or_else(|| "unlimited".into()),
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    let stats = link.stats();
    link.shutdown().await;
    eprintln!(
        "eastwest-bench wan: {} connections, {} bytes up, {} bytes down",
        stats.connections, stats.bytes_up, stats.bytes_down
    );
    Ok(())
}
