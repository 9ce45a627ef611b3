//! Passive outlier detection for connect failures, Envoy-style: an endpoint whose connect is
//! refused, reset or times out is ejected for a growing interval, then probed by one
//! connection (half-open) before it takes traffic again.
//!
//! The state is a few atomics per endpoint, shared by every route snapshot that lists the
//! endpoint (see `routing::compile::Carry`), so it survives route updates and costs no lock.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use eastwest_routes::OutlierDetection;
use metrics::Gauge;

use crate::metrics as m;
use crate::routing::UpstreamSet;

/// Milliseconds on a process-wide monotonic clock, never 0 (0 means "not ejected").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // Starts at 1 so that a deadline is never the "not ejected" marker.
    1 + u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4)
}

/// What the balancer knows about one endpoint.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Connections open to (or being opened to) this endpoint.
    pub active: AtomicUsize,
    /// `now_ms()` until which the endpoint is ejected; 0 when it is in the pool. A deadline in
    /// the past means the ejection is over but no probe has succeeded yet.
    ejected_until: AtomicU64,
    /// Consecutive ejections without a successful connect in between (the interval multiplier).
    ejections: AtomicU32,
    /// Consecutive connect failures.
    failures: AtomicU32,
    /// The route's ejected-endpoints gauge, taken at the first ejection so that an endpoint
    /// dropped from the table while ejected leaves the gauge right.
    gauge: OnceLock<Gauge>,
}

/// Whether an endpoint may be picked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    InPool,
    Ejected,
    /// The ejection is over: the first connection to claim it probes the endpoint.
    Probe,
}

impl EndpointState {
    pub fn availability(&self, now: u64) -> Availability {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => Availability::InPool,
            until if until > now => Availability::Ejected,
            _ => Availability::Probe,
        }
    }

    /// Makes this connection the probe of an endpoint whose ejection is over. The claim keeps
    /// the endpoint ejected for another interval, so a probe that is abandoned (the client
    /// went away) only delays the next one.
    pub fn claim_probe(&self, now: u64, cfg: &OutlierDetection) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || until > now {
            return false;
        }
        let hold = ejection_length(cfg, self.ejections.load(Ordering::Relaxed).max(1));
        self.ejected_until
            .compare_exchange(until, now + hold, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// A connect succeeded: the endpoint is back in the pool, its history forgotten.
    pub fn connected(&self) {
        // Loads first: the common case (a healthy endpoint) writes nothing shared.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0
            && self.ejected_until.swap(0, Ordering::AcqRel) != 0
        {
            self.ejections.store(0, Ordering::Relaxed);
            if let Some(gauge) = self.gauge.get() {
                gauge.decrement(1.0);
            }
        }
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        if *self.ejected_until.get_mut() != 0 {
            if let Some(gauge) = self.gauge.get() {
                gauge.decrement(1.0);
            }
        }
    }
}

/// `base × n`, at most `max`.
fn ejection_length(cfg: &OutlierDetection, n: u32) -> u64 {
    ms(cfg.base_ejection_time)
        .saturating_mul(u64::from(n))
        .min(ms(cfg.max_ejection_time))
}

/// Why a connect failed, as the `reason` label of the ejection counter.
pub fn reason(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
        _ => "other",
    }
}

/// Records a failed connect to `set.upstreams[i]` and ejects it when due. `probe` says the
/// attempt was the half-open probe of an ejected endpoint: then it is ejected again for longer.
pub fn failed(
    set: &UpstreamSet,
    i: usize,
    probe: bool,
    cfg: &OutlierDetection,
    now: u64,
    why: &'static str,
) {
    if !cfg.enabled {
        return;
    }
    let state = &set.upstreams[i].state;
    // (A connect that began before the ejection may have ended it meanwhile.)
    if probe && state.is_ejected() {
        let n = state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        state
            .ejected_until
            .store(now + ejection_length(cfg, n), Ordering::Release);
        count_ejection(set, why);
        return;
    }
    let failures = state.failures.fetch_add(1, Ordering::Relaxed) + 1;
    if failures < cfg.consecutive_failures || state.is_ejected() || !may_eject(set, cfg) {
        return;
    }
    let until = now + ejection_length(cfg, 1);
    // Only one of several connections failing at once ejects it (and counts).
    if state
        .ejected_until
        .compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
    {
        state.ejections.store(1, Ordering::Relaxed);
        state
            .gauge
            .get_or_init(|| m::ejected_endpoints(&set.route))
            .increment(1.0);
        count_ejection(set, why);
    }
}

