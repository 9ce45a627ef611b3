//! Metric names, label values and the process-wide Prometheus recorder.
//!
//! Handles that the data path touches (byte counters, per-listener counters) are created once
//! per route or listener, so a chunk costs one atomic add and never a registry lookup.

use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, Counter, Gauge, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Token timing (TLS record cadence) families.
pub mod token;

pub const CONNECTIONS_OPENED: &str = "eastwest_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "eastwest_connections_closed_total";
pub const CONNECTIONS_ACTIVE: &str = "eastwest_connections_active";
pub const CONNECTIONS_REFUSED: &str = "eastwest_connections_refused_total";
/// `hbone` listeners: CONNECT streams, which `connections_*` (outer connections) do not count.
pub const HBONE_STREAMS_OPENED: &str = "eastwest_hbone_streams_opened_total";
pub const HBONE_STREAMS_CLOSED: &str = "eastwest_hbone_streams_closed_total";
pub const BYTES: &str = "eastwest_bytes_total";
pub const HELLO_DURATION: &str = "eastwest_client_hello_duration_seconds";
pub const CONNECT_DURATION: &str = "eastwest_upstream_connect_duration_seconds";
pub const CONNECT_FAILURES: &str = "eastwest_upstream_connect_failures_total";
pub const CONNECTION_DURATION: &str = "eastwest_connection_duration_seconds";
pub const CONFIG_VERSION: &str = "eastwest_config_version";
pub const ROUTE_TABLE_VERSION: &str = "eastwest_route_table_version";
pub const ROUTE_TABLE_UPDATED: &str = "eastwest_route_table_updated_timestamp_seconds";
pub const READY: &str = "eastwest_ready";
pub const CONFIG_RELOADS: &str = "eastwest_config_reloads_total";
pub const CONFIG_RELOAD_FAILURES: &str = "eastwest_config_reload_failures_total";
pub const ROUTE_TABLES_REJECTED: &str = "eastwest_route_tables_rejected_total";
pub const ACCEPT_ERRORS: &str = "eastwest_accept_errors_total";
pub const ENDPOINT_EJECTIONS: &str = "eastwest_endpoint_ejections_total";
pub const ENDPOINTS_EJECTED: &str = "eastwest_endpoints_ejected";
pub const IDENTITY_CERT_EXPIRY: &str = "eastwest_identity_cert_expiry_timestamp_seconds";
pub const IDENTITY_RENEWALS: &str = "eastwest_identity_cert_renewals_total";
pub const IDENTITY_ERRORS: &str = "eastwest_identity_cert_errors_total";

pub const TO_UPSTREAM: &str = "to_upstream";
pub const TO_DOWNSTREAM: &str = "to_downstream";

/// Installs the global recorder once per process and returns its handle for `/metrics`.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Latency buckets from 100 µs to 60 s; connection lifetimes up to a day.
        let latency = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let lifetime = [
            0.01,
            0.1,
            1.0,
            10.0,
            60.0,
            300.0,
            900.0,
            3600.0,
            4.0 * 3600.0,
            24.0 * 3600.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HELLO_DURATION.into()), &latency)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(CONNECT_DURATION.into()), &latency)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(CONNECTION_DURATION.into()), &lifetime)
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            // Only fails for empty bucket lists, which the constants above are not.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        crate::istio_metrics::describe();
        handle
    })
}

/// The exposition text for `/metrics`, in the same order on every scrape: families by name,
/// series by labels. metrics-exporter-prometheus renders from hash maps (a new order each
/// time, not fixed upstream as of 0.17), and scrapers and people diffing two scrapes
/// both do better with a stable one.
pub fn render(handle: &PrometheusHandle) -> String {
    // The exporter's blocks and ours (token timing) are both blank-line separated families.
    let mut text = handle.render();
    text.push_str("\n\n");
    text.push_str(&token::render());
    sorted_exposition(&text)
}

/// `text` with its families (blocks separated by a blank line, as the exporter writes them)
/// sorted by name and the samples of each family by series. A histogram's buckets, `_sum`
/// and `_count` of one label set share a sort key, and the sort is stable, so they stay
/// together and in order.
fn sorted_exposition(text: &str) -> String {
    let mut families: Vec<Vec<&str>> = text
        .split("\n\n")
        .map(|block| block.lines().filter(|l| !l.is_empty()).collect::<Vec<_>>())
        .filter(|lines| !lines.is_empty())
        .collect();
    for lines in &mut families {
        let samples_from = lines.iter().take_while(|l| l.starts_with('#')).count();
        lines[samples_from..].sort_by_key(|line| series_key(line));
    }
    families.sort_by_key(|lines| family_name(lines));
    let mut out = String::with_capacity(text.len() + 1);
    for lines in families {
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn family_name<'a>(lines: &[&'a str]) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("# TYPE "))
        .or_else(|| lines.first().copied())
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
}

