//! Choosing an upstream: least active connections, or power of two random choices.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use eastwest_routes::LoadBalancing;

use crate::routing::UpstreamSet;

/// Counts one connection against an upstream for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Index of the upstream to try next. Upstreams in `tried` are avoided while others remain;
/// once all were tried, all are candidates again (a lone endpoint gets retried).
pub fn pick(set: &UpstreamSet, policy: LoadBalancing, tried: &[usize]) -> Option<usize> {
    let n = set.upstreams.len();
    if n == 0 {
        return None;
    }
    if n == 1 {
        return Some(0);
    }
    let fresh = |i: &usize| !tried.contains(i);
    let all_tried = (0..n).all(|i| !fresh(&i));
    let candidate = |i: &usize| all_tried || fresh(i);
    let load = |i: usize| set.upstreams[i].active.load(Ordering::Relaxed);
    match policy {
        LoadBalancing::LeastConnections => {
            // Start at a random offset so equally loaded upstreams share new connections.
            let start = rand::random_range(0..n);
            (0..n)
                .map(|k| (start + k) % n)
                .filter(candidate)
                .min_by_key(|&i| load(i))
        }
        LoadBalancing::PowerOfTwoChoices => {
            let count = (0..n).filter(candidate).count();
            let nth = |k: usize| (0..n).filter(candidate).nth(k);
            if count == 1 {
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
    use crate::routing::{Target, Upstream};

    fn set(loads: &[usize]) -> UpstreamSet {
        let upstreams = loads
            .iter()
            .enumerate()
            .map(|(i, &l)| Upstream {
                target: Target::Addr(([127, 0, 0, 1], 1000 + i as u16).into()),
                active: Arc::new(AtomicUsize::new(l)),
            })
            .collect::<Vec<_>>();
        UpstreamSet::for_test(upstreams)
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
}
