//! The last check before publication: every item of a table must pass the validation the proxy
//! applies (eastwest-routes), because a proxy refuses a whole table, and so every later delta,
//! for one invalid item. What fails is left out (and reported, so the publisher can log and
//! count it): one odd object can never freeze a network's updates.

use eastwest_routes::{Invalid, NetworkGateway};

use crate::compute::Entry;

/// `entry` without the Service or remote services a proxy would refuse; `report` gets each
/// problem with the item's name.
pub fn entry(entry: Entry, mut report: impl FnMut(&str, &Invalid)) -> Entry {
    let service = entry.service.filter(|s| {
        let mut errors = Vec::new();
        s.validate("service", &mut errors);
        for e in &errors {
            report(&s.hostname, e);
        }
        errors.is_empty()
    });
    let remote = entry
        .remote
        .into_iter()
        .filter(|r| {
            let mut errors = Vec::new();
            r.validate("remote_service", &mut errors);
            for e in &errors {
                let name = format!(
                    "remote service {} of cluster {}",
                    r.hostname,
                    r.cluster.as_deref().unwrap_or("")
                );
                report(&name, e);
            }
            errors.is_empty()
        })
        .collect();
    Entry { service, remote }
}

/// `gateways` without those a proxy would refuse.
pub fn gateways(
    gateways: Vec<NetworkGateway>,
    mut report: impl FnMut(&str, &Invalid),
) -> Vec<NetworkGateway> {
    gateways
        .into_iter()
        .filter(|g| {
            let mut errors = Vec::new();
            g.validate("gateway", &mut errors);
            for e in &errors {
                report(&format!("gateway of network {:?}", g.network), e);
            }
            errors.is_empty()
        })
        .collect()
}

/// Checks `--cluster-domain`: every Service hostname (`<name>.<namespace>.svc.<domain>`, names
/// of up to 63 characters) must be a DNS name a proxy accepts.
pub fn cluster_domain(domain: &str) -> Result<(), String> {
    let longest = format!("{0}.{0}.svc.{domain}", "a".repeat(63));
    let probe = eastwest_routes::Service {
        hostname: longest,
        subsets: Vec::new(),
        ports: vec![eastwest_routes::ServicePort {
            port: 80,
            name: None,
            waypoint: Vec::new(),
            endpoints: Vec::new(),
        }],
    };
    let mut errors = Vec::new();
    probe.validate("", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{domain:?} is not a DNS name short enough for every Service hostname \
             (<name>.<namespace>.svc.{domain}, at most 253 characters; labels of letters, digits, \
             '-' and '_', at most 63 each)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_domains() {
        for ok in ["cluster.local", "corp", "a-b.example.com"] {
            assert_eq!(cluster_domain(ok), Ok(()), "{ok}");
        }
        let long = "d".repeat(60) + "." + &"e".repeat(62);
        for bad in ["", "cluster.local.", "clus ter.local", "a..b", &long] {
            assert!(cluster_domain(bad).is_err(), "{bad:?}");
        }
    }
}
