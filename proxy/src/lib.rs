//! eastwest-proxy: an SNI-routing TLS passthrough east-west gateway, Istio-compatible.
//!
//! The data path reads top to bottom: [`listener`] accepts, [`connection`] reads the
//! ClientHello ([`client_hello`]), routes ([`routing`], [`istio_sni`]), connects
//! ([`connect`], [`balance`]) and relays ([`copy`]). Config and routes are plain data from
//! `eastwest-routes`, validated once and swapped atomically; nothing on the data path locks.

mod admin;
mod balance;
pub mod client_hello;
mod connect;
mod connection;
pub mod control_client;
mod copy;
pub mod istio_sni;
mod listener;
pub mod metrics;
mod outlier;
mod reload;
mod routing;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use arc_swap::ArcSwap;
use eastwest_routes::{ProxyConfig, RouteTable};
use socket2::SockRef;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use reload::watch_config_file;

use crate::listener::RunningListener;
use crate::routing::{Routing, Update};

/// A running gateway: listeners, admin server and the live routing state. Clones share it.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
}

/// State every connection and the admin server read. Only appliers take the mutexes.
pub(crate) struct Shared {
    routing: ArcSwap<Routing>,
    ready: AtomicBool,
    /// Cancelled when accepting stops (drain begins).
    stop_accepting: CancellationToken,
    /// Cancelled when the drain period is over: remaining connections close.
    hard_stop: CancellationToken,
    connections: TaskTracker,
    listeners: Mutex<HashMap<String, RunningListener>>,
    /// Serialises appliers so no update is lost between load and store.
    apply: Mutex<()>,
    config_version: AtomicU64,
    /// Set once eastwest-control supplies routes; file reloads then keep them.
    routes_from_control: AtomicBool,
    config_file: Mutex<Option<PathBuf>>,
}

impl Shared {
    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        // A panic while holding these leaves plain data behind; carry on with it.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Frees a big superseded snapshot (100 000 endpoints are as many allocations) on a thread of
/// its own, so the applier — and the next table — need not wait for it.
fn drop_in_background(old: Arc<Routing>) {
    if old.routes.services.len() < 1_000 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("eastwest-drop".into())
        .spawn(move || drop(old));
    if let Err(err) = spawned {
        tracing::debug!(%err, "freeing the old route table inline");
    }
}

/// Counts a refused route table; the reasons, joined.
fn rejected(invalid: &[eastwest_routes::Invalid]) -> String {
    ::metrics::counter!(metrics::ROUTE_TABLES_REJECTED).increment(1);
    let why: Vec<String> = invalid.iter().map(|i| i.to_string()).collect();
    why.join("; ")
}

/// Why a new config was not applied (the old one stays).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid config:\n{}", .0.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<eastwest_routes::Invalid>),
    #[error(transparent)]
    Bind(#[from] std::io::Error),
    /// Listeners bound now would never be served, yet hold their ports open.
    #[error("draining: the config is not applied while the proxy shuts down")]
    Draining,
}

impl Proxy {
    /// Validates `config`, binds every listener and the admin address, and starts serving.
    pub async fn start(config: ProxyConfig) -> anyhow::Result<Proxy> {
        let invalid = config.validate();
        if !invalid.is_empty() {
            return Err(ApplyError::Invalid(invalid).into());
        }
        let prometheus = metrics::recorder();
        let admin_listener = tokio::net::TcpListener::bind(config.admin.address)
            .await
            .with_context(|| format!("admin: cannot bind {}", config.admin.address))?;
        let admin_addr = admin_listener.local_addr()?;
        let shared = Arc::new(Shared {
            routing: ArcSwap::from_pointee(Routing::compile(
                Arc::new(ProxyConfig::with_listeners(Vec::new())),
                RouteTable::default(),
                None,
            )),
            ready: AtomicBool::new(false),
            stop_accepting: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            connections: TaskTracker::new(),
            listeners: Mutex::new(HashMap::new()),
            apply: Mutex::new(()),
            config_version: AtomicU64::new(0),
            routes_from_control: AtomicBool::new(false),
            config_file: Mutex::new(None),
        });
        let proxy = Proxy { shared, admin_addr };
        proxy.apply_config(config).await?;
        admin::spawn(proxy.shared.clone(), admin_listener, prometheus.clone());
        metrics::spawn_upkeep(prometheus);
        proxy.shared.ready.store(true, Ordering::SeqCst);
        Ok(proxy)
    }

