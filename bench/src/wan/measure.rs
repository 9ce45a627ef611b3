//! Measures a WAN link's added delay on loopback: ping-pong over a local echo server,
//! directly and through the link; added delay = round trip via the link minus the median
//! direct round trip.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::{WanLink, WanOptions};

/// Round trips before measuring (the first pays the emulated TCP handshake).
const WARMUP: usize = 5;

#[derive(Debug, Clone)]
pub struct Measurement {
    pub rounds: usize,
    pub bytes: usize,
    pub configured_rtt: Duration,
    pub direct_p50: Duration,
    pub direct_p99: Duration,
    /// Round trip via the link minus the median direct round trip, sorted.
    pub added: Vec<Duration>,
}

impl Measurement {
    pub fn added_quantile(&self, q: f64) -> Duration {
        quantile(&self.added, q)
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The quantiles of the added delay that the report shows, by name.
const REPORTED_QUANTILES: [(&str, f64); 5] = [
    ("min", 0.0),
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("max", 1.0),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rtt = ms(self.configured_rtt);
        writeln!(
            f,
            "WAN link accuracy: {} round trips of {} bytes, configured RTT {rtt:.3} ms",
            self.rounds, self.bytes
        )?;
        writeln!(
            f,
            "  direct loopback RTT   p50 {:.3} ms  p99 {:.3} ms",
            ms(self.direct_p50),
            ms(self.direct_p99)
        )?;
        write!(f, "  added RTT (via link)")?;
        for (name, q) in REPORTED_QUANTILES {
            write!(f, "  {name} {:.3} ms", ms(self.added_quantile(q)))?;
        }
        writeln!(f)?;
        write!(f, "  error vs configured ")?;
        for (name, q) in REPORTED_QUANTILES {
            write!(f, "  {name} {:+.3} ms", ms(self.added_quantile(q)) - rtt)?;
        }
        Ok(())
    }
}

/// Runs `rounds` ping-pongs of `bytes` bytes directly and through a link shaped by `opts`.
pub async fn measure(opts: WanOptions, rounds: usize, bytes: usize) -> anyhow::Result<Measurement> {
    anyhow::ensure!(
        rounds > 0 && bytes > 0,
        "need at least one round of at least one byte"
    );
    let echo = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding echo server")?;
    let echo_addr = echo.local_addr()?;
    let echo_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });

    let configured_rtt = opts.rtt;
    let mut direct = ping_pong(echo_addr, rounds, bytes)
        .await
        .context("direct ping-pong")?;
    let link = WanLink::start(SocketAddr::from(([127, 0, 0, 1], 0)), echo_addr, opts).await?;
    let via = ping_pong(link.local_addr(), rounds, bytes)
        .await
        .context("ping-pong via the link")?;
    link.shutdown().await;
    echo_task.abort();

    direct.sort();
    let base = quantile(&direct, 0.5);
    let mut added: Vec<Duration> = via.iter().map(|v| v.saturating_sub(base)).collect();
    added.sort();
    Ok(Measurement {
        rounds,
        bytes,
        configured_rtt,
        direct_p50: base,
        direct_p99: quantile(&direct, 0.99),
        added,
    })
}

async fn ping_pong(addr: SocketAddr, rounds: usize, bytes: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let out = vec![0x5au8; bytes];
    let mut back = vec![0u8; bytes];
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..WARMUP + rounds {
        let t0 = Instant::now();
        s.write_all(&out).await?;
        s.read_exact(&mut back).await?;
        if i >= WARMUP {
            rtts.push(t0.elapsed());
        }
    }
    Ok(rtts)
}
