//! Token timing metrics (see `crate::token_timing`): per route, how long a response's first
//! record took after its request and the gaps between its records, as seen at the gateway.
//! Kept apart from the other families so each block has one owner.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

pub const FIRST_RESPONSE: &str = "eastwest_stream_first_response_seconds";
pub const RECORD_GAP: &str = "eastwest_stream_record_gap_seconds";
pub const STALLS: &str = "eastwest_stream_stalls_total";

/// LLM streaming: inter-token gaps from well under a millisecond (tokens batched by the
/// server) to a thinking model's tens of seconds; TTFT from milliseconds to a minute.
const BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub(crate) fn buckets(b: PrometheusBuilder) -> Result<PrometheusBuilder, BuildError> {
    b.set_buckets_for_metric(Matcher::Full(FIRST_RESPONSE.into()), &BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(RECORD_GAP.into()), &BUCKETS)
}

pub(crate) fn describe() {
    describe_histogram!(
        FIRST_RESPONSE,
        Unit::Seconds,
        "Time from a request's last TLS record to its response's first record, as relayed by \
         the gateway (TTFT at the gateway), by route. Read from record headers, not decrypted."
    );
    describe_histogram!(
        RECORD_GAP,
        Unit::Seconds,
        "Gaps between consecutive TLS records of a streaming response (inter-token latency at \
         the gateway), by route."
    );
    describe_counter!(
        STALLS,
        "Response record gaps above upstream.stall_threshold, by route."
    );
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

/// One route's token timing handles, registered once per route.
#[derive(Debug)]
pub struct StreamMetrics {
    first_response: Histogram,
    record_gap: Histogram,
    stalls: Counter,
}

impl StreamMetrics {
    pub fn new(route: &str) -> Self {
        StreamMetrics {
            first_response: histogram!(FIRST_RESPONSE, "route" => route.to_string()),
            record_gap: histogram!(RECORD_GAP, "route" => route.to_string()),
            stalls: counter!(STALLS, "route" => route.to_string()),
        }
    }

    #[cfg(test)]
    pub fn noop() -> Self {
        StreamMetrics {
            first_response: Histogram::noop(),
            record_gap: Histogram::noop(),
            stalls: Counter::noop(),
        }
    }

    pub fn first_response(&self, d: Duration) {
        self.first_response.record(d.as_secs_f64());
        if let Some(observe) = OBSERVER.get() {
            observe(StreamEvent::FirstResponse(d));
        }
    }

    pub fn gap(&self, d: Duration, stalled: bool) {
        self.record_gap.record(d.as_secs_f64());
        if stalled {
            self.stalls.increment(1);
        }
        if let Some(observe) = OBSERVER.get() {
            observe(StreamEvent::Gap(d));
        }
    }
}