    /// Applies a new config: validates it, binds listeners it adds, swaps routing, and stops
    /// accepting on listeners it removes. Established connections are never touched.
    pub async fn apply_config(&self, mut config: ProxyConfig) -> Result<(), ApplyError> {
        let invalid = config.validate();
        if !invalid.is_empty() {
            return Err(ApplyError::Invalid(invalid));
        }
        if self.shared.stop_accepting.is_cancelled() {
            return Err(ApplyError::Draining);
        }
        // Bind what is new before changing anything, so a failed bind keeps the old config.
        let mut fresh = Vec::new();
        for l in &config.listeners {
            let keepalive = config.upstream.tcp_keepalive;
            let (handed_over, carried) = {
                let running = Shared::lock(&self.shared.listeners);
                // A rename keeps the address another listener holds: take over its socket,
                // since binding the address a second time would fail.
                let same_name = running.get(&l.name).filter(|r| r.address == l.address);
                let same_address = || {
                    running
                        .values()
                        .find(|r| r.address == l.address && l.address.port() != 0)
                };
                match same_name.or_else(same_address) {
                    Some(r) => {
                        // Changed socket settings reach connections accepted from now on.
                        if let Err(err) = listener::tune(SockRef::from(&*r.socket), l, keepalive) {
                            tracing::warn!(listener = %l.name, %err, "cannot update socket options");
                        }
                        if same_name.is_some() {
                            continue;
                        }
                        // The replaced listener's connections keep counting against
                        // max_connections until they end: on a rename, those on this address;
                        // on an address change, those of this name.
                        (Some(r.socket.clone()), Some(r.active.clone()))
                    }
                    None => (None, running.get(&l.name).map(|r| r.active.clone())),
                }
            };
            let socket = match handed_over {
                Some(socket) => socket,
                None => Arc::new(listener::bind(l, keepalive)?),
            };
            let active = carried.unwrap_or_default();
            fresh.push((l.name.clone(), l.address, socket, active));
        }
        let removed = {
            let _apply = Shared::lock(&self.shared.apply);
            let mut running = Shared::lock(&self.shared.listeners);
            // Shutdown cancels before it empties this map under the same lock, so a drain that
            // began while we bound is seen here, and the fresh sockets close with `fresh`.
            if self.shared.stop_accepting.is_cancelled() {
                return Err(ApplyError::Draining);
            }
            let old = self.shared.routing.load_full();
            if self.shared.config_version.load(Ordering::SeqCst) > 0
                && old.config.admin.address != config.admin.address
            {
                tracing::warn!(
                    old = %old.config.admin.address,
                    new = %config.admin.address,
                    "admin.address changes take effect at the next restart"
                );
            }
            // The routing keeps the table apart from the settings, sharing its services.
            let file_routes = std::mem::take(&mut config.routes);
            let routes = if self.shared.routes_from_control.load(Ordering::SeqCst) {
                old.routes.clone()
            } else {
                file_routes
            };
            let route_version = routes.version;
            self.shared.routing.store(Arc::new(Routing::compile(
                Arc::new(config),
                routes,
                Some(&old),
            )));
            let version = self.shared.config_version.fetch_add(1, Ordering::SeqCst) + 1;
            ::metrics::gauge!(metrics::CONFIG_VERSION).set(version as f64);
            ::metrics::gauge!(metrics::ROUTE_TABLE_VERSION).set(route_version as f64);

            let routing = self.shared.routing.load();
            for (name, address, socket, active) in fresh {
                let started = listener::start(&self.shared, &name, address, socket, active)?;
                if let Some(old) = running.insert(name, started) {
                    old.stop.cancel();
                }
            }
            let keep: Vec<&str> = routing
                .config
                .listeners
                .iter()
                .map(|l| l.name.as_str())
                .collect();
            let gone: Vec<String> = running
                .keys()
                .filter(|n| !keep.contains(&n.as_str()))
                .cloned()
                .collect();
            gone.into_iter()
                .filter_map(|n| running.remove(&n))
                .collect::<Vec<_>>()
        };
        for l in removed {
            l.stop.cancel();
        }
        Ok(())
    }

