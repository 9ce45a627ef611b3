//! Token timing metrics (see `crate::token_timing`): per route, how long a response's first
//! token record took after its request and the gaps between its records, as seen at the
//! gateway. Kept apart from the other families so each block has one owner.
//!
//! These are our own fixed-bucket histograms, not the `metrics` crate's: its Prometheus
//! exporter keeps every histogram sample until the next scrape (CPU per sample, and memory
//! growing with the records relayed between scrapes), and a token stream records one sample
//! per TLS record. Here a sample is a branch-free bucket search over 20 bounds and two `Relaxed`
//! adds (records that came in one read share one add): no allocation, no lock. [`render`] appends them to the exporter's text on /metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const FIRST_RESPONSE: &str = "eastwest_stream_first_response_seconds";
pub const RECORD_GAP: &str = "eastwest_stream_record_gap_seconds";
pub const STALLS: &str = "eastwest_stream_stalls_total";

const FIRST_RESPONSE_HELP: &str = "Time from a request's last TLS record to its response's \
    first token record, as relayed by the gateway (TTFT at the gateway), by route: the second \
    record of a streaming response (the first is taken for the HTTP headers), the only record \
    of a one-record response. Read from record headers, not decrypted.";
const RECORD_GAP_HELP: &str = "Gaps between consecutive token records of a streaming response \
    (inter-token latency at the gateway), by route.";
const STALLS_HELP: &str = "Response record gaps above upstream.stall_threshold, by route.";

