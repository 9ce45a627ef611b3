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

use super::numpy_random::RandomState;

/// The send offsets from the start for `num` requests at `rate` req/s, from numpy's
/// `exponential(1 / rate)` draws as bench_serving makes them; `None` for an infinite rate
/// (everything at once, no draws).
pub fn schedule(np: &mut RandomState, rate: f64, num: usize) -> Option<Vec<Duration>> {
    if !rate.is_finite() {
        return None;
    }
    let mut at = 0.0_f64;
    let offsets = intervals(np, rate, num)
        .into_iter()
        .map(|gap| {
            let due = Duration::from_secs_f64(at);
            at += gap;
            due
        })
        .collect();
    Some(offsets)
}

/// bench_serving's draws: one `np.random.exponential(1.0 / rate)` after each request.
fn intervals(np: &mut RandomState, rate: f64, num: usize) -> Vec<f64> {
    (0..num).map(|_| np.exponential(1.0 / rate)).collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::super::dataset::sample_random;
    use super::*;

    /// Same seed and flags as sglang's bench_serving: the same lengths, in the same order,
    /// then the same intervals, as numpy drew them for the fixture.
    #[test]
    fn lengths_and_intervals_match_numpy() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/numpy_streams.json"))
                .expect("fixture is JSON");
        let workloads = fixture["workloads"].as_array().expect("workloads");
        assert!(!workloads.is_empty());
        for w in workloads {
            let n = w["num_prompts"].as_u64().expect("n") as usize;
            let seed = w["seed"].as_u64().expect("seed") as u32;
            let rate = w["request_rate"].as_f64().expect("rate");
            let mut np = RandomState::seed(seed);
            let mut words = rand::rngs::StdRng::seed_from_u64(0);
            let prompts = sample_random(
                &mut np,
                &mut words,
                n,
                w["random_input_len"].as_u64().expect("input len") as usize,
                w["random_output_len"].as_u64().expect("output len") as usize,
                w["random_range_ratio"].as_f64().expect("ratio"),
            )
            .expect("lengths");
            let as_usize = |key: &str| -> Vec<usize> {
                w[key]
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|x| x.as_u64().expect("int") as usize)
                    .collect()
            };
            let input: Vec<usize> = prompts.iter().map(|p| p.input_len).collect();
            let output: Vec<usize> = prompts.iter().map(|p| p.output_len).collect();
            assert_eq!(input, as_usize("input_lens"), "seed {seed}");
            assert_eq!(output, as_usize("output_lens"), "seed {seed}");
            let words_ok = prompts
                .iter()
                .all(|p| p.text.split(' ').filter(|s| !s.is_empty()).count() == p.input_len);
            assert!(words_ok, "one word per nominal input token");
            let got = intervals(&mut np, rate, n);
            let want: Vec<f64> = w["intervals"]
                .as_array()
                .expect("intervals")
                .iter()
                .map(|x| x.as_f64().expect("float"))
                .collect();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * w.abs(),
                    "seed {seed} interval {i}: {g} vs {w}"
                );
            }
        }
    }
}
