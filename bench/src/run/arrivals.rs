//! When each request is sent: bench_serving's Poisson process as absolute offsets from the
//! benchmark's start.
//!
//! bench_serving sends request 0 at once, then sleeps one exponential interval (mean
//! `1/rate`) before each next request. Sleeping interval by interval on a 1 ms timer makes
//! every gap up to 1 ms long and the lateness adds up (100 req/s came out as ~86 req/s), so
//! `run` turns the intervals into absolute deadlines (request `i` is due at the sum of the
//! first `i` intervals) and sleeps until each with the precise timer: a late wake-up delays
//! one request, never the ones after it.

use std::time::Duration;

use rand::Rng;
use rand_distr::Distribution;

/// The send offsets from the start for `num` requests at `rate` req/s; `None` for an
/// infinite rate (everything at once).
pub fn schedule(
    rng: &mut impl Rng,
    rate: f64,
    num: usize,
) -> anyhow::Result<Option<Vec<Duration>>> {
    if !rate.is_finite() {
        return Ok(None);
    }
    let exp = rand_distr::Exp::new(rate).map_err(|e| anyhow::anyhow!("--request-rate: {e}"))?;
    let mut at = 0.0_f64;
    let mut out = Vec::with_capacity(num);
    for _ in 0..num {
        out.push(Duration::from_secs_f64(at));
        at += exp.sample(rng);
    }
    Ok(Some(out))
}
