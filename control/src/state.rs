//! The state every task of a running control shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::warn;

use crate::metrics::Metrics;
use crate::model::Model;
use crate::publish::Publisher;

/// Settings fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The local cluster's name.
    pub cluster: String,
    pub network: String,
    pub cluster_domain: String,
    pub debounce: Duration,
    /// Longest the first publication waits for every cluster to sync, and longest a remote
    /// cluster (or the remote-secret list) that has not synced holds readiness back before
    /// control was first ready (afterwards a remote cluster never does).
    pub sync_timeout: Duration,
    /// Whether remote secrets are watched (then readiness waits for their first list).
    pub watch_secrets: bool,
    /// Pod label keys copied onto endpoints for subsets (empty: none).
    pub subset_labels: Vec<String>,
    /// How often a cluster that serves no DestinationRules is asked again.
    pub destination_rule_recheck: Duration,
}

pub struct Shared {
    pub settings: Settings,
    model: Mutex<Model>,
    /// Signalled after every change of the model; the publisher coalesces them.
    pub changed: Notify,
    pub metrics: Metrics,
    pub publisher: Publisher,
    pub secrets_synced: AtomicBool,
    /// The remote-secret list did not sync within `sync_timeout`: it no longer holds readiness.
    pub secrets_timed_out: AtomicBool,
    /// Control has been ready once: from then on only the local cluster can take readiness
    /// away, so a remote cluster added later (a new remote secret) does not make every replica
    /// unready at once while it syncs.
    been_ready: AtomicBool,
}

impl Shared {
    pub fn new(settings: Settings, model: Model) -> Shared {
        Shared {
            settings,
            model: Mutex::new(model),
            changed: Notify::new(),
            metrics: Metrics::default(),
            publisher: Publisher::new(),
            secrets_synced: AtomicBool::new(false),
            secrets_timed_out: AtomicBool::new(false),
            been_ready: AtomicBool::new(false),
        }
    }

    /// The model, even if a task panicked while holding it (its data is still consistent per
    /// object, which is all route computation needs).
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `f` to the model; when it reports a change, marks the model dirty and wakes the
    /// publisher.
    pub fn update(&self, f: impl FnOnce(&mut Model) -> bool) {
        let changed = {
            let mut m = self.model();
            let changed = f(&mut m);
            if changed {
                m.mark_dirty();
            }
            changed
        };
        if changed {
            self.note_if_ready();
            self.changed.notify_one();
        }
    }

    /// Latches `been_ready` the first time nothing holds readiness back (checked after every
    /// change, so it does not depend on anyone polling `/healthz/ready`).
    pub fn note_if_ready(&self) {
        if !self.been_ready.load(Ordering::Acquire) && self.not_synced().is_empty() {
            self.been_ready.store(true, Ordering::Release);
        }
    }

    /// What has not synced yet and still holds readiness back (empty when ready). A remote
    /// cluster, or the remote-secret list, that did not sync within `sync_timeout` of being
    /// added no longer does (like istiod's PILOT_REMOTE_CLUSTER_TIMEOUT), and once control has
    /// been ready neither does a remote cluster added later; the local cluster always does,
    /// since a table without it would withdraw every local route.
    pub fn not_synced(&self) -> Vec<String> {
        let been_ready = self.been_ready.load(Ordering::Acquire);
        let local = &self.settings.cluster;
        let mut out: Vec<String> = self
            .model()
            .clusters
            .iter()
            .filter(|(name, c)| {
                !c.reported_synced() && (*name == local || (!been_ready && !c.sync_timed_out))
            })
            .map(|(name, _)| format!("cluster {name}"))
            .collect();
        if !been_ready
            && self.settings.watch_secrets
            && !self.secrets_synced.load(Ordering::Acquire)
            && !self.secrets_timed_out.load(Ordering::Acquire)
        {
            out.push("remote secrets".to_string());
        }
        out
    }
}

/// Everything that has not synced, whether or not it still holds readiness back: while this
/// is not empty the published tables are marked partial (see
/// [`RouteTable::partial`](eastwest_routes::RouteTable)). Takes the model so the publisher,
/// which holds its lock, can ask.
pub fn unsynced(shared: &Shared, model: &Model) -> Vec<String> {
    let mut out: Vec<String> = model
        .clusters
        .iter()
        .filter(|(_, c)| !c.reported_synced())
        .map(|(name, _)| format!("cluster {name}"))
        .collect();
    if shared.settings.watch_secrets && !shared.secrets_synced.load(Ordering::Acquire) {
        out.push("remote secrets".to_string());
    }
    out
}

/// Waits `sync_timeout`, then stops the remote-secret list from holding readiness back if it
/// has not synced by then (logged once).
pub async fn secrets_sync_deadline(shared: Arc<Shared>) {
    tokio::time::sleep(shared.settings.sync_timeout).await;
    if !shared.secrets_synced.load(Ordering::Acquire) {
        warn!(timeout = ?shared.settings.sync_timeout,
              "remote secrets not listed within the sync timeout; ready without them");
        shared.secrets_timed_out.store(true, Ordering::Release);
        shared.note_if_ready();
        shared.changed.notify_one();
    }
}