/// A sample line's labels without `le` and `quantile`: what one series of a family shares.
fn series_key(line: &str) -> String {
    let Some((_, rest)) = line.split_once('{') else {
        return String::new();
    };
    let labels = rest.rsplit_once('}').map_or(rest, |(labels, _)| labels);
    let mut key = String::with_capacity(labels.len());
    let mut rest = labels;
    while !rest.is_empty() {
        // One `name="value"` pair; values escape `"` as `\"`.
        let mut end = rest.len();
        let mut in_value = false;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_value = !in_value,
                ',' if !in_value => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let pair = &rest[..end];
        if !(pair.starts_with("le=") || pair.starts_with("quantile=")) {
            key.push_str(pair);
            key.push(',');
        }
        rest = rest.get(end + 1..).unwrap_or_default();
    }
    key
}

/// Process-wide counters a dashboard alerts on, registered at 0 so a rate() or an increase()
/// has a series from the first scrape, before anything has happened.
pub(crate) fn register_at_zero() {
    for name in [
        CONFIG_RELOADS,
        CONFIG_RELOAD_FAILURES,
        ROUTE_TABLES_REJECTED,
        crate::control_client::CONTROL_STREAM_ERRORS,
    ] {
        counter!(name).increment(0);
    }
    for kind in ["full", "delta"] {
        counter!(crate::control_client::ROUTE_UPDATES, "kind" => kind).increment(0);
    }
}

/// The identity counters, at 0 from the first scrape, for an alert on `increase()`.
pub(crate) fn register_identity(source: &'static str) {
    counter!(IDENTITY_RENEWALS, "source" => source).increment(0);
    counter!(IDENTITY_ERRORS, "source" => source).increment(0);
}

/// Histogram samples accumulate until drained; drain them every few seconds even when nobody
/// scrapes `/metrics`, so memory stays flat. Once per process.
pub(crate) fn spawn_upkeep(handle: &'static PrometheusHandle) {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    describe_counter!(
        CONNECTIONS_OPENED,
        "Downstream connections accepted, by listener."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Downstream connections finished, by listener, route and result (on hbone listeners \
         the outer connections: result served, or why the handshake failed)."
    );
    describe_counter!(
        HBONE_STREAMS_OPENED,
        "HBONE CONNECT streams received on hbone listeners, by listener."
    );
    describe_counter!(
        HBONE_STREAMS_CLOSED,
        "HBONE CONNECT streams finished, by listener, route and result."
    );
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Downstream connections open now, by listener."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused because the listener was at max_connections."
    );
    describe_counter!(BYTES, Unit::Bytes, "Bytes relayed, by route and direction.");
    describe_histogram!(
        HELLO_DURATION,
        Unit::Seconds,
        "Time from accept until the whole ClientHello was read."
    );
    describe_histogram!(
        CONNECT_DURATION,
        Unit::Seconds,
        "Time to connect to the upstream, retries included, by route."
    );
    describe_counter!(
        CONNECT_FAILURES,
        "Failed upstream connect attempts, by route."
    );
    describe_histogram!(
        CONNECTION_DURATION,
        Unit::Seconds,
        "Lifetime of routed connections, by listener."
    );
    describe_gauge!(
        CONFIG_VERSION,
        "Version of the applied config (count of applied configs)."
    );
    describe_gauge!(ROUTE_TABLE_VERSION, "Version of the applied route table.");
    describe_gauge!(
        ROUTE_TABLE_UPDATED,
        Unit::Seconds,
        "Unix time the route table in force was applied (from the config file or control): \
         its age is time() minus this."
    );
    describe_gauge!(
        READY,
        "1 while /healthz/ready answers 200 (as of the scrape), 0 while it answers 503."
    );
    describe_counter!(CONFIG_RELOADS, "Config reloads applied.");
    describe_counter!(
        CONFIG_RELOAD_FAILURES,
        "Config reloads refused (old config kept)."
    );
    describe_counter!(
        ROUTE_TABLES_REJECTED,
        "Route tables from the control plane refused."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Errors from accept(), e.g. EMFILE, by listener."
    );
    describe_counter!(
        ENDPOINT_EJECTIONS,
        "Upstream endpoints ejected by outlier detection after connect failures, by route and \
         reason (refused, reset, timeout, other); a failed half-open probe counts again."
    );
    describe_gauge!(
        ENDPOINTS_EJECTED,
        "Upstream endpoints ejected now (or awaiting their half-open probe), by route."
    );
    describe_gauge!(
        IDENTITY_CERT_EXPIRY,
        Unit::Seconds,
        "When the gateway's own (hbone) certificate expires, Unix time, by source."
    );
    describe_counter!(
        IDENTITY_RENEWALS,
        "Gateway certificates taken into use after the first (file changes, istiod renewals)."
    );
    describe_counter!(
        IDENTITY_ERRORS,
        "Failed gateway certificate reloads or renewals (the certificate in force is kept)."
    );
    describe_counter!(
        crate::control_client::ROUTE_UPDATES,
        "Route updates received from the control plane, by kind (full table or delta)."
    );
    describe_counter!(
        crate::control_client::CONTROL_STREAM_ERRORS,
        "Failures of the route stream from the control plane (each followed by a retry)."
    );
    describe_gauge!(
        crate::control_client::CONTROL_CONNECTED,
        "1 while the route stream from the control plane is open."
    );
}

