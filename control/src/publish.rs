//! Versioning and fan-out of route tables.
//!
//! One task recomputes the tables of every network some proxy subscribed to whenever the model
//! changed, at most once per debounce interval: the first change after a quiet period is
//! published at once, the rest of a burst is coalesced into the next publication. A table equal
//! to the last one is not republished. Each table is serialised once and shared by all streams
//! of its network; a slow stream skips straight to the newest version.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eastwest_routes::{NetworkGateway, RouteTable};
use tokio::sync::watch;
use tracing::{debug, error, info};

use crate::compute::{hostname, network_gateways, service_entry};
use crate::encode::{delta_line, table_line, Fragment, Snapshot};
use crate::state::Shared;
use crate::valid;

/// Publications whose changes are kept, so a stream that skipped versions still gets a delta.
const RECENT_MAX: usize = 16;
/// ... but not more hostnames than this in all (a full recomputation may change thousands).
const RECENT_MAX_HOSTNAMES: usize = 20_000;

/// One publication of a network's table.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    /// The delta line from the previous publication (`base`), absent for the first.
    delta: Option<(u64, Bytes)>,
    snapshot: Snapshot,
    /// The changes of recent publications, oldest first, ending with this one's.
    recent: Vec<Arc<Change>>,
    /// The full table line, assembled when a stream first needs it.
    line: OnceLock<Bytes>,
}

/// What one publication changed.
#[derive(Debug)]
struct Change {
    version: u64,
    base: u64,
    /// Sorted.
    hostnames: Vec<String>,
    gateways: bool,
}

impl Published {
    /// The full table: one NDJSON line.
    pub fn line(&self) -> Bytes {
        self.line
            .get_or_init(|| Bytes::from(table_line(self.version, &self.snapshot)))
            .clone()
    }

    /// The table itself (parsed back; for tests and debugging, not the hot path).
    pub fn table(&self) -> Option<RouteTable> {
        serde_json::from_slice(&self.line()).ok()
    }

    /// The delta line that takes a proxy holding version `from` to this version, when the
    /// changes since `from` are still known.
    pub fn delta_from(&self, from: u64) -> Option<Bytes> {
        if let Some((base, line)) = &self.delta {
            if *base == from {
                return Some(line.clone());
            }
        }
        let start = self.recent.iter().position(|c| c.base == from)?;
        let chain = &self.recent[start..];
        let linked = chain.windows(2).all(|w| w[1].base == w[0].version);
        if !linked || chain.last()?.version != self.version {
            return None;
        }
        let mut hostnames: Vec<&str> = chain
            .iter()
            .flat_map(|c| c.hostnames.iter().map(String::as_str))
            .collect();
        hostnames.sort_unstable();
        hostnames.dedup();
        let gateways = chain.iter().any(|c| c.gateways);
        Some(Bytes::from(delta_line(
            self.version,
            from,
            &self.snapshot,
            &hostnames,
            gateways,
        )))
    }
}

pub type TableRx = watch::Receiver<Option<Arc<Published>>>;

/// What was last published for a network, by hostname, so a change re-serialises one Service.
#[derive(Debug, Default)]
struct NetCache {
    fragments: BTreeMap<String, Arc<Fragment>>,
    gateways: Vec<NetworkGateway>,
    recent: VecDeque<Arc<Change>>,
}

impl NetCache {
    fn remember(&mut self, change: Change) {
        self.recent.push_back(Arc::new(change));
        let mut hostnames: usize = self.recent.iter().map(|c| c.hostnames.len()).sum();
        while self.recent.len() > 1
            && (self.recent.len() > RECENT_MAX || hostnames > RECENT_MAX_HOSTNAMES)
        {
            if let Some(old) = self.recent.pop_front() {
                hostnames -= old.hostnames.len();
            }
        }
    }
}

struct Channel {
    tx: watch::Sender<Option<Arc<Published>>>,
    cache: Option<NetCache>,
}

