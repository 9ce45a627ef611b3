//! Relaying bytes both ways between two TCP connections.
//!
//! Each direction reads into its own buffer and writes what it read at once: nothing waits to
//! fill a buffer, so a 1-byte token leaves as soon as it arrives. Buffers start small (most
//! east-west connections are small RPCs or slow token streams) and grow, at most twice, for
//! connections that move a lot of data. A direction holds its buffer only between a read and
//! the end of its write: once the socket is drained the buffer goes back to a per-thread pool
//! of its size, so a quiet connection holds none, whatever it moved before. EOF on one side is
//! passed on as a half-close while the other direction keeps flowing.
//!
//! A direction that carries bulk (`SPLICE_AFTER` bytes moved in reads that filled the buffer)
//! switches to `splice(2)` through a pooled pipe ([`pipe`]), so its bytes are not copied into
//! the proxy and out again. It still moves whatever has arrived at once, so it behaves like the
//! copy path: only cheaper per byte.
//!
//! When the engine threads could be started ([`engine`]), a connection with a spliced direction
//! then leaves the runtime altogether, at a moment when neither direction holds a byte: a
//! plain epoll loop moves its bulk at a fraction of what waking a task costs per wake-up.
//!
//! The copy path also follows the TLS record headers of what it relayed, for token timing
//! ([`crate::token_timing`]); a spliced direction is no longer followed (bulk is not token
//! streaming).

mod engine;
mod pipe;

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use eastwest_routes::Splice;
use metrics::Counter;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::connect::keepalive;
use crate::metrics::token::StreamMetrics;
use crate::token_timing::{ConnectionTiming, Way};
use pipe::Pipe;

/// Buffer sizes, and how many bytes a direction must have moved to use each.
const SIZES: [(usize, u64); 3] = [
    (4 * 1024, 0),
    (64 * 1024, 128 * 1024),
    (256 * 1024, 8 * 1024 * 1024),
];
/// Idle buffers kept per thread and size (4 MiB, 4 MiB, 4 MiB at most); beyond that they are
/// freed. Only directions between a read and the end of its write hold one.
const POOL_MAX: [usize; 3] = [1024, 64, 16];
/// With `splice: auto`, a direction splices once it has moved this much in reads that filled
/// its buffer: bulk, not a stream of small messages (those never fill a 4 KiB buffer).
const SPLICE_AFTER: u64 = 64 * 1024;

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

/// How a relay moves bytes, from the upstream config.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// No byte either way for this long ends the relay.
    pub idle: Duration,
    pub upstream_keepalive: Duration,
    pub splice: Splice,
    /// A response record gap above this is a stall.
    pub stall_threshold: Duration,
    /// `telemetry.token_timing`: follow the TLS records relayed.
    pub token_timing: bool,
}

/// One direction's share of the relay: where its bytes are counted, and the state both share.
struct Direction<'a> {
    counter: &'a Counter,
    total: &'a AtomicU64,
    activity: &'a Activity,
    one_side_done: &'a AtomicBool,
    splice: Splice,
    timing: &'a ConnectionTiming<'a>,
    way: Way,
    handoff: &'a Handoff,
}

/// Whether the connection moves to an engine thread, and when it may: only while neither
/// direction holds a byte between its read and its write.
struct Handoff {
    /// `splice: auto`: the bulk threads may take it (started on the first handoff).
    allowed: bool,
    /// A direction carries bulk.
    wanted: AtomicBool,
    /// Per direction (`Way as usize`): waiting for its socket with nothing held.
    resting: [AtomicBool; 2],
    /// Per direction: EOF passed on.
    ended: [AtomicBool; 2],
}

/// Why a direction stopped before its EOF.
enum Stop {
    Io(io::Error),
    /// Both directions hold nothing and one carries bulk: the engine takes the connection.
    Handoff,
}

impl From<io::Error> for Stop {
    fn from(err: io::Error) -> Self {
        Stop::Io(err)
    }
}

