//! One direction of a WAN link: read a chunk, stamp it with the time it may leave the far
//! end (`read time + one-way delay`, later if the link is busy), queue it, and write it as
//! its own write when that time comes. Chunks are never merged or split, so the receiver
//! sees the sender's timing shifted by the delay.
//!
//! Memory is bounded by a byte budget: a chunk is read only after reserving room for a
//! full read; when the queue is full the reader stops reading and TCP pushes back on the
//! sender, like a router whose buffer is full.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::timer::Alarm;

/// Largest single read (and so the largest chunk).
pub const READ_MAX: usize = 16 << 10;
/// Bytes a direction may hold in its queue (64 full reads).
pub const QUEUE_BYTES: usize = 64 * READ_MAX;
/// Chunks a direction may hold in its queue.
const QUEUE_SEGMENTS: usize = 1024;

/// Per-link counters, shared by every connection's pipes.
#[derive(Debug, Default)]
pub struct PipeCounters {
    pub bytes: AtomicU64,
    pub peak_queued: AtomicUsize,
}

/// How a direction delays: one-way delay, jitter, bandwidth, and when the connection
/// may first carry data.
#[derive(Debug, Clone)]
pub struct Shape {
    pub delay: Duration,
    pub jitter: Duration,
    pub bytes_per_sec: Option<u64>,
    /// Nothing enters the link before this instant (emulates TCP's handshake round trip).
    pub open_at: Instant,
}

struct Segment {
    due: Instant,
    /// Empty: the sender half-closed (FIN), delivered in order after the data.
    data: Bytes,
}

/// Copies `from` to `to` with the delay of `shape`, until `from` ends (the FIN is passed
/// on) or either side fails.
pub async fn run<R, W>(
    mut from: R,
    mut to: W,
    shape: Shape,
    mut rng: StdRng,
    counters: Arc<PipeCounters>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let budget = Semaphore::new(QUEUE_BYTES);
    let queued = AtomicUsize::new(0);
    // The byte budget bounds the data; this bounds the per-chunk bookkeeping (tiny reads).
    let (tx, mut rx) = mpsc::channel::<Segment>(QUEUE_SEGMENTS);

    let reader = async {
        let mut buf = BytesMut::with_capacity(4 * READ_MAX);
        let mut link_free = shape.open_at;
        let mut last_due = shape.open_at;
        loop {
            let permit = budget
                .acquire_many(READ_MAX as u32)
                .await
                .map_err(std::io::Error::other)?;
            if buf.capacity() - buf.len() < READ_MAX {
                // Reclaims the arena once the writer has dropped earlier chunks.
                buf.reserve(READ_MAX);
            }
            let n = from.read_buf(&mut (&mut buf).limit(READ_MAX)).await?;
            let now = Instant::now();
            let due = schedule(&shape, &mut rng, now, n, &mut link_free, &mut last_due);
            if n == 0 {
                drop(permit);
                let _ = tx
                    .send(Segment {
                        due,
                        data: Bytes::new(),
                    })
                    .await;
                return Ok::<_, std::io::Error>(());
            }
            // Keep exactly n bytes of budget until the writer has written them.
            permit.forget();
            budget.add_permits(READ_MAX - n);
            let now_queued = queued.fetch_add(n, Ordering::Relaxed) + n;
            counters
                .peak_queued
                .fetch_max(now_queued, Ordering::Relaxed);
            let data = buf.split().freeze();
            if tx.send(Segment { due, data }).await.is_err() {
                return Ok(()); // the writer failed; its error is reported
            }
        }
    };

    let writer = async {
        let mut alarm = Alarm::new();
        while let Some(seg) = rx.recv().await {
            alarm.sleep_until(seg.due).await;
            if seg.data.is_empty() {
                to.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            to.write_all(&seg.data).await?;
            let n = seg.data.len();
            drop(seg);
            queued.fetch_sub(n, Ordering::Relaxed);
            budget.add_permits(n);
            counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    };

    tokio::try_join!(reader, writer).map(|_| ())
}

/// When a chunk of `n` bytes read at `now` may leave the far end.
fn schedule(
    shape: &Shape,
    rng: &mut StdRng,
    now: Instant,
    n: usize,
    link_free: &mut Instant,
    last_due: &mut Instant,
) -> Instant {
    // Enters the link when read, once the connection is open and the link is free.
    let enter = now.max(*link_free);
    let sent = match shape.bytes_per_sec {
        Some(bps) if bps > 0 => enter + Duration::from_secs_f64(n as f64 / bps as f64),
        _ => enter,
    };
    *link_free = sent;
    let delay = if shape.jitter.is_zero() {
        shape.delay
    } else {
        let j = shape.jitter.as_micros() as i64;
        let d = shape.delay.as_micros() as i64 + rng.random_range(-j..=j);
        Duration::from_micros(d.max(0) as u64)
    };
    // TCP delivers in order: jitter never lets a chunk overtake the one before it.
    let due = (sent + delay).max(*last_due);
    *last_due = due;
    due
}
