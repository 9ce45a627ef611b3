//! Versioning and fan-out of route tables.
//!
//! One task recomputes the tables of every network some proxy subscribed to whenever the model
//! changed, at most once per debounce interval: the first change after a quiet period is
//! published at once, the rest of a burst is coalesced into the next publication. A table equal
//! to the last one is not republished. Each table is serialised once and shared by all streams
//! of its network; a slow stream skips straight to the newest version.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eastwest_routes::RouteTable;
use tokio::sync::watch;
use tracing::{debug, error, info};

use crate::compute::route_table;
use crate::state::Shared;

/// A serialised table: one NDJSON line.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub line: Bytes,
    pub table: Arc<RouteTable>,
}

pub type TableRx = watch::Receiver<Option<Arc<Published>>>;

struct Channel {
    tx: watch::Sender<Option<Arc<Published>>>,
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
        channels.insert(network.to_string(), Channel { tx });
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
    let networks: Vec<String> = {
        let mut channels = shared.publisher.channels();
        // Forget networks nobody listens to any more (the local one always stays).
        channels.retain(|net, ch| *net == shared.settings.network || ch.tx.receiver_count() > 0);
        channels.keys().cloned().collect()
    };
    let (tables, dirty_since) = {
        let mut model = shared.model();
        let tables: Vec<(String, RouteTable)> = networks
            .into_iter()
            .map(|net| {
                let t = route_table(&model, &net, &shared.settings.cluster_domain);
                (net, t)
            })
            .collect();
        (tables, model.dirty_since.take())
    };
    for (net, mut table) in tables {
        let channels = shared.publisher.channels();
        let Some(ch) = channels.get(&net) else {
            continue;
        };
        // Unchanged tables are not republished (compared as if they had the same version).
        if let Some(current) = ch.tx.borrow().as_ref() {
            table.version = current.version;
            if *current.table == table {
                continue;
            }
        }
        let version = shared
            .publisher
            .next_version
            .fetch_add(1, Ordering::Relaxed);
        table.version = version;
        let mut line = match serde_json::to_vec(&table) {
            Ok(l) => l,
            Err(e) => {
                error!(network = %net, error = %e, "serialising route table failed");
                continue;
            }
        };
        line.push(b'\n');
        debug!(network = %net, version, services = table.services.len(), bytes = line.len(),
               "publishing route table");
        ch.tx.send_replace(Some(Arc::new(Published {
            version,
            line: Bytes::from(line),
            table: Arc::new(table),
        })));
        shared
            .metrics
            .published(version, dirty_since.map(|t| t.elapsed()));
    }
}