pub struct Publisher {
    channels: Mutex<HashMap<String, Channel>>,
    next_version: AtomicU64,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    pub fn new() -> Publisher {
        // Seeded from the clock (microseconds) so a restarted control still moves forward.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Publisher {
            channels: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(seed),
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to `network`'s tables; the bool says whether the network is new (then the
    /// caller wakes the publisher so it computes it).
    pub fn subscribe(&self, network: &str) -> (TableRx, bool) {
        let mut channels = self.channels();
        if let Some(ch) = channels.get(network) {
            return (ch.tx.subscribe(), false);
        }
        let (tx, rx) = watch::channel(None);
        channels.insert(network.to_string(), Channel { tx, cache: None });
        (rx, true)
    }

    /// The newest published table of `network`.
    pub fn current(&self, network: &str) -> Option<Arc<Published>> {
        self.channels()
            .get(network)
            .and_then(|c| c.tx.borrow().clone())
    }
}

/// Runs the publisher until the process ends.
pub async fn run(shared: Arc<Shared>) {
    let start = Instant::now();
    let local = shared.settings.network.clone();
    shared.publisher.subscribe(&local);
    // The first tables wait for every cluster to sync (a partial table would withdraw routes
    // from proxies that have a complete one), remote ones not forever: after the sync timeout
    // what is known is published, marked partial. Without the local cluster nothing is: that
    // table would withdraw every local route, so proxies keep theirs (or their cache) instead.
    let mut timed_out = false;
    loop {
        let pending = shared.not_synced();
        let local_synced = shared
            .model()
            .clusters
            .get(&shared.settings.cluster)
            .is_some_and(|c| c.reported_synced());
        if pending.is_empty() {
            info!(elapsed = ?start.elapsed(), "all clusters synced");
            break;
        }
        let left = shared.settings.sync_timeout.saturating_sub(start.elapsed());
        if left.is_zero() && local_synced {
            error!(
                ?pending,
                "sync timeout; publishing what is known, marked partial"
            );
            break;
        }
        if left.is_zero() && !timed_out {
            timed_out = true;
            error!(cluster = %shared.settings.cluster, ?pending,
                   "sync timeout, and the local cluster has not synced: publishing nothing until it has");
        }
        let wait = if left.is_zero() {
            shared.settings.sync_timeout
        } else {
            left
        };
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    loop {
        let published_at = Instant::now();
        publish_all(&shared);
        shared.changed.notified().await;
        tokio::time::sleep_until((published_at + shared.settings.debounce).into()).await;
    }
}

fn publish_all(shared: &Shared) {
    let model_guard = shared.model();
    let mut model = model_guard;
    let dirty = std::mem::take(&mut model.dirty_services);
    let all = std::mem::take(&mut model.all_dirty);
    let dirty_since = model.dirty_since.take();
    let partial = !crate::state::unsynced(shared, &model).is_empty();
    let domain = &shared.settings.cluster_domain;
    let mut channels = shared.publisher.channels();
    // Forget networks nobody listens to any more (the local one always stays).
    channels.retain(|net, ch| *net == shared.settings.network || ch.tx.receiver_count() > 0);
    for (net, ch) in channels.iter_mut() {
        // A proxy would refuse the whole table for one invalid item: leave it out instead.
        let report = |item: &str, e: &eastwest_routes::Invalid| {
            error!(network = %net, %item, field = %e.path, error = %e.message,
                   "left out of the route table: a proxy would refuse it");
            shared
                .metrics
                .invalid_routes
                .fetch_add(1, Ordering::Relaxed);
        };
        let (previous, was_partial) = match ch.tx.borrow().as_ref() {
            Some(p) => (Some(p.version), p.snapshot.partial),
            None => (None, false),
        };
        // Hostnames whose fragment changed.
        let mut changed = Vec::new();
        let cache = match (&mut ch.cache, all) {
            (Some(cache), false) => {
                for key in &dirty {
                    let host = hostname(key, domain);
                    let entry = valid::entry(service_entry(&model, net, key, domain), &report);
                    let fragment = Fragment::of(host.clone(), entry);
                    let old = match fragment {
                        Some(f) => cache.fragments.insert(host.clone(), Arc::new(f)),
                        None => cache.fragments.remove(&host),
                    };
                    if old.as_ref() != cache.fragments.get(&host) {
                        changed.push(host);
                    }
                }
                cache
            }
            (slot, _) => {
                let fresh: BTreeMap<String, Arc<Fragment>> = model
                    .all_service_keys()
                    .into_iter()
                    .filter_map(|k| {
                        let host = hostname(&k, domain);
                        let entry = valid::entry(service_entry(&model, net, &k, domain), &report);
                        let f = Fragment::of(host.clone(), entry)?;
                        Some((host, Arc::new(f)))
                    })
                    .collect();
                let cache = slot.get_or_insert_with(NetCache::default);
                for (host, f) in &fresh {
                    if cache.fragments.get(host) != Some(f) {
                        changed.push(host.clone());
                    }
                }
                changed.extend(
                    cache
                        .fragments
                        .keys()
                        .filter(|h| !fresh.contains_key(*h))
                        .cloned(),
                );
                cache.fragments = fresh;
                cache
            }
        };
        let gateways = valid::gateways(network_gateways(&model, net), &report);
        let gateways_changed = gateways != cache.gateways;
        if gateways_changed {
            cache.gateways = gateways;
        }
        if previous.is_some() && changed.is_empty() && !gateways_changed && partial == was_partial {
            continue;
        }
        changed.sort_unstable();
        changed.dedup();
        let version = shared
            .publisher
            .next_version
            .fetch_add(1, Ordering::Relaxed);
        let snapshot = Snapshot {
            fragments: cache.fragments.values().cloned().collect(),
            gateways: cache.gateways.clone(),
            partial,
        };
        let delta = previous.map(|base| {
            let hostnames: Vec<&str> = changed.iter().map(String::as_str).collect();
            let line = delta_line(version, base, &snapshot, &hostnames, gateways_changed);
            (base, Bytes::from(line))
        });
        if let Some(base) = previous {
            cache.remember(Change {
                version,
                base,
                hostnames: changed,
                gateways: gateways_changed,
            });
        }
        debug!(network = %net, version, services = snapshot.fragments.len(), partial,
               delta_bytes = delta.as_ref().map(|(_, d)| d.len()), "publishing route table");
        ch.tx.send_replace(Some(Arc::new(Published {
            version,
            delta,
            snapshot,
            recent: cache.recent.iter().cloned().collect(),
            line: OnceLock::new(),
        })));
        shared
            .metrics
            .published(version, dirty_since.map(|t| t.elapsed()));
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::compute::route_table;
    use crate::model::{
        ClusterState, Model, ObjKey, ReadyEndpoint, ServiceDef, ServicePortDef, SliceDef,
    };

    fn snapshot_of(model: &Model) -> Snapshot {
        let mut fragments: Vec<Arc<Fragment>> = model
            .all_service_keys()
            .iter()
            .filter_map(|k| {
                let host = hostname(k, "cluster.local");
                let entry = service_entry(model, "network1", k, "cluster.local");
                Fragment::of(host, entry).map(Arc::new)
            })
            .collect();
        fragments.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        Snapshot {
            fragments,
            gateways: network_gateways(model, "network1"),
            partial: false,
        }
    }

    fn key(ns: &str, name: &str) -> ObjKey {
        (ns.to_string(), name.to_string())
    }

    /// The hand-assembled line parses to exactly what serde would have produced.
    #[test]
    fn assembled_line_is_the_serde_table() {
        let model = two_clusters();
        let snapshot = snapshot_of(&model);
        let line = table_line(42, &snapshot);
        let parsed: RouteTable = serde_json::from_slice(&line).unwrap();
        let mut expected = route_table(&model, "network1", "cluster.local");
        expected.version = 42;
        assert_eq!(parsed, expected);
        assert_eq!(parsed.services.len(), 1);
        assert_eq!(parsed.remote_services.len(), 1);
        assert_eq!(parsed.network_gateways.len(), 1);
    }

    /// fra (network1) has Service ns/local, ash (network2) has ns/remote, one endpoint each.
    fn two_clusters() -> Model {
        let mut model = Model::default();
        for (cluster, net, ip) in [
            ("fra", "network1", "10.0.0.1"),
            ("ash", "network2", "10.0.0.2"),
        ] {
            let mut c = ClusterState::new(1);
            c.network = Some(net.to_string());
            let svc = if cluster == "fra" { "local" } else { "remote" };
            c.services.objects.insert(
                key("ns", svc),
                ServiceDef {
                    ports: vec![ServicePortDef {
                        port: 80,
                        name: Some("http".into()),
                    }],
                    gateway_addresses: vec![format!("{ip}:15443")],
                    use_waypoint: None,
                },
            );
            c.services
                .by_service
                .entry(key("ns", svc))
                .or_default()
                .insert(key("ns", svc));
            c.slices.objects.insert(
                key("ns", &format!("{svc}-1")),
                SliceDef {
                    service: svc.to_string(),
                    ports: vec![(Some("http".into()), 8080)],
                    endpoints: vec![ReadyEndpoint {
                        ip: ip.parse().unwrap(),
                        pod: None,
                    }],
                },
            );
            c.slices
                .by_service
                .entry(key("ns", svc))
                .or_default()
                .insert(key("ns", &format!("{svc}-1")));
            model.clusters.insert(cluster.to_string(), c);
        }
        model
    }

    fn set_endpoints(shared: &Shared, cluster: &str, svc: &str, ips: &[&str]) {
        shared.update(|m| {
            let c = m.clusters.get_mut(cluster).unwrap();
            let slice = c
                .slices
                .objects
                .get_mut(&key("ns", &format!("{svc}-1")))
                .unwrap();
            slice.endpoints = ips
                .iter()
                .map(|ip| ReadyEndpoint {
                    ip: ip.parse().unwrap(),
                    pod: None,
                })
                .collect();
            m.services_changed(vec![key("ns", svc)])
        });
    }

    /// The watch channel keeps only the newest publication; a stream still at an older one
    /// gets a single delta covering every version it skipped, until those are forgotten.
    #[test]
    fn a_stream_that_skipped_versions_gets_one_composed_delta() {
        let settings = crate::state::Settings {
            cluster: "fra".into(),
            network: "network1".into(),
            cluster_domain: "cluster.local".into(),
            debounce: std::time::Duration::from_millis(10),
            sync_timeout: std::time::Duration::from_secs(1),
            watch_secrets: false,
            subset_labels: Vec::new(),
            destination_rule_recheck: std::time::Duration::from_secs(60),
        };
        let shared = Shared::new(settings, two_clusters());
        let (_rx, _) = shared.publisher.subscribe("network1");
        publish_all(&shared);
        let first = shared.publisher.current("network1").unwrap();
        let base = first.table().unwrap();

        set_endpoints(&shared, "fra", "local", &["10.0.0.1", "10.0.0.3"]);
        publish_all(&shared);
        // The remote service loses its last endpoint: gone from remote_services.
        set_endpoints(&shared, "ash", "remote", &[]);
        publish_all(&shared);
        let last = shared.publisher.current("network1").unwrap();
        assert!(last.version > first.version + 1);

        let line = last.delta_from(first.version).unwrap();
        let Ok(eastwest_routes::RouteUpdate::Delta(delta)) = serde_json::from_slice(&line) else {
            panic!("not a delta: {}", String::from_utf8_lossy(&line));
        };
        assert_eq!((delta.base, delta.version), (first.version, last.version));
        let mut invalid = Vec::new();
        delta.validate("", &mut invalid);
        assert!(invalid.is_empty(), "{invalid:?}");
        let composed = delta.apply_to(&base).unwrap();
        assert_eq!(composed, last.table().unwrap());
        assert_eq!(composed.services[0].ports[0].endpoints.len(), 2);
        assert!(composed.remote_services.is_empty());

        // Once more versions passed than are remembered, only a full table will do.
        for i in 0..RECENT_MAX {
            set_endpoints(&shared, "fra", "local", &[&format!("10.0.1.{i}")]);
            publish_all(&shared);
        }
        let newest = shared.publisher.current("network1").unwrap();
        assert!(newest.delta_from(first.version).is_none());
        assert!(newest.delta_from(last.version).is_some());
    }
}