/// LLM streaming: inter-token gaps from well under a millisecond (tokens batched by the
/// server) to a thinking model's tens of seconds; TTFT from milliseconds to a minute.
const BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// [`BUCKETS`] in nanoseconds, the unit samples are counted in.
const BOUNDS_NS: [u64; 20] = {
    let mut ns = [0u64; 20];
    let mut i = 0;
    while i < BUCKETS.len() {
        ns[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// One histogram: a counter per bucket (the last is +Inf, not cumulative; rendering sums
/// them, and the sum of all is the count) and the sum in nanoseconds.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// The bucket of a sample of `ns`: the first bound >= ns (`le` is inclusive), or +Inf. A count
/// of the bounds below it: no branch to mispredict, and the compiler vectorises it.
fn bucket(ns: u64) -> usize {
    BOUNDS_NS.iter().map(|&b| usize::from(b < ns)).sum()
}

impl Histogram {
    fn record(&self, d: Duration) {
        // u64 nanoseconds last 584 years; a longer gap saturates into +Inf.
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// `n` samples of 0 at once (records that came in one read).
    fn record_zeros(&self, n: u64) {
        self.buckets[0].fetch_add(n, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, route: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{route=\"{route}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{route=\"{route}\"}} {cumulative}");
    }
}

/// One route's token timing counters, shared by every connection of the route.
#[derive(Debug, Default)]
struct RouteStreams {
    first_response: Histogram,
    record_gap: Histogram,
    stalls: AtomicU64,
}

/// Every route's counters by route name: written when a route's metrics are first made (a
/// route table applied), read by a scrape; never touched on the data path. A route that comes
/// back after a reload gets its old counters, so its series stay monotonic.
static ROUTES: Mutex<BTreeMap<String, Arc<RouteStreams>>> = Mutex::new(BTreeMap::new());

fn routes() -> std::sync::MutexGuard<'static, BTreeMap<String, Arc<RouteStreams>>> {
    // A panic while holding the lock left the map whole (inserts only): keep using it.
    ROUTES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The three families in Prometheus text format, one block per family (blank line between),
/// series sorted by route; [`crate::metrics::render`] sorts the families with the rest.
pub(crate) fn render() -> String {
    let routes = routes();
    if routes.is_empty() {
        return String::new();
    }
    let labelled: Vec<(String, &RouteStreams)> = routes
        .iter()
        .map(|(route, s)| (escape_label(route), &**s))
        .collect();
    let mut out = String::with_capacity(512 + labelled.len() * 3000);
    let _ = writeln!(out, "# HELP {FIRST_RESPONSE} {FIRST_RESPONSE_HELP}");
    let _ = writeln!(out, "# TYPE {FIRST_RESPONSE} histogram");
    for (route, s) in &labelled {
        s.first_response.render(&mut out, FIRST_RESPONSE, route);
    }
    out.push('\n');
    let _ = writeln!(out, "# HELP {RECORD_GAP} {RECORD_GAP_HELP}");
    let _ = writeln!(out, "# TYPE {RECORD_GAP} histogram");
    for (route, s) in &labelled {
        s.record_gap.render(&mut out, RECORD_GAP, route);
    }
    out.push('\n');
    let _ = writeln!(out, "# HELP {STALLS} {STALLS_HELP}");
    let _ = writeln!(out, "# TYPE {STALLS} counter");
    for (route, s) in &labelled {
        let _ = writeln!(
            out,
            "{STALLS}{{route=\"{route}\"}} {}",
            s.stalls.load(Ordering::Relaxed)
        );
    }
    out.push('\n');
    out
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One observation, for an observer installed with [`observe_streams`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StreamEvent {
    FirstResponse(Duration),
    Gap(Duration),
}

type Observer = Box<dyn Fn(StreamEvent) + Send + Sync>;
static OBSERVER: OnceLock<Observer> = OnceLock::new();

/// Calls `observer` with every observation of every route, besides the histograms: exact
/// samples for the demo and tests, where bucket quantiles are too coarse. Once per process;
/// false if one is installed already.
pub fn observe_streams(observer: impl Fn(StreamEvent) + Send + Sync + 'static) -> bool {
    OBSERVER.set(Box::new(observer)).is_ok()
}

/// One route's token timing handle.
#[derive(Debug)]
pub struct StreamMetrics {
    route: Arc<RouteStreams>,
}

impl StreamMetrics {
    /// The route's counters, registered for /metrics (at zero) on first use.
    pub fn new(route: &str) -> Self {
        let route = routes().entry(route.to_string()).or_default().clone();
        StreamMetrics { route }
    }

    /// Counters that no scrape shows.
    #[cfg(test)]
    pub fn noop() -> Self {
        StreamMetrics {
            route: Arc::default(),
        }
    }

    pub fn first_response(&self, d: Duration) {
        self.route.first_response.record(d);
        if let Some(observe) = OBSERVER.get() {
            observe(StreamEvent::FirstResponse(d));
        }
    }

    pub fn gap(&self, d: Duration, stalled: bool) {
        self.route.record_gap.record(d);
        if stalled {
            self.route.stalls.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(observe) = OBSERVER.get() {
            observe(StreamEvent::Gap(d));
        }
    }

    /// `n` gaps of 0: records after the first of one read, which share its time.
    pub fn zero_gaps(&self, n: u64) {
        self.route.record_gap.record_zeros(n);
        if let Some(observe) = OBSERVER.get() {
            for _ in 0..n {
                observe(StreamEvent::Gap(Duration::ZERO));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_whose_bound_they_do_not_exceed() {
        let h = Histogram::default();
        for d in [
            Duration::ZERO,
            Duration::from_micros(100), // exactly the first bound: le is inclusive
            Duration::from_nanos(100_001),
            Duration::from_millis(3),
            Duration::from_secs(61),
            Duration::MAX,
        ] {
            h.record(d);
        }
        let mut out = String::new();
        h.render(&mut out, "t", "r");
        let line = |le: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("t_bucket{{route=\"r\",le=\"{le}\"}} ")))
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.to_string())
        };
        assert_eq!(line("0.0001").as_deref(), Some("2"), "{out}");
        assert_eq!(line("0.00025").as_deref(), Some("3"), "{out}");
        assert_eq!(line("0.005").as_deref(), Some("4"), "{out}");
        assert_eq!(line("60").as_deref(), Some("4"), "{out}");
        assert_eq!(line("+Inf").as_deref(), Some("6"), "{out}");
        assert!(out.contains("t_count{route=\"r\"} 6\n"), "{out}");
    }

    #[test]
    fn zero_gaps_counted_at_once_land_in_the_first_bucket() {
        let h = Histogram::default();
        h.record(Duration::from_millis(7));
        h.record_zeros(5);
        let mut out = String::new();
        h.render(&mut out, "t", "r");
        assert!(
            out.contains("t_bucket{route=\"r\",le=\"0.0001\"} 5\n"),
            "{out}"
        );
        assert!(
            out.contains("t_bucket{route=\"r\",le=\"0.01\"} 6\n"),
            "{out}"
        );
        assert!(out.contains("t_count{route=\"r\"} 6\n"), "{out}");
        assert!(out.contains("t_sum{route=\"r\"} 0.007\n"), "{out}");
    }

    #[test]
    fn the_bucket_is_the_first_bound_not_exceeded() {
        for ns in [
            0,
            1,
            99_999,
            100_000,
            100_001,
            7_000_000,
            60_000_000_000,
            u64::MAX,
        ] {
            assert_eq!(
                bucket(ns),
                BOUNDS_NS.partition_point(|&b| b < ns),
                "{ns} ns"
            );
        }
    }

    #[test]
    fn bounds_match_the_advertised_buckets() {
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(BOUNDS_NS[0], 100_000);
        assert_eq!(BOUNDS_NS[19], 60_000_000_000);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
