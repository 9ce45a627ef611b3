//! How a new route table differs from the one in force, when both are in strict hostname
//! order: what lets [`Routing::update`](super::Routing::update) validate and compile only the
//! services that changed.

use std::sync::Arc;

use eastwest_routes::Service;

pub(super) fn is_strictly_sorted(services: &[Arc<Service>]) -> bool {
    services.windows(2).all(|w| w[0].hostname < w[1].hostname)
}

/// How `new` differs from `old` (strictly sorted by hostname): the indices of the services of
/// `new` that are not the same `Arc` as `old`'s, and of those of `old` that are gone. `None`
/// unless `new` is strictly sorted too — checked next to each changed service only, as the
/// unchanged ones keep `old`'s order.
pub(super) fn diff(old: &[Arc<Service>], new: &[Arc<Service>]) -> Option<(Vec<usize>, Vec<usize>)> {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new.len() {
        if Arc::ptr_eq(&old[i], &new[j]) {
            i += 1;
            j += 1;
            continue;
        }
        match old[i].hostname.cmp(&new[j].hostname) {
            std::cmp::Ordering::Less => {
                removed.push(i);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                changed.push(j);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                changed.push(j);
                i += 1;
                j += 1;
            }
        }
    }
    removed.extend(i..old.len());
    changed.extend(j..new.len());
    let ordered = changed.iter().all(|&j| {
        (j == 0 || new[j - 1].hostname < new[j].hostname)
            && new
                .get(j + 1)
                .is_none_or(|next| new[j].hostname < next.hostname)
    });
    ordered.then_some((changed, removed))
}
