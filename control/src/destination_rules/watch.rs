//! Following one cluster's DestinationRules through kube-runtime's watcher, like the other
//! resources (list+watch, atomic relist, counted errors, backoff), except that a cluster which
//! does not serve them (no Istio CRD: `404`; no access: `403`) is a cluster with no rules: it
//! counts as synced, is logged once, and is asked again only every `--destination-rule-recheck`.
//! Only a first list that fails so means that: once a version has listed, a `403`/`404` (a watch
//! RBAC does not allow, an authz webhook blip, the CRD updated during an Istio upgrade) is a
//! watch error like any other, retried with backoff while the rules already known are kept.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::backoff::{until_listed, ErrorLog, JitteredBackoff};
use crate::cluster::Watch;

const GROUP: &str = "networking.istio.io";
/// Newest first: Istio serves `v1` since 1.22; older control planes only the betas.
const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// How often a cluster that serves no DestinationRules is asked again, unless configured.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(60);

fn api_resource(version: &str) -> ApiResource {
    ApiResource {
        group: GROUP.to_string(),
        version: version.to_string(),
        api_version: format!("{GROUP}/{version}"),
        kind: "DestinationRule".to_string(),
        plural: "destinationrules".to_string(),
    }
}

enum Ended {
    /// The cluster's watch was stopped (removed or restarted).
    Gone,
    /// This version is not served (`404`) or not readable (`403`): its first list failed so.
    NotServed(u16),
}

/// Watches cluster `name`'s rules until its watch task is aborted.
pub async fn run(watch: &Watch<'_>, client: Client) {
    let (shared, name) = (watch.shared, watch.cluster);
    loop {
        let mut forbidden = false;
        for version in VERSIONS {
            let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource(version));
            match follow(watch, version, api).await {
                Ended::Gone => return,
                Ended::NotServed(code) => forbidden |= code == 403,
            }
        }
        let why = if forbidden {
            format!("403 Forbidden on {GROUP} destinationrules")
        } else {
            format!("404 Not Found on every version of {GROUP} destinationrules")
        };
        let mut newly = false;
        let owned = watch.change(|c| {
            newly = c.destination_rules.unavailable.as_ref() != Some(&why);
            let domain = &shared.settings.cluster_domain;
            c.destination_rules.set_unavailable(why.clone(), domain)
        });
        if !owned {
            return;
        }
        let recheck = shared.settings.destination_rule_recheck;
        if newly {
            if forbidden {
                warn!(cluster = %name, reason = %why, ?recheck,
                      "may not list DestinationRules ({GROUP}): no subsets from this cluster; \
                       grant list/watch on destinationrules to fix");
            } else {
                info!(cluster = %name, reason = %why, ?recheck,
                      "cluster serves no DestinationRules ({GROUP} CRD not installed): no subsets \
                       from it");
            }
        }
        tokio::time::sleep(recheck).await;
    }
}

/// Feeds one version's watcher events into the cluster's rules until the task is aborted or
/// the version turns out not to be served.
async fn follow(watch: &Watch<'_>, version: &str, api: Api<DynamicObject>) -> Ended {
    let (shared, name) = (watch.shared, watch.cluster);
    let stream = until_listed(
        watcher(api, watcher::Config::default()),
        JitteredBackoff::default(),
    );
    let mut stream = std::pin::pin!(stream);
    let mut errors = ErrorLog::default();
    let domain = &shared.settings.cluster_domain;
    let keep = &shared.settings.subset_labels;
    // Whether this version has ever listed: after that, it is served whatever an error says.
    let mut ever_listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let listed = matches!(event, watcher::Event::InitDone);
                ever_listed |= listed;
                if listed {
                    watch.listed("DestinationRule", &mut errors);
                }
                let owned = watch.change(|c| {
                    let affected = c.destination_rules.apply(name, event, domain, keep);
                    if listed {
                        if let Some(was) = c.destination_rules.unavailable.take() {
                            info!(cluster = %name, %version, previously = %was,
                                  "cluster serves DestinationRules now");
                        }
                    }
                    affected
                });
                if !owned {
                    return Ended::Gone;
                }
            }
            Err(retry) => {
                if let Some(code) = not_served(&retry.error).filter(|_| !ever_listed) {
                    return Ended::NotServed(code);
                }
                watch.failed("DestinationRule", &retry, &mut errors);
            }
        }
    }
    Ended::Gone
}

/// A list answered `404 Not Found` (the resource is not served) or `403 Forbidden` (we may not
/// list it). A failed watch says nothing of the sort: kube-runtime starts one only after a list
/// succeeded, so its `403`/`404` is RBAC without `watch` or a passing fault.
fn not_served(e: &watcher::Error) -> Option<u16> {
    let watcher::Error::InitialListFailed(kube::Error::Api(response)) = e else {
        return None;
    };
    matches!(response.code, 403 | 404).then_some(response.code)
}