/// Relays until both directions end, an error, `idle` without traffic, or `cancel`.
///
/// The upstream socket gets its TCP keepalive only once the connection has lived
/// `upstream_keepalive`: probes can't start before then anyway, and Linux counts the idle time
/// from the last segment received, so probing is exactly as if it had been set at connect,
/// while the short connections that are most of them save three syscalls.
pub async fn relay(
    downstream: TcpStream,
    upstream: TcpStream,
    counters: (&Counter, &Counter),
    stream: &StreamMetrics,
    config: RelayConfig,
    cancel: impl Future<Output = ()>,
) -> CopyResult {
    let RelayConfig {
        idle,
        upstream_keepalive,
        splice,
        stall_threshold,
        token_timing,
    } = config;
    let mut cancel = std::pin::pin!(cancel);
    let (mut downstream, mut upstream) = (downstream, upstream);
    let activity = Activity::new();
    let timing = ConnectionTiming::new(stream, stall_threshold, token_timing);
    let keepalive_armed = AtomicBool::new(false);
    let upstream_fd = upstream.as_raw_fd();
    let arm_keepalive = || {
        keepalive_armed.store(true, Ordering::Relaxed);
        // SAFETY: `upstream` owns this descriptor and stays borrowed, so open, until relay
        // returns; the closure runs inside relay. (split() holds the stream itself.)
        let fd = unsafe { BorrowedFd::borrow_raw(upstream_fd) };
        set_keepalive(fd, upstream_keepalive);
    };
    let one_side_done = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let handoff = Handoff {
        allowed: splice == Splice::Auto,
        wanted: AtomicBool::new(false),
        resting: Default::default(),
        ended: Default::default(),
    };
    let end = {
        let (mut dr, mut dw) = downstream.split();
        let (mut ur, mut uw) = upstream.split();
        let both = async {
            // try_join: an error on either side ends both; a clean EOF waits for the other side.
            tokio::try_join!(
                pump(
                    &mut dr,
                    &mut uw,
                    Direction {
                        counter: counters.0,
                        total: &sent,
                        activity: &activity,
                        one_side_done: &one_side_done,
                        splice,
                        timing: &timing,
                        way: Way::Up,
                        handoff: &handoff,
                    },
                ),
                pump(
                    &mut ur,
                    &mut dw,
                    Direction {
                        counter: counters.1,
                        total: &received,
                        activity: &activity,
                        one_side_done: &one_side_done,
                        splice,
                        timing: &timing,
                        way: Way::Down,
                        handoff: &handoff,
                    },
                ),
            )
        };
        tokio::select! {
            res = both => match res {
                Ok(_) => Some(CopyEnd::Closed),
                Err(Stop::Io(err)) => Some(CopyEnd::Error(err)),
                Err(Stop::Handoff) => None,
            },
            _ = activity.idle_for(idle, Some((upstream_keepalive, arm_keepalive))) => Some(CopyEnd::Idle),
            _ = &mut cancel => Some(CopyEnd::Cancelled),
        }
    };
    let mut result = CopyResult {
        to_upstream: sent.load(Ordering::Relaxed),
        to_downstream: received.load(Ordering::Relaxed),
        end: CopyEnd::Closed,
    };
    // A handoff is only asked for once the engines run (see `rest`); a relay that ended here
    // must not start them.
    let engines = if end.is_none() {
        engine::engines()
    } else {
        None
    };
    match (end, engines) {
        (Some(end), _) => result.end = end,
        (None, Some(engines)) => {
            let armed = keepalive_armed.load(Ordering::Relaxed);
            let handed = (|| {
                let sides = [downstream.into_std()?, upstream.into_std()?];
                if !armed {
                    // The engine keeps no timer for it: bulk connections get it now.
                    set_keepalive(sides[1].as_fd(), upstream_keepalive);
                }
                Ok::<_, io::Error>(engine::Handed {
                    sides,
                    ended: handoff.ended.each_ref().map(|e| e.load(Ordering::Relaxed)),
                    counters: [counters.0.clone(), counters.1.clone()],
                    idle,
                })
            })();
            match handed {
                Ok(handed) => {
                    let mut ticket = engine::hand_over(engines, handed);
                    let verdict = tokio::select! {
                        verdict = &mut ticket.verdict => verdict,
                        _ = &mut cancel => {
                            ticket.cancel();
                            (&mut ticket.verdict).await
                        }
                    };
                    match verdict {
                        Ok(verdict) => {
                            result.to_upstream += verdict.moved[0];
                            result.to_downstream += verdict.moved[1];
                            result.end = verdict.end;
                        }
                        Err(_) => {
                            result.end = CopyEnd::Error(io::Error::other("bulk relay thread ended"))
                        }
                    }
                }
                Err(err) => result.end = CopyEnd::Error(err),
            }
        }
        (None, None) => {
            result.end = CopyEnd::Error(io::Error::other("handoff without bulk threads"))
        }
    }
    result
}

