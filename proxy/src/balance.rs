//! Choosing an upstream: least active connections, or power of two random choices, among the
//! endpoints that outlier detection has not ejected.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use eastwest_routes::{LoadBalancing, UpstreamConfig};

use crate::outlier::{Availability, EndpointState};
use crate::routing::UpstreamSet;

/// Counts one connection against an upstream for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointState>);

impl ActiveGuard {
    pub fn new(state: &Arc<EndpointState>) -> Self {
        state.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(state.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The upstream to try next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    /// This connection probes an endpoint whose ejection is over (half-open).
    pub probe: bool,
}

/// The upstream to try next. Upstreams in `tried` are avoided while others remain; once all
/// were tried, all are candidates again (a lone endpoint gets retried). Ejected upstreams are
/// avoided too, unless every candidate is ejected: then they are used as if healthy, as
/// refusing the connection would be no better. An upstream whose ejection is over is picked
/// first, as the probe, by one connection.
pub fn pick(set: &UpstreamSet, cfg: &UpstreamConfig, tried: &[usize], now: u64) -> Option<Pick> {
    let n = set.upstreams.len();
    if n == 0 {
        return None;
    }
    let fresh = |i: &usize| !tried.contains(i);
    let all_tried = (0..n).all(|i| !fresh(&i));
    let candidate = |i: &usize| all_tried || fresh(i);
    let state = |i: usize| &set.upstreams[i].state;
    let od = &cfg.outlier_detection;
    let mut any_ejected = false;
    for i in (0..n).filter(candidate) {
        match state(i).availability(now) {
            Availability::InPool => {}
            Availability::Ejected => any_ejected = true,
            Availability::Probe if state(i).claim_probe(now, od) => {
                return Some(Pick {
                    index: i,
                    probe: true,
                })
            }
            Availability::Probe => any_ejected = true,
        }
    }
    let in_pool = |i: &usize| !any_ejected || !state(*i).is_ejected();
    let index = choose(set, cfg.load_balancing, |i| candidate(i) && in_pool(i))
        .or_else(|| choose(set, cfg.load_balancing, candidate))?;
    Some(Pick {
        index,
        probe: false,
    })
}

/// The policy's choice among the upstreams `eligible` accepts.
fn choose(
    set: &UpstreamSet,
    policy: LoadBalancing,
    eligible: impl Fn(&usize) -> bool,
) -> Option<usize> {
    let n = set.upstreams.len();
    let load = |i: usize| set.upstreams[i].state.active.load(Ordering::Relaxed);
    match policy {
        LoadBalancing::LeastConnections => {
            // Start at a random offset so equally loaded upstreams share new connections.
            let start = rand::random_range(0..n);
            (0..n)
                .map(|k| (start + k) % n)
                .filter(&eligible)
                .min_by_key(|&i| load(i))
        }
        LoadBalancing::PowerOfTwoChoices => {
            let count = (0..n).filter(&eligible).count();
            let nth = |k: usize| (0..n).filter(&eligible).nth(k);
            if count <= 1 {
                return nth(0);
            }
            // Two distinct random candidates; the less loaded one wins.
            let ra = rand::random_range(0..count);
            let mut rb = rand::random_range(0..count - 1);
            if rb >= ra {
                rb += 1;
            }
            let (a, b) = (nth(ra)?, nth(rb)?);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outlier;
    use crate::routing::{Target, Upstream};

    fn set(loads: &[usize]) -> UpstreamSet {
        let upstreams = loads
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let state = EndpointState::default();
                state.active.store(l, Ordering::Relaxed);
                let target = Target::Addr(([127, 0, 0, 1], 1000 + i as u16).into());
                Upstream::new(target, Arc::new(state), None)
            })
            .collect::<Vec<_>>();
        UpstreamSet::for_test(upstreams)
    }

    fn cfg(policy: LoadBalancing) -> UpstreamConfig {
        UpstreamConfig {
            load_balancing: policy,
            ..UpstreamConfig::default()
        }
    }

    fn pick(set: &UpstreamSet, policy: LoadBalancing, tried: &[usize]) -> Option<usize> {
        super::pick(set, &cfg(policy), tried, 1).map(|p| p.index)
    }

    #[test]
    fn least_connections_picks_the_idlest_untried() {
        let s = set(&[5, 1, 3]);
        assert_eq!(pick(&s, LoadBalancing::LeastConnections, &[]), Some(1));
        assert_eq!(pick(&s, LoadBalancing::LeastConnections, &[1]), Some(2));
        // Everything tried: start over with the idlest.
        assert_eq!(
            pick(&s, LoadBalancing::LeastConnections, &[0, 1, 2]),
            Some(1)
        );
    }

    #[test]
    fn p2c_never_picks_the_busiest_of_two_and_skips_tried() {
        let s = set(&[9, 0]);
        for _ in 0..100 {
            assert_eq!(pick(&s, LoadBalancing::PowerOfTwoChoices, &[]), Some(1));
        }
        let s = set(&[0, 0, 0]);
        for _ in 0..100 {
            let i = pick(&s, LoadBalancing::PowerOfTwoChoices, &[0, 2]).unwrap();
            assert_eq!(i, 1);
        }
    }

    #[test]
    fn ejected_upstreams_are_skipped_then_probed_once() {
        for policy in [
            LoadBalancing::LeastConnections,
            LoadBalancing::PowerOfTwoChoices,
        ] {
            // The dead one is the idlest: without ejection least-connections would pick it.
            let s = set(&[0, 3, 5]);
            let cfg = cfg(policy);
            let base = cfg.outlier_detection.base_ejection_time.as_millis() as u64;
            outlier::failed(&s, 0, false, &cfg.outlier_detection, 1, "refused");
            for _ in 0..100 {
                let p = super::pick(&s, &cfg, &[], 2).unwrap();
                assert_ne!(p.index, 0);
                assert!(!p.probe);
            }
            // Ejection over: exactly one connection probes it.
            let after = 1 + base;
            let probe = super::pick(&s, &cfg, &[], after).unwrap();
            assert_eq!(
                probe,
                Pick {
                    index: 0,
                    probe: true
                }
            );
            for _ in 0..100 {
                assert_ne!(super::pick(&s, &cfg, &[], after).unwrap().index, 0);
            }
            // The probe connects: back in the pool, and picked again (P2C: when drawn).
            s.upstreams[0].state.connected();
            let picked = (0..100).any(|_| super::pick(&s, &cfg, &[], after).unwrap().index == 0);
            assert!(picked, "{policy:?}");
        }
    }

    #[test]
    fn all_ejected_still_picks_one() {
        let s = set(&[0, 0]);
        let cfg = cfg(LoadBalancing::LeastConnections);
        outlier::failed(&s, 0, false, &cfg.outlier_detection, 1, "refused");
        // The last endpoint is not ejected; the other is tried, ejected or not.
        assert_eq!(pick(&s, LoadBalancing::LeastConnections, &[1]), Some(0));
        assert_eq!(pick(&s, LoadBalancing::LeastConnections, &[]), Some(1));
    }
}
