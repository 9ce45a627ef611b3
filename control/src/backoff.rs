//! Retrying kube-runtime watchers: exponential backoff with jitter, reset only once a list has
//! succeeded, and error logs that do not flood.
//!
//! kube-runtime's own `.backoff()` resets on every event the watcher yields, and the watcher
//! yields `Init` before it even sends a (re)list: against an API server that is down every
//! watcher retried every 50–150 ms forever (bitdriftlabs/pulse#52 hit the same trap).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use kube::runtime::watcher;

pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one warning per watcher this often while its errors go on (the rest are debug).
const LOG_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct JitteredBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl JitteredBackoff {
    pub fn new(min: Duration, max: Duration) -> JitteredBackoff {
        JitteredBackoff {
            min,
            max,
            next: min,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for JitteredBackoff {
    fn default() -> Self {
        JitteredBackoff::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

/// A value in `[d/2, d]`; the clock's nanoseconds are random enough to spread reconnects.
pub fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let frac = f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(0.5 + frac / 2.0)
}

impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(jitter(d))
    }
}

/// A watcher error, and how long the stream waits before its next request.
#[derive(Debug)]
pub struct Retry {
    pub error: watcher::Error,
    pub delay: Duration,
}

/// `stream` (a kube-runtime watcher, without `.backoff()`), waiting `backoff` after each
/// error; the backoff starts over only when a list completes (`InitDone`).
pub fn until_listed<K: Send + 'static>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    backoff: JitteredBackoff,
) -> impl Stream<Item = Result<watcher::Event<K>, Retry>> + Send {
    let stream = stream.boxed();
    futures::stream::unfold(
        (stream, backoff, None::<Duration>),
        |(mut stream, mut backoff, wait)| async move {
            if let Some(d) = wait {
                tokio::time::sleep(d).await;
            }
            let (item, wait) = match stream.next().await? {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        backoff.reset();
                    }
                    (Ok(event), None)
                }
                Err(error) => {
                    let delay = backoff.next().unwrap_or(BACKOFF_MAX);
                    (Err(Retry { error, delay }), Some(delay))
                }
            };
            Some((item, (stream, backoff, wait)))
        },
    )
}

/// Rate limit for one watcher's error logs: the first error of a run is a warning, then at
/// most one per [`LOG_EVERY`] saying how many were not logged.
#[derive(Debug, Default)]
pub struct ErrorLog {
    last_warned: Option<Instant>,
    /// Errors since the last warning.
    quiet: u64,
    /// Errors since the last successful list.
    pub failures: u64,
}

impl ErrorLog {
    /// Counts an error; `Some(errors not logged since the last warning)` if this one is to be
    /// logged as a warning.
    pub fn error(&mut self) -> Option<u64> {
        self.failures += 1;
        let due = self.last_warned.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due {
            self.last_warned = Some(Instant::now());
            return Some(std::mem::take(&mut self.quiet));
        }
        self.quiet += 1;
        None
    }

    /// A list succeeded: returns how many errors preceded it (0: nothing to report).
    pub fn listed(&mut self) -> u64 {
        self.last_warned = None;
        self.quiet = 0;
        std::mem::take(&mut self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_starts_over_on_reset() {
        let mut b = JitteredBackoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.next().unwrap()).collect();
        for (i, w) in waits.iter().enumerate() {
            let nominal = (BACKOFF_MIN * 2u32.pow(i as u32)).min(BACKOFF_MAX);
            assert!(*w >= nominal / 2 && *w <= nominal, "wait {i}: {w:?}");
        }
        b.reset();
        assert!(b.next().unwrap() <= BACKOFF_MIN);
    }

    #[test]
    fn errors_are_warned_once_per_period_until_a_list_succeeds() {
        let mut log = ErrorLog::default();
        assert_eq!(log.error(), Some(0));
        assert_eq!(log.error(), None);
        assert_eq!(log.error(), None);
        assert_eq!(log.listed(), 3);
        assert_eq!(
            log.error(),
            Some(0),
            "a new run of errors is warned at once"
        );
    }
}
