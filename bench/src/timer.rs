//! A sub-millisecond sleep: the WAN link's release times, `serve`'s token due times and
//! `run`'s request arrivals.
//!
//! tokio's timer wheel has 1 ms ticks and rounds deadlines up, so each delayed chunk would
//! leave 0–1 ms late in each direction (up to ~2 ms per round trip). This timer is one
//! thread sleeping on a condvar (the kernel's high-resolution timer, tens of µs late) that
//! wakes the waiting tasks. Each pipe owns one [`Alarm`] and re-arms it per chunk, so no
//! allocation per chunk.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

struct Entry {
    /// Generation of the last arming; the alarm has fired once `fired` reaches it.
    armed: AtomicU64,
    fired: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

struct Due {
    at: Instant,
    seq: u64,
    generation: u64,
    entry: Arc<Entry>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    // Reversed: BinaryHeap is a max-heap, the earliest deadline must be on top.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Due>,
    seq: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn shared() -> &'static Arc<Shared> {
    static TIMER: OnceLock<Arc<Shared>> = OnceLock::new();
    TIMER.get_or_init(|| {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let worker = shared.clone();
        // If the thread cannot start, alarms fall back to never firing early: see
        // `Alarm::sleep_until`, which also bounds the wait with tokio's timer.
        let spawned = std::thread::Builder::new()
            .name("precise-timer".into())
            .spawn(move || run(&worker));
        if let Err(err) = spawned {
            tracing::error!(%err, "starting the precise timer thread; falling back to tokio's timer");
        }
        shared
    })
}

fn run(shared: &Shared) {
    let mut fired: Vec<(Arc<Entry>, u64)> = Vec::new();
    let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let now = Instant::now();
        while queue.heap.peek().is_some_and(|d| d.at <= now) {
            if let Some(d) = queue.heap.pop() {
                fired.push((d.entry, d.generation));
            }
        }
        if !fired.is_empty() {
            // Wake outside the lock.
            drop(queue);
            for (entry, generation) in fired.drain(..) {
                entry.fired.fetch_max(generation, Ordering::SeqCst);
                let waker = entry.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(w) = waker {
                    w.wake();
                }
            }
            queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        queue = match queue.heap.peek().map(|d| d.at) {
            None => shared
                .changed
                .wait(queue)
                .unwrap_or_else(|p| p.into_inner()),
            Some(at) => {
                shared
                    .changed
                    .wait_timeout(queue, at.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

/// A reusable precise alarm; one per waiting task.
pub struct Alarm {
    entry: Arc<Entry>,
}

impl Alarm {
    pub fn new() -> Alarm {
        Alarm {
            entry: Arc::new(Entry {
                armed: AtomicU64::new(0),
                fired: AtomicU64::new(0),
                waker: Mutex::new(None),
            }),
        }
    }

    /// Completes at `deadline` (typically well under 0.1 ms late).
    pub async fn sleep_until(&mut self, deadline: tokio::time::Instant) {
        let at = deadline.into_std();
        if at <= Instant::now() {
            return;
        }
        let generation = self.entry.armed.fetch_add(1, Ordering::SeqCst) + 1;
        let shared = shared();
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.seq += 1;
            let seq = queue.seq;
            let earliest = queue.heap.peek().is_none_or(|d| at < d.at);
            queue.heap.push(Due {
                at,
                seq,
                generation,
                entry: self.entry.clone(),
            });
            if earliest {
                shared.changed.notify_one();
            }
        }
        let fired = Fired {
            entry: &self.entry,
            generation,
        };
        // tokio's timer as a backstop (1 ms coarser) in case the timer thread is missing.
        let backstop = tokio::time::sleep_until(deadline + std::time::Duration::from_millis(2));
        tokio::select! {
            biased;
            _ = fired => {}
            _ = backstop => {}
        }
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm::new()
    }
}

struct Fired<'a> {
    entry: &'a Entry,
    generation: u64,
}

impl Future for Fired<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.entry.fired.load(Ordering::SeqCst) >= self.generation {
            return Poll::Ready(());
        }
        *self.entry.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // Re-check: the timer may have fired between the load and storing the waker.
        if self.entry.fired.load(Ordering::SeqCst) >= self.generation {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant as TokioInstant;

    #[tokio::test]
    async fn fires_never_early_and_rearms() {
        let mut alarm = Alarm::new();
        for ms in [3u64, 1, 4] {
            let start = TokioInstant::now();
            alarm.sleep_until(start + Duration::from_millis(ms)).await;
            assert!(start.elapsed() >= Duration::from_millis(ms));
        }
    }

    #[tokio::test]
    async fn a_cancelled_sleep_does_not_end_the_next_one_early() {
        let mut alarm = Alarm::new();
        let start = TokioInstant::now();
        // Cancelled: its heap entry fires at 2 ms, while the next sleep waits for 20 ms.
        tokio::select! {
            biased; // poll (and so arm) the sleep first
            _ = alarm.sleep_until(start + Duration::from_millis(2)) => {}
            _ = std::future::ready(()) => {}
        }
        alarm.sleep_until(start + Duration::from_millis(20)).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn past_deadlines_return_at_once() {
        let mut alarm = Alarm::new();
        let past = TokioInstant::now();
        alarm.sleep_until(past).await;
    }
}