fn count_ejection(set: &UpstreamSet, why: &'static str) {
    tracing::info!(route = %set.route, reason = why, "upstream endpoint ejected");
    m::endpoint_ejections(&set.route, why).increment(1);
}

/// Envoy's max ejection percent: at most that share of the set ejected, though always one;
/// and never the last endpoint not ejected.
fn may_eject(set: &UpstreamSet, cfg: &OutlierDetection) -> bool {
    let n = set.upstreams.len();
    let ejected = set
        .upstreams
        .iter()
        .filter(|u| u.state.is_ejected())
        .count();
    let allowed = (n * cfg.max_ejection_percent as usize / 100).max(1);
    ejected < allowed && ejected + 1 < n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Target, Upstream};
    use std::sync::Arc;

    fn set(n: usize) -> UpstreamSet {
        let upstreams = (0..n)
            .map(|i| {
                let target = Target::Addr(([127, 0, 0, 1], 1000 + i as u16).into());
                Upstream::new(target, Arc::default(), None)
            })
            .collect();
        UpstreamSet::for_test(upstreams)
    }

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn ejection_grows_with_failed_probes_and_a_success_clears_it() {
        let (s, cfg) = (set(2), cfg());
        let st = &s.upstreams[0].state;
        failed(&s, 0, false, &cfg, 1000, "refused");
        assert_eq!(st.availability(1000), Availability::Ejected);
        assert_eq!(st.availability(10_999), Availability::Ejected);
        assert_eq!(st.availability(11_000), Availability::Probe);
        // One probe at a time.
        assert!(st.claim_probe(11_000, &cfg));
        assert!(!st.claim_probe(11_001, &cfg));
        failed(&s, 0, true, &cfg, 11_500, "timeout");
        // Second ejection: 2 × base.
        assert_eq!(st.availability(31_499), Availability::Ejected);
        assert!(st.claim_probe(31_500, &cfg));
        failed(&s, 0, true, &cfg, 31_500, "timeout");
        // Third: capped at max_ejection_time.
        assert_eq!(st.availability(56_499), Availability::Ejected);
        assert_eq!(st.availability(56_500), Availability::Probe);
        assert!(st.claim_probe(56_500, &cfg));
        st.connected();
        assert_eq!(st.availability(56_500), Availability::InPool);
        // History forgotten: the next ejection is base long again.
        failed(&s, 0, false, &cfg, 60_000, "refused");
        assert_eq!(st.availability(70_000), Availability::Probe);
    }

    #[test]
    fn never_ejects_the_last_endpoint_or_more_than_the_percentage() {
        let cfg = cfg();
        let one = set(1);
        failed(&one, 0, false, &cfg, 1, "refused");
        assert!(!one.upstreams[0].state.is_ejected());

        let two = set(2);
        failed(&two, 0, false, &cfg, 1, "refused");
        failed(&two, 1, false, &cfg, 1, "refused");
        assert!(two.upstreams[0].state.is_ejected());
        assert!(!two.upstreams[1].state.is_ejected());

        // 50% of 5 rounds down to 2.
        let five = set(5);
        for i in 0..5 {
            failed(&five, i, false, &cfg, 1, "refused");
        }
        let ejected = five.upstreams.iter().filter(|u| u.state.is_ejected());
        assert_eq!(ejected.count(), 2);
    }

    #[test]
    fn consecutive_failures_and_disabled() {
        let s = set(2);
        let cfg3 = OutlierDetection {
            consecutive_failures: 3,
            ..cfg()
        };
        failed(&s, 0, false, &cfg3, 1, "refused");
        failed(&s, 0, false, &cfg3, 1, "refused");
        s.upstreams[0].state.connected();
        failed(&s, 0, false, &cfg3, 1, "refused");
        failed(&s, 0, false, &cfg3, 1, "refused");
        assert!(!s.upstreams[0].state.is_ejected());
        failed(&s, 0, false, &cfg3, 1, "refused");
        assert!(s.upstreams[0].state.is_ejected());

        let off = OutlierDetection {
            enabled: false,
            ..cfg()
        };
        failed(&s, 1, false, &off, 1, "refused");
        assert!(!s.upstreams[1].state.is_ejected());
    }
}
