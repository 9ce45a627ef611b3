//! Relaying bytes both ways between two TCP connections.
//!
//! Each direction reads into its own buffer and writes what it read at once: nothing waits to
//! fill a buffer, so a 1-byte token leaves as soon as it arrives. Buffers start small (most
//! east-west connections are small RPCs or slow token streams) and grow, at most twice, for
//! connections that move a lot of data. EOF on one side is passed on as a half-close while the
//! other direction keeps flowing.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::connect::keepalive;

const INITIAL_BUFFER: usize = 4 * 1024;
const LARGE_BUFFER: usize = 64 * 1024;
const JUMBO_BUFFER: usize = 256 * 1024;
const LARGE_AFTER: u64 = 128 * 1024;
const JUMBO_AFTER: u64 = 8 * 1024 * 1024;

#[derive(Debug)]
pub enum CopyEnd {
    /// Both sides closed their sending direction.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The proxy is shutting down and the drain period is over.
    Cancelled,
    Error(io::Error),
}

#[derive(Debug)]
pub struct CopyResult {
    pub to_upstream: u64,
    pub to_downstream: u64,
    pub end: CopyEnd,
}

/// Relays until both directions end, an error, `idle` without traffic, or `cancel`.
///
/// The upstream socket gets its TCP keepalive only once the connection has lived
/// `upstream_keepalive`: probes can't start before then anyway, and Linux counts the idle time
/// from the last segment received, so probing is exactly as if it had been set at connect,
/// while the short connections that are most of them save three syscalls.
pub async fn relay(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    counters: (&Counter, &Counter),
    idle: Duration,
    upstream_keepalive: Duration,
    cancel: impl std::future::Future<Output = ()>,
) -> CopyResult {
    let activity = Activity::new();
    let upstream_fd = upstream.as_raw_fd();
    let arm_keepalive = move || {
        // SAFETY: `upstream` owns this descriptor and stays borrowed, so open, until relay
        // returns; the closure runs inside relay. (split() holds the stream itself.)
        let fd = unsafe { BorrowedFd::borrow_raw(upstream_fd) };
        if let Err(err) = SockRef::from(&fd).set_tcp_keepalive(&keepalive(upstream_keepalive)) {
            tracing::debug!(%err, "cannot set TCP keepalive upstream");
        }
    };
    let one_side_done = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut dr, mut dw) = downstream.split();
    let (mut ur, mut uw) = upstream.split();
    let both = async {
        // try_join: an error on either side ends both; a clean EOF waits for the other side.
        tokio::try_join!(
            pump(
                &mut dr,
                &mut uw,
                counters.0,
                &sent,
                &activity,
                &one_side_done
            ),
            pump(
                &mut ur,
                &mut dw,
                counters.1,
                &received,
                &activity,
                &one_side_done
            ),
        )
    };
    let end = tokio::select! {
        res = both => match res {
            Ok(_) => CopyEnd::Closed,
            Err(err) => CopyEnd::Error(err),
        },
        _ = activity.idle_for(idle, Some((upstream_keepalive, arm_keepalive))) => CopyEnd::Idle,
        _ = cancel => CopyEnd::Cancelled,
    };
    CopyResult {
        to_upstream: sent.load(Ordering::Relaxed),
        to_downstream: received.load(Ordering::Relaxed),
        end,
    }
}

thread_local! {
    /// Small buffers lent to connections while bytes are moving, so idle connections hold none.
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}
const POOL_MAX: usize = 1024;

fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; INITIAL_BUFFER])
}

fn give(b: Vec<u8>) {
    if b.len() == INITIAL_BUFFER {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(b);
            }
        });
    }
}

async fn pump(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    writer: &mut tokio::net::tcp::WriteHalf<'_>,
    counter: &Counter,
    total: &AtomicU64,
    activity: &Activity,
    one_side_done: &AtomicBool,
) -> io::Result<()> {
    let mut buf: Option<Vec<u8>> = None;
    let mut moved: u64 = 0;
    loop {
        if buf.is_none() {
            // Hold no buffer while the connection is quiet. (poll_read_ready keeps the waker in
            // the socket's own slot; `readable()` would keep a 168-byte waiter in this future,
            // for every idle connection.)
            std::future::poll_fn(|cx| reader.as_ref().poll_read_ready(cx)).await?;
        }
        let b = buf.get_or_insert_with(take);
        // AsyncRead (not try_read): a short read clears tokio's readiness, so the next
        // readable() waits for the kernel instead of costing an extra EAGAIN recv.
        let n = reader.read(b).await?;
        if n == 0 {
            if let Some(b) = buf.take() {
                give(b);
            }
            if one_side_done.swap(true, Ordering::Relaxed) {
                // The other direction ended first: the relay is over, and closing the socket
                // right after sends this FIN without a shutdown call of its own.
                return Ok(());
            }
            return match writer.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(()),
            };
        }
        writer.write_all(&b[..n]).await?;
        activity.touch();
        counter.increment(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
        moved += n as u64;
        if n == b.len() {
            if moved >= JUMBO_AFTER && b.len() < JUMBO_BUFFER {
                b.resize(JUMBO_BUFFER, 0);
            } else if moved >= LARGE_AFTER && b.len() < LARGE_BUFFER {
                b.resize(LARGE_BUFFER, 0);
            }
        } else if b.len() == INITIAL_BUFFER {
            // A short read: the socket is probably drained. Hand the buffer back while we wait.
            if let Some(b) = buf.take() {
                give(b);
            }
        }
    }
}

/// When bytes last moved, shared by both directions of one connection.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`; wakes at most once per idle period, and
    /// once `after` the start to call `at` (one timer either way).
    async fn idle_for(&self, idle: Duration, mut at: Option<(Duration, impl FnOnce())>) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if let Some(after) = at.as_ref().map(|(after, _)| *after) {
                let due = self.start + after;
                if due < deadline {
                    tokio::time::sleep_until(due).await;
                    if let Some((_, call)) = at.take() {
                        call();
                    }
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
