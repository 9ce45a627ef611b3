//! The end of the drain period, which every open connection waits for.
//!
//! A relay polls its wait on every wake-up (each read and write of each connection), and a
//! `CancellationToken`'s `cancelled()` takes two process-wide locks per poll (the token's
//! state and its waiter list), shared by all connections on all worker threads. Here a poll
//! is one atomic load: the waiter list is joined once, and again only if the task's waker
//! changes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};

use tokio_util::sync::CancellationToken;

pub(crate) struct HardStop {
    token: CancellationToken,
    /// Set before `token` is cancelled, so a woken waiter sees it.
    stopped: AtomicBool,
}

impl HardStop {
    pub fn new() -> Self {
        HardStop {
            token: CancellationToken::new(),
            stopped: AtomicBool::new(false),
        }
    }

    pub fn cancel(&self) {
        self.stopped.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// A token cancelled with this one, for tasks that take a `CancellationToken`. A child, so
    /// that only [`cancel`](Self::cancel) ends the waits of [`cancelled`](Self::cancelled).
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// Resolves once [`cancel`](Self::cancel) has been called.
    pub async fn cancelled(&self) {
        let mut wait = std::pin::pin!(self.token.cancelled());
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if self.stopped.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            // Already in the waiter list with this task's waker: `cancel` wakes it.
            if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            if wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            registered = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait polled many times before the stop (as a relay's is) still ends at the stop, and
    /// one started after it ends at once.
    #[tokio::test]
    async fn waits_end_at_cancel_however_often_polled() {
        let stop = std::sync::Arc::new(HardStop::new());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let waiter = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut cancelled = std::pin::pin!(stop.cancelled());
                let mut wakes = 0;
                loop {
                    tokio::select! {
                        _ = &mut cancelled => return wakes,
                        Some(()) = rx.recv() => wakes += 1,
                    }
                }
            })
        };
        for _ in 0..100 {
            tx.send(()).await.unwrap();
        }
        let child = stop.child_token();
        assert!(!child.is_cancelled());
        stop.cancel();
        let wakes = waiter.await.unwrap();
        assert!(wakes > 0, "the wait was never polled before the stop");
        assert!(child.is_cancelled());
        stop.cancelled().await;
    }
}
