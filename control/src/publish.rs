//! Versioning and fan-out of route tables.
//!
//! One task recomputes the tables of every network some proxy subscribed to whenever the model
//! changed, at most once per debounce interval: the first change after a quiet period is
//! published at once, the rest of a burst is coalesced into the next publication. A table equal
//! to the last one is not republished. Each table is serialised once and shared by all streams
//! of its network; a slow stream skips straight to the newest version.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eastwest_routes::{NetworkGateway, RouteTable};
use tokio::sync::watch;
use tracing::{debug, error, info};

use crate::compute::{network_gateways, service_entry, Entry};
use crate::model::ObjKey;
use crate::state::Shared;

/// A serialised table: one NDJSON line.
#[derive(Debug)]
pub struct Published {
    pub line: Bytes,
}

impl Published {
    /// The table itself (parsed back; for tests and debugging, not the hot path).
    pub fn table(&self) -> Option<RouteTable> {
        serde_json::from_slice(&self.line).ok()
    }
}

pub type TableRx = watch::Receiver<Option<Arc<Published>>>;

/// A Service's part of a table, serialised once and reused until the Service changes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fragment {
    service: Option<Vec<u8>>,
    remote: Vec<Vec<u8>>,
}

impl Fragment {
    fn of(entry: Entry) -> Option<Fragment> {
        if entry.service.is_none() && entry.remote.is_empty() {
            return None;
        }
        Some(Fragment {
            service: entry.service.and_then(|s| serde_json::to_vec(&s).ok()),
            remote: entry
                .remote
                .iter()
                .filter_map(|r| serde_json::to_vec(r).ok())
                .collect(),
        })
    }
}

/// What was last published for a network, by Service, so a change re-serialises one Service.
#[derive(Debug, Default)]
struct NetCache {
    fragments: BTreeMap<ObjKey, Fragment>,
    gateways: Vec<NetworkGateway>,
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
    // from proxies that have a complete one), but not forever.
    loop {
        let pending = shared.not_synced();
        if pending.is_empty() {
            info!(elapsed = ?start.elapsed(), "all clusters synced");
            break;
        }
        let left = shared.settings.sync_timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            error!(?pending, "sync timeout; publishing what is known");
            break;
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(left) => {}
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
    let domain = &shared.settings.cluster_domain;
    let mut channels = shared.publisher.channels();
    // Forget networks nobody listens to any more (the local one always stays).
    channels.retain(|net, ch| *net == shared.settings.network || ch.tx.receiver_count() > 0);
    for (net, ch) in channels.iter_mut() {
        let never_published = ch.tx.borrow().is_none();
        let mut changed = never_published;
        let cache = match (&mut ch.cache, all) {
            (Some(cache), false) => {
                for key in &dirty {
                    let fragment = Fragment::of(service_entry(&model, net, key, domain));
                    let old = match fragment {
                        Some(f) => cache.fragments.insert(key.clone(), f),
                        None => cache.fragments.remove(key),
                    };
                    changed |= old.as_ref() != cache.fragments.get(key);
                }
                cache
            }
            (slot, _) => {
                let fragments: BTreeMap<ObjKey, Fragment> = model
                    .all_service_keys()
                    .into_iter()
                    .filter_map(|k| {
                        let f = Fragment::of(service_entry(&model, net, &k, domain))?;
                        Some((k, f))
                    })
                    .collect();
                changed |= slot.as_ref().is_none_or(|c| c.fragments != fragments);
                let cache = slot.get_or_insert_with(NetCache::default);
                cache.fragments = fragments;
                cache
            }
        };
        let gateways = network_gateways(&model, net);
        if gateways != cache.gateways {
            cache.gateways = gateways;
            changed = true;
        }
        if !changed {
            continue;
        }
        let version = shared
            .publisher
            .next_version
            .fetch_add(1, Ordering::Relaxed);
        let capacity = ch
            .tx
            .borrow()
            .as_ref()
            .map_or(4096, |p| p.line.len() + 4096);
        let line = assemble(version, cache, capacity);
        debug!(network = %net, version, bytes = line.len(), "publishing route table");
        ch.tx.send_replace(Some(Arc::new(Published {
            line: Bytes::from(line),
        })));
        shared
            .metrics
            .published(version, dirty_since.map(|t| t.elapsed()));
    }
}

/// The NDJSON line of a `RouteTable` from its cached parts (same JSON serde would write).
fn assemble(version: u64, cache: &NetCache, capacity: usize) -> Vec<u8> {
    let mut line = Vec::with_capacity(capacity);
    line.extend_from_slice(format!("{{\"version\":{version},\"services\":[").as_bytes());
    let services = cache
        .fragments
        .values()
        .filter_map(|f| f.service.as_deref());
    join(&mut line, services);
    line.extend_from_slice(b"],\"remote_services\":[");
    let remote = cache
        .fragments
        .values()
        .flat_map(|f| f.remote.iter().map(Vec::as_slice));
    join(&mut line, remote);
    line.extend_from_slice(b"],\"network_gateways\":");
    match serde_json::to_vec(&cache.gateways) {
        Ok(g) => line.extend_from_slice(&g),
        Err(e) => {
            error!(error = %e, "serialising network gateways failed");
            line.extend_from_slice(b"[]");
        }
    }
    line.extend_from_slice(b"}\n");
    line
}

fn join<'a>(out: &mut Vec<u8>, parts: impl Iterator<Item = &'a [u8]>) {
    for (i, part) in parts.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::compute::route_table;
    use crate::model::{ClusterState, Model, ReadyEndpoint, ServiceDef, ServicePortDef, SliceDef};

    fn key(ns: &str, name: &str) -> ObjKey {
        (ns.to_string(), name.to_string())
    }

    /// The hand-assembled line parses to exactly what serde would have produced.
    #[test]
    fn assembled_line_is_the_serde_table() {
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
        let mut cache = NetCache::default();
        for k in model.all_service_keys() {
            if let Some(f) = Fragment::of(service_entry(&model, "network1", &k, "cluster.local")) {
                cache.fragments.insert(k, f);
            }
        }
        cache.gateways = network_gateways(&model, "network1");
        let line = assemble(42, &cache, 0);
        let parsed: RouteTable = serde_json::from_slice(&line).unwrap();
        let mut expected = route_table(&model, "network1", "cluster.local");
        expected.version = 42;
        assert_eq!(parsed, expected);
        assert_eq!(parsed.services.len(), 1);
        assert_eq!(parsed.remote_services.len(), 1);
        assert_eq!(parsed.network_gateways.len(), 1);
    }
}
