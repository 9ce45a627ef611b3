//! The relay: accepts TCP on `listen`, dials `upstream` for each connection, and runs one
//! delaying pipe per direction.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::stoppable::{accept_until_stopped, StoppableTask};
use tokio::time::Instant;

use super::pipe::{self, PipeCounters, Shape};
use super::{WanOptions, WanStats};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    up: Arc<PipeCounters>,
    down: Arc<PipeCounters>,
}

/// A running WAN link; stops on [`WanLink::shutdown`] or drop.
pub struct WanLink {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: StoppableTask,
}

impl WanLink {
    /// Listens on `listen` (port 0 for any) and relays each connection to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        opts: WanOptions,
    ) -> anyhow::Result<WanLink> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding WAN link to {listen}"))?;
        let addr = listener.local_addr().context("WAN link local address")?;
        let counters = Arc::new(Counters::default());
        let task = StoppableTask::spawn(|stopped| {
            accept_loop(listener, upstream, opts, counters.clone(), stopped)
        });
        Ok(WanLink {
            addr,
            counters,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> WanStats {
        let c = &self.counters;
        WanStats {
            connections: c.connections.load(Ordering::Relaxed),
            bytes_up: c.up.bytes.load(Ordering::Relaxed),
            bytes_down: c.down.bytes.load(Ordering::Relaxed),
            peak_queued_up: c.up.peak_queued.load(Ordering::Relaxed),
            peak_queued_down: c.down.peak_queued.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and closes every relayed connection.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    opts: WanOptions,
    counters: Arc<Counters>,
    stopped: oneshot::Receiver<()>,
) {
    accept_until_stopped(listener, stopped, "WAN link", |tcp, peer| {
        let accepted_at = Instant::now();
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (opts, counters) = (opts.clone(), counters.clone());
        async move {
            if let Err(err) = relay(tcp, upstream, accepted_at, &opts, &counters).await {
                tracing::debug!(%peer, error = %format!("{err:#}"), "WAN relay ended");
            }
        }
    })
    .await
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    accepted_at: Instant,
    opts: &WanOptions,
    counters: &Counters,
) -> anyhow::Result<()> {
    let server = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to upstream {upstream}: timed out"))?
        .with_context(|| format!("connecting to upstream {upstream}"))?;
    client
        .set_nodelay(true)
        .context("TCP_NODELAY (client side)")?;
    server
        .set_nodelay(true)
        .context("TCP_NODELAY (upstream side)")?;
    let shape = Shape {
        delay: opts.rtt / 2,
        jitter: opts.jitter,
        bytes_per_sec: opts.bandwidth_bytes_per_sec,
        // On a real link the client's first byte leaves only after TCP's SYN / SYN-ACK
        // round trip; our accept completed locally, so hold both directions one RTT.
        open_at: accepted_at + opts.rtt,
    };
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    let up = pipe::run(
        client_rx,
        server_tx,
        shape.clone(),
        StdRng::from_os_rng(),
        counters.up.clone(),
    );
    let down = pipe::run(
        server_rx,
        client_tx,
        shape,
        StdRng::from_os_rng(),
        counters.down.clone(),
    );
    // An error either way (a reset) tears down both directions; a FIN only ends its own.
    tokio::try_join!(up, down).context("relaying")?;
    Ok(())
}
