//! Counters behind `/metrics`, rendered in the Prometheus text format. Kept per instance (not
//! a global recorder) so several controls can live in one test process.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::state::Shared;

/// Upper bounds (seconds) of the push-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    pub version: AtomicU64,
    pub pushes: AtomicU64,
    pub connected_proxies: AtomicI64,
    pub secret_errors: AtomicU64,
    /// Items left out of published tables because a proxy would refuse them.
    pub invalid_routes: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Records a publication; `latency` is from the first change it contains.
    pub fn published(&self, version: u64, latency: Option<Duration>) {
        self.version.fetch_max(version, Ordering::Relaxed);
        self.pushes.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = latency {
            let secs = l.as_secs_f64();
            for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
                if secs <= bound {
                    bucket.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.latency_count.fetch_add(1, Ordering::Relaxed);
            self.latency_sum_micros
                .fetch_add(l.as_micros() as u64, Ordering::Relaxed);
        }
    }
}

/// Renders every metric of `shared`.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE eastwest_control_cluster_synced gauge");
    let mut restarts = String::new();
    let mut objects = String::new();
    {
        let model = shared.model();
        for (name, c) in &model.clusters {
            let net = c.network.as_deref().unwrap_or("");
            let _ = writeln!(
                out,
                "eastwest_control_cluster_synced{{cluster=\"{name}\",network=\"{net}\"}} {}",
                u8::from(c.reported_synced())
            );
            let _ = writeln!(
                restarts,
                "eastwest_control_watch_restarts_total{{cluster=\"{name}\"}} {}",
                c.watch_restarts
            );
            for (kind, n) in [
                ("services", c.services.objects.len()),
                ("endpointslices", c.slices.objects.len()),
                ("pods", c.pods.count()),
                ("destinationrules", c.destination_rules.objects.len()),
            ] {
                let _ = writeln!(
                    objects,
                    "eastwest_control_objects{{cluster=\"{name}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_watch_restarts_total counter\n{restarts}"
    );
    let _ = writeln!(out, "# TYPE eastwest_control_objects gauge\n{objects}");
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_route_version gauge\neastwest_control_route_version {}",
        m.version.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_pushes_total counter\neastwest_control_pushes_total {}",
        m.pushes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_connected_proxies gauge\neastwest_control_connected_proxies {}",
        m.connected_proxies.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_remote_secret_errors_total counter\n\
         eastwest_control_remote_secret_errors_total {}",
        m.secret_errors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_invalid_routes_total counter\n\
         eastwest_control_invalid_routes_total {}",
        m.invalid_routes.load(Ordering::Relaxed)
    );
    let unsynced = crate::state::unsynced(shared, &shared.model()).len();
    let _ = writeln!(
        out,
        "# HELP eastwest_control_unsynced Clusters (and the remote-secret list) not synced; \
         while above 0 published tables are marked partial.\n\
         # TYPE eastwest_control_unsynced gauge\neastwest_control_unsynced {unsynced}"
    );
    if shared.settings.watch_secrets {
        let _ = writeln!(
            out,
            "# TYPE eastwest_control_remote_secrets_synced gauge\n\
             eastwest_control_remote_secrets_synced {}",
            u8::from(shared.secrets_synced.load(Ordering::Acquire))
        );
    }
    let _ = writeln!(
        out,
        "# TYPE eastwest_control_push_latency_seconds histogram"
    );
    for (bucket, bound) in m.latency_buckets.iter().zip(LATENCY_BUCKETS) {
        let _ = writeln!(
            out,
            "eastwest_control_push_latency_seconds_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = m.latency_count.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "eastwest_control_push_latency_seconds_bucket{{le=\"+Inf\"}} {count}\n\
         eastwest_control_push_latency_seconds_sum {}\n\
         eastwest_control_push_latency_seconds_count {count}",
        m.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    out
}
