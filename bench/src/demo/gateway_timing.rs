//! "Seen at the gateway": the gateway's token timing (TTFT and record gaps, read from TLS
//! record headers without decrypting) per scenario, beside the client's figures.
//!
//! Exact samples from the gateway's stream observer, not its Prometheus histograms: bucket
//! quantiles are too coarse (a 5–10 ms bucket) for a 1 ms comparison. The gateway sits after
//! the WAN link, in ash next to the model server, so its TTFT lacks the client's round trip
//! (and, on new connections, the TCP and TLS handshakes); its record gaps are the client's
//! ITL as long as the link adds the same delay to every record.

use std::sync::Mutex;

use eastwest_proxy::metrics::token::{observe_streams, StreamEvent};

use crate::run::percentile;

#[derive(Default)]
struct Samples {
    ttft_ms: Vec<f64>,
    gap_ms: Vec<f64>,
}

/// Samples since the last `take`; the observer runs on the gateway's data path, but only in
/// the demo, and a demo-sized lock is uncontended.
static SAMPLES: Mutex<Samples> = Mutex::new(Samples {
    ttft_ms: Vec::new(),
    gap_ms: Vec::new(),
});

/// Starts collecting (once per process).
pub fn install() {
    observe_streams(|event| {
        let Ok(mut s) = SAMPLES.lock() else { return };
        match event {
            StreamEvent::FirstResponse(d) => s.ttft_ms.push(d.as_secs_f64() * 1e3),
            StreamEvent::Gap(d) => s.gap_ms.push(d.as_secs_f64() * 1e3),
        }
    });
}

/// The gateway's p50/p99 since the last call, as one line for `scenario`; `None` when the
/// gateway saw no response (the direct scenario bypasses it).
pub fn take_line(client_ttft_p50: f64, client_itl_p50: f64, rtt_ms: f64) -> Option<String> {
    let Samples {
        mut ttft_ms,
        mut gap_ms,
    } = std::mem::take(&mut *SAMPLES.lock().ok()?);
    if ttft_ms.is_empty() {
        return None;
    }
    ttft_ms.sort_by(f64::total_cmp);
    gap_ms.sort_by(f64::total_cmp);
    let (t50, t99) = (percentile(&ttft_ms, 50.0), percentile(&ttft_ms, 99.0));
    let (g50, g99) = (percentile(&gap_ms, 50.0), percentile(&gap_ms, 99.0));
    Some(format!(
        "seen at the gateway (ash side of the WAN): TTFT p50 {t50:.2} p99 {t99:.2} ms \
         (+RTT {:.2} vs client p50 {client_ttft_p50:.2}), ITL p50 {g50:.2} p99 {g99:.2} ms \
         (client p50 {client_itl_p50:.2}, diff {:+.2}); {} responses, {} gaps",
        t50 + rtt_ms,
        g50 - client_itl_p50,
        ttft_ms.len(),
        gap_ms.len()
    ))
}
