//! Dialing an upstream: timeout per attempt, another endpoint after a refusal or timeout;
//! each outcome feeds outlier detection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use eastwest_routes::UpstreamConfig;
use socket2::TcpKeepalive;
use tokio::net::TcpStream;

use crate::balance::{self, ActiveGuard, Pick};
use crate::metrics as m;
use crate::outlier;
use crate::routing::{Target, UpstreamSet};

pub struct Connected {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Which of the route's upstreams accepted.
    pub index: usize,
    /// Keeps this connection counted against the chosen upstream.
    pub guard: ActiveGuard,
}

#[derive(Debug, thiserror::Error)]
#[error("no upstream of {route} accepted after {attempts} attempt(s); last error: {last}")]
pub struct ConnectFailed {
    pub route: String,
    pub attempts: u32,
    pub last: io::Error,
}

/// Connects to one upstream of `set`. No byte has been sent yet, so every failure may be
/// retried on another endpoint.
pub async fn connect(set: &UpstreamSet, cfg: &UpstreamConfig) -> Result<Connected, ConnectFailed> {
    // Filled only on failure, so the usual first-try success allocates nothing.
    let mut tried = Vec::new();
    let mut attempts = 0;
    // The last failure; the error for "no endpoint at all" is made only if it is needed.
    let mut last: Option<io::Error> = None;
    for _ in 0..cfg.connect_attempts {
        let Some(Pick { index: i, probe }) = balance::pick(set, cfg, &tried, outlier::now_ms())
        else {
            break;
        };
        attempts += 1;
        let upstream = &set.upstreams[i];
        // Count the attempt as load right away so concurrent picks spread out.
        let guard = ActiveGuard::new(&upstream.state);
        let err = match tokio::time::timeout(cfg.connect_timeout, dial(&upstream.target)).await {
            Ok(Ok((stream, peer))) => {
                upstream.state.connected();
                // TCP_NODELAY so a token leaves the moment it arrives. (Keepalive comes later,
                // from `copy::relay`; downstream sockets get both from their listener.)
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%err, "cannot set TCP_NODELAY");
                }
                return Ok(Connected {
                    stream,
                    peer,
                    index: i,
                    guard,
                });
            }
            Ok(Err(err)) => err,
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", cfg.connect_timeout),
            ),
        };
        tried.push(i);
        tracing::debug!(route = %set.route, upstream = %upstream.target, error = %err, probe, "upstream connect failed");
        let od = &cfg.outlier_detection;
        outlier::failed(set, i, probe, od, outlier::now_ms(), outlier::reason(&err));
        metrics::counter!(m::CONNECT_FAILURES, "route" => set.route.to_string()).increment(1);
        last = Some(err);
    }
    Err(ConnectFailed {
        route: set.route.to_string(),
        attempts,
        last: last
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "route has no endpoints")),
    })
}

async fn dial(target: &Target) -> io::Result<(TcpStream, SocketAddr)> {
    let addr = match target {
        Target::Addr(addr) => *addr,
        Target::Name(name) => tokio::net::lookup_host(name.as_str())
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address"))
            })?,
    };
    Ok((TcpStream::connect(addr).await?, addr))
}

/// Keepalive to notice dead peers on connections that idle for minutes: first probe after
/// `idle`, then every 15 s at most.
pub fn keepalive(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle.min(Duration::from_secs(15)))
}
