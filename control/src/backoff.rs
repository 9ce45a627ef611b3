//! Exponential backoff with jitter for kube-runtime's watcher (its `Backoff` trait), quicker
//! to retry than kube's client-go-style default so a returning API server is picked up fast.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::runtime::utils::Backoff;

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
}

impl Default for JitteredBackoff {
    fn default() -> Self {
        JitteredBackoff::new(Duration::from_millis(100), Duration::from_secs(30))
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

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}