    /// Applies a route table from eastwest-control: validated, then swapped in atomically.
    /// From now on, config-file reloads keep the control plane's routes. Services shared (the
    /// same `Arc`) with the table in force were validated and compiled when they arrived and
    /// are not looked at again, so a table derived from the current one by a delta costs its
    /// changed services plus a pointer comparison per service.
    pub fn apply_routes(&self, table: RouteTable) -> Result<(), String> {
        let version = table.version;
        let _apply = Shared::lock(&self.shared.apply);
        let old = self.shared.routing.load_full();
        let routing = match old.update(table) {
            Update::Built(routing) => routing,
            Update::Invalid(invalid) => return Err(rejected(&invalid)),
            Update::NotIncremental(table) => {
                let mut invalid = Vec::new();
                table.validate_changed("", |svc| old.has_service(svc), &mut invalid);
                if !invalid.is_empty() {
                    return Err(rejected(&invalid));
                }
                // The settings stay as they are, shared.
                Routing::compile(old.config.clone(), table, Some(&old))
            }
        };
        self.shared.routing.store(Arc::new(routing));
        self.shared
            .routes_from_control
            .store(true, Ordering::SeqCst);
        ::metrics::gauge!(metrics::ROUTE_TABLE_VERSION).set(version as f64);
        drop_in_background(old);
        Ok(())
    }

    /// Where listener `name` is bound (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        Shared::lock(&self.shared.listeners)
            .get(name)
            .map(|l| l.local_addr)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The config in force, routes included (services shared, not copied).
    pub fn config(&self) -> Arc<ProxyConfig> {
        Arc::new(self.shared.routing.load().full_config())
    }

    /// The route table in force (cheap: services are shared).
    pub fn routes(&self) -> RouteTable {
        self.shared.routing.load().routes.clone()
    }

    /// Readiness as `/healthz/ready` reports it. Once draining it stays false, whatever a
    /// route table arriving meanwhile would say.
    pub fn set_ready(&self, ready: bool) {
        self.shared.ready.store(ready, Ordering::SeqCst);
        // Checked after the store: shutdown cancels first and clears readiness second, so
        // either it or this line leaves readiness false.
        if ready && self.shared.stop_accepting.is_cancelled() {
            self.shared.ready.store(false, Ordering::SeqCst);
        }
    }

    /// Records which file the config came from, for `/config_dump`.
    pub fn set_config_file(&self, path: PathBuf) {
        *Shared::lock(&self.shared.config_file) = Some(path);
    }

    /// Connections being relayed now, across listeners.
    pub fn active_connections(&self) -> usize {
        self.shared.connections.len()
    }

    /// Graceful drain: readiness goes false, accepting stops, established connections get the
    /// configured drain period to finish, then the rest are closed.
    pub async fn shutdown(self) {
        let period = self.shared.routing.load().config.drain_period;
        // In this order: see set_ready.
        self.shared.stop_accepting.cancel();
        self.shared.ready.store(false, Ordering::SeqCst);
        // The accept loops hold the sockets too; once they stop, the sockets close and new
        // connections are refused instead of queueing.
        Shared::lock(&self.shared.listeners).clear();
        self.shared.connections.close();
        let active = self.shared.connections.len();
        tracing::info!(active, ?period, "draining");
        if tokio::time::timeout(period, self.shared.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.shared.connections.len(),
                "drain period over; closing remaining connections"
            );
            self.shared.hard_stop.cancel();
            self.shared.connections.wait().await;
        }
        // Also stops the admin server.
        self.shared.hard_stop.cancel();
        tracing::info!("drained");
    }
}
