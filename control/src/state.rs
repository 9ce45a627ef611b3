//! The state every task of a running control shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::model::Model;
use crate::publish::Publisher;

/// Settings fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub network: String,
    pub cluster_domain: String,
    pub debounce: Duration,
    /// Longest the first publication waits for every cluster to sync.
    pub sync_timeout: Duration,
    /// Whether remote secrets are watched (then readiness waits for their first list).
    pub watch_secrets: bool,
    /// Pod label keys copied onto endpoints for subsets (empty: Pods are not watched).
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
            self.changed.notify_one();
        }
    }

    /// What has not synced yet (empty when ready).
    pub fn not_synced(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .model()
            .clusters
            .iter()
            .filter(|(_, c)| !c.synced())
            .map(|(name, _)| format!("cluster {name}"))
            .collect();
        if self.settings.watch_secrets && !self.secrets_synced.load(Ordering::Acquire) {
            out.push("remote secrets".to_string());
        }
        out
    }
}