/// The `eastwest_connections_closed_total` series of one listener, route and result.
pub fn closed(listener: &str, route: &str, outcome: Outcome) -> Counter {
    counter!(
        CONNECTIONS_CLOSED,
        "listener" => listener.to_string(),
        "route" => route.to_string(),
        "result" => outcome.as_str()
    )
}

/// The `eastwest_hbone_streams_closed_total` series of one listener, route and result.
pub fn hbone_stream_closed(listener: &str, route: &str, outcome: Outcome) -> Counter {
    counter!(
        HBONE_STREAMS_CLOSED,
        "listener" => listener.to_string(),
        "route" => route.to_string(),
        "result" => outcome.as_str()
    )
}

pub fn hbone_streams_opened(listener: &str) -> Counter {
    counter!(HBONE_STREAMS_OPENED, "listener" => listener.to_string())
}

pub fn endpoint_ejections(route: &str, reason: &'static str) -> Counter {
    counter!(ENDPOINT_EJECTIONS, "route" => route.to_string(), "reason" => reason)
}

pub fn ejected_endpoints(route: &str) -> Gauge {
    gauge!(ENDPOINTS_EJECTED, "route" => route.to_string())
}

pub fn bytes(route: &str, direction: &'static str) -> Counter {
    counter!(BYTES, "route" => route.to_string(), "direction" => direction)
}

/// Records that a route table was applied now.
pub(crate) fn route_table_applied(version: u64) {
    gauge!(ROUTE_TABLE_VERSION).set(version as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(ROUTE_TABLE_UPDATED).set(now);
}

/// How a downstream connection ended; the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Routed,
    NoSni,
    BadSni,
    UnknownRoute,
    HelloTimeout,
    Malformed,
    /// A ClientHello over `client_hello::MAX_HELLO_BYTES`.
    TooLarge,
    UpstreamFailed,
    Overloaded,
    /// `hbone`: the TLS or HTTP/2 handshake failed (e.g. a client certificate refused).
    TlsFailed,
    /// `hbone`: a stream that is not a CONNECT, or whose authority is malformed (400).
    BadRequest,
    /// `hbone`: an outer connection that completed mTLS and HTTP/2, when it ends; its CONNECT
    /// streams are counted with their own results in `eastwest_hbone_streams_closed_total`.
    Served,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Routed,
        Outcome::NoSni,
        Outcome::BadSni,
        Outcome::UnknownRoute,
        Outcome::HelloTimeout,
        Outcome::Malformed,
        Outcome::TooLarge,
        Outcome::UpstreamFailed,
        Outcome::Overloaded,
        Outcome::TlsFailed,
        Outcome::BadRequest,
        Outcome::Served,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Routed => "routed",
            Outcome::NoSni => "no_sni",
            Outcome::BadSni => "bad_sni",
            Outcome::UnknownRoute => "unknown_route",
            Outcome::HelloTimeout => "hello_timeout",
            Outcome::Malformed => "malformed",
            Outcome::TooLarge => "too_large",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Overloaded => "overloaded",
            Outcome::TlsFailed => "tls_failed",
            Outcome::BadRequest => "bad_request",
            Outcome::Served => "served",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_series_sort_and_histograms_keep_their_bucket_order() {
        let scrape = "# TYPE b_total counter\nb_total{route=\"y\"} 1\nb_total{route=\"x,\\\"z\"} 2\n\n\
                      # HELP a_seconds Latency.\n# TYPE a_seconds histogram\n\
                      a_seconds_bucket{l=\"q\",le=\"0.1\"} 1\na_seconds_bucket{l=\"q\",le=\"+Inf\"} 2\n\
                      a_seconds_sum{l=\"q\"} 0.3\na_seconds_count{l=\"q\"} 2\n\
                      a_seconds_bucket{l=\"p\",le=\"0.1\"} 0\na_seconds_bucket{l=\"p\",le=\"+Inf\"} 1\n\
                      a_seconds_sum{l=\"p\"} 0.5\na_seconds_count{l=\"p\"} 1\n\n";
        assert_eq!(
            sorted_exposition(scrape),
            "# HELP a_seconds Latency.\n# TYPE a_seconds histogram\n\
             a_seconds_bucket{l=\"p\",le=\"0.1\"} 0\na_seconds_bucket{l=\"p\",le=\"+Inf\"} 1\n\
             a_seconds_sum{l=\"p\"} 0.5\na_seconds_count{l=\"p\"} 1\n\
             a_seconds_bucket{l=\"q\",le=\"0.1\"} 1\na_seconds_bucket{l=\"q\",le=\"+Inf\"} 2\n\
             a_seconds_sum{l=\"q\"} 0.3\na_seconds_count{l=\"q\"} 2\n\n\
             # TYPE b_total counter\nb_total{route=\"x,\\\"z\"} 2\nb_total{route=\"y\"} 1\n\n"
        );
    }
}