fn set_keepalive(fd: BorrowedFd<'_>, after: Duration) {
    if let Err(err) = SockRef::from(&fd).set_tcp_keepalive(&keepalive(after)) {
        tracing::debug!(%err, "cannot set TCP keepalive upstream");
    }
}

thread_local! {
    /// Buffers lent to connections while bytes are moving, one pool per size.
    static POOLS: std::cell::RefCell<[Vec<Vec<u8>>; 3]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// The buffer size index for a direction that has moved `moved` bytes.
fn tier(moved: u64) -> usize {
    SIZES
        .iter()
        .rposition(|&(_, after)| moved >= after)
        .unwrap_or(0)
}

fn take(tier: usize) -> Vec<u8> {
    POOLS
        .with(|p| p.borrow_mut()[tier].pop())
        .unwrap_or_else(|| vec![0u8; SIZES[tier].0])
}

fn give(b: Vec<u8>) {
    let Some(tier) = SIZES.iter().position(|&(size, _)| size == b.len()) else {
        return;
    };
    POOLS.with(|p| {
        let pool = &mut p.borrow_mut()[tier];
        if pool.len() < POOL_MAX[tier] {
            pool.push(b);
        }
    });
}

async fn pump(
    reader: &mut ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    dir: Direction<'_>,
) -> Result<(), Stop> {
    let mut buf: Option<Vec<u8>> = None;
    let mut moved: u64 = 0;
    // Bytes moved in reads that filled the buffer: what tells bulk from small messages.
    let mut bulk: u64 = 0;
    let mut records = dir.timing.follower(dir.way);
    loop {
        if dir.splice != Splice::Off && bulk >= SPLICE_AFTER {
            if let Some(b) = buf.take() {
                give(b);
            }
            // Spliced bytes are never seen here: stop following (and won't resume in sync).
            records.stop();
            dir.handoff.wanted.store(true, Ordering::Relaxed);
            // Boxed: its state would otherwise enlarge every connection's future, also the
            // idle ones that never splice (one allocation per direction that switches).
            if Box::pin(splice_until_eof(reader, writer, &dir)).await? {
                return end(writer, &dir).await;
            }
            // No pipe to be had (fd limit): copy, and try again after as much bulk again.
            bulk = 0;
        }
        if buf.is_none() {
            // Hold no buffer while the connection is quiet. (poll_read_ready keeps the waker in
            // the socket's own slot; `readable()` would keep a 168-byte waiter in this future,
            // for every idle connection.)
            rest(reader.as_ref(), &dir).await?;
        }
        let b = buf.get_or_insert_with(|| take(tier(moved)));
        // AsyncRead (not try_read): a short read clears tokio's readiness, so the next
        // readable() waits for the kernel instead of costing an extra EAGAIN recv.
        let n = reader.read(b).await?;
        if n == 0 {
            if let Some(b) = buf.take() {
                give(b);
            }
            return end(writer, &dir).await;
        }
        writer.write_all(&b[..n]).await?;
        // After the write: following the records never delays a byte.
        dir.timing.relayed(&mut records, &b[..n]);
        dir.moved(n);
        moved += n as u64;
        // A full read: more is probably waiting, so keep reading into this buffer unless the
        // direction has earned a bigger one (taken at the next read). A short read: the
        // socket is probably drained; hand the buffer back while we wait.
        if n == b.len() {
            bulk += n as u64;
        }
        if n < b.len() || SIZES[tier(moved)].0 != b.len() {
            if let Some(b) = buf.take() {
                give(b);
            }
        }
    }
}

/// Waits for `reader` holding nothing. First, if the connection is wanted by an engine thread
/// and the other direction holds nothing either (or has ended), stops for the handoff.
async fn rest(reader: &TcpStream, dir: &Direction<'_>) -> Result<(), Stop> {
    let handoff = dir.handoff;
    let (me, other) = (dir.way as usize, 1 - dir.way as usize);
    if handoff.allowed
        && handoff.wanted.load(Ordering::Relaxed)
        && (handoff.resting[other].load(Ordering::Relaxed)
            || handoff.ended[other].load(Ordering::Relaxed))
        && engine::engines().is_some()
    {
        return Err(Stop::Handoff);
    }
    handoff.resting[me].store(true, Ordering::Relaxed);
    let ready = std::future::poll_fn(|cx| reader.poll_read_ready(cx)).await;
    handoff.resting[me].store(false, Ordering::Relaxed);
    Ok(ready?)
}

/// Moves bytes socket → pipe → socket until EOF (`true`), or `false` if no pipe can be had.
/// Like the copy path it sends on whatever arrived before reading again, holds its pipe only
/// while bytes move, and counts bytes once the destination has taken them.
async fn splice_until_eof(
    reader: &ReadHalf<'_>,
    writer: &WriteHalf<'_>,
    dir: &Direction<'_>,
) -> Result<bool, Stop> {
    let (from, to) = (reader.as_ref(), writer.as_ref());
    let mut lent: Option<Pipe> = None;
    loop {
        let pipe = match &mut lent {
            Some(pipe) => pipe,
            None => {
                rest(from, dir).await?;
                match Pipe::take() {
                    Ok(pipe) => lent.insert(pipe),
                    Err(err) => {
                        tracing::debug!(%err, "no pipe for splice; copying");
                        return Ok(false);
                    }
                }
            }
        };
        // try_io clears tokio's readiness on EAGAIN, so the wait above sleeps until the kernel
        // has more. The pipe is empty here: all of its room is for this read.
        match from.try_io(Interest::READABLE, || pipe.fill(from)) {
            Ok(0) => {
                if let Some(pipe) = lent.take() {
                    pipe.give();
                }
                return Ok(true);
            }
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                // Drained: wait for more without holding the pipe.
                if let Some(pipe) = lent.take() {
                    pipe.give();
                }
                continue;
            }
            Err(err) => return Err(err.into()),
        }
        while pipe.held() > 0 {
            match to.try_io(Interest::WRITABLE, || pipe.drain(to)) {
                Ok(n) => dir.moved(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}

/// EOF from the reader: pass it on as a half-close, unless the other direction ended first.
async fn end(writer: &mut WriteHalf<'_>, dir: &Direction<'_>) -> Result<(), Stop> {
    if dir.one_side_done.swap(true, Ordering::Relaxed) {
        // The other direction ended first: the relay is over, and closing the socket right
        // after sends this FIN without a shutdown call of its own.
        return Ok(());
    }
    match writer.shutdown().await {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e.into()),
        _ => {
            dir.handoff.ended[dir.way as usize].store(true, Ordering::Relaxed);
            Ok(())
        }
    }
}

impl Direction<'_> {
    /// `n` bytes reached the destination.
    fn moved(&self, n: usize) {
        self.activity.touch();
        self.counter.increment(n as u64);
        self.total.fetch_add(n as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests;
