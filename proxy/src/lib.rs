//! eastwest-proxy: an SNI-routing TLS passthrough east-west gateway, Istio-compatible.
//!
//! The data path reads top to bottom: [`listener`] accepts, [`connection`] reads the
//! ClientHello ([`client_hello`]), routes ([`routing`], [`istio_sni`]), connects
//! ([`connect`], [`balance`]) and relays ([`copy`]). `hbone` listeners ([`hbone`]) terminate
//! mTLS + HTTP/2 instead and route each CONNECT stream through the same routing and connect
//! steps. Config and routes are plain data from
//! `eastwest-routes`, validated once and swapped atomically; nothing on the data path locks.

mod admin;
mod balance;
pub mod client_hello;
mod connect;
mod connection;
pub mod control_client;
mod copy;
pub mod fd_limit;
mod hard_stop;
pub mod hbone;
pub mod identity;
pub mod istio_metrics;
pub mod istio_sni;
mod listener;
pub mod metrics;
mod outlier;
mod reload;
mod routing;
mod token_timing;

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

/// A running gateway: listeners, admin servers and the live routing state. Clones share it.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    status_addr: SocketAddr,
    metrics_addr: SocketAddr,
    debug_addr: SocketAddr,
}

/// State every connection and the admin servers read. Only appliers take the mutexes.
pub(crate) struct Shared {
    routing: ArcSwap<Routing>,
    ready: AtomicBool,
    /// Cancelled when the drain begins: readiness stays false, configs are no longer applied.
    draining: CancellationToken,
    /// Cancelled when accepting stops (`drain_accept_period` after the drain began).
    stop_accepting: CancellationToken,
    /// Cancelled when the drain period is over: remaining connections close.
    hard_stop: hard_stop::HardStop,
    connections: TaskTracker,
    listeners: Mutex<HashMap<String, RunningListener>>,
    /// Serialises appliers so no update is lost between load and store.
    apply: Mutex<()>,
    config_version: AtomicU64,
    /// Set once eastwest-control supplies routes; file reloads then keep them.
    routes_from_control: AtomicBool,
    config_file: Mutex<Option<PathBuf>>,
    /// The last config reload that failed, for `/config_dump`; cleared by a good one.
    last_reload_error: Mutex<Option<ReloadError>>,
    /// `max_connections` of a listener that does not set it, from the open-file limit.
    default_max_connections: usize,
    /// The gateway's mesh identity: `hbone` listeners accept with
    /// `identity.server_config.borrow().clone()`, read at each accept, so a rotation never
    /// touches open connections; `/config_dump` shows its status. Started by the first config
    /// with `identity:`.
    identity: std::sync::OnceLock<identity::IdentityHandle>,
}

/// Why and when a config reload was refused.
pub(crate) struct ReloadError {
    error: String,
    at: std::time::SystemTime,
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
    /// The identity an `hbone` listener presents could not be loaded.
    #[error("identity: {0:#}")]
    Identity(anyhow::Error),
}

impl Proxy {
    /// Validates `config`, binds every listener and the admin servers, and starts serving,
    /// ready at once.
    pub async fn start(config: ProxyConfig) -> anyhow::Result<Proxy> {
        Self::start_with_readiness(config, true).await
    }

    /// As [`Proxy::start`], but `ready: false` keeps readiness failing until
    /// [`Proxy::set_ready`]: a gateway waiting for its routes from control must never answer a
    /// probe with 200 in between, or the load balancer sends it traffic it cannot route.
    pub async fn start_with_readiness(config: ProxyConfig, ready: bool) -> anyhow::Result<Proxy> {
        let invalid = config.validate();
        if !invalid.is_empty() {
            return Err(ApplyError::Invalid(invalid).into());
        }
        let prometheus = metrics::recorder();
        let admin = &config.admin;
        if admin.legacy_address {
            tracing::warn!(
                status_address = %admin.status_address,
                metrics_address = %admin.metrics_address,
                debug_address = %admin.debug_address,
                "admin.address is now admin.status_address and serves /healthz/ready only; \
                 /metrics moved to admin.metrics_address, /config_dump to admin.debug_address"
            );
        }
        let mut servers = Vec::new();
        for (server, (key, address)) in admin::Server::ALL.into_iter().zip(admin.addresses()) {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("{key}: cannot bind {address}"))?;
            servers.push((server, listener.local_addr()?, listener));
        }
        let fd_limit = fd_limit::current();
        let default_max_connections = fd_limit::default_max_connections(fd_limit);
        tracing::debug!(fd_limit, default_max_connections, "connection limit");
        let shared = Arc::new(Shared {
            routing: ArcSwap::from_pointee(Routing::compile(
                Arc::new(ProxyConfig::with_listeners(Vec::new())),
                RouteTable::default(),
                None,
            )),
            ready: AtomicBool::new(false),
            draining: CancellationToken::new(),
            stop_accepting: CancellationToken::new(),
            hard_stop: hard_stop::HardStop::new(),
            connections: TaskTracker::new(),
            listeners: Mutex::new(HashMap::new()),
            apply: Mutex::new(()),
            config_version: AtomicU64::new(0),
            routes_from_control: AtomicBool::new(false),
            config_file: Mutex::new(None),
            last_reload_error: Mutex::new(None),
            default_max_connections,
            identity: std::sync::OnceLock::new(),
        });
        let proxy = Proxy {
            shared,
            status_addr: servers[0].1,
            metrics_addr: servers[1].1,
            debug_addr: servers[2].1,
        };
        metrics::register_at_zero();
        proxy.apply_config(config).await?;
        for (server, _, listener) in servers {
            admin::spawn(proxy.shared.clone(), server, listener, prometheus);
        }
        metrics::spawn_upkeep(prometheus);
        proxy.shared.ready.store(ready, Ordering::SeqCst);
        Ok(proxy)
    }

    /// Applies a new config: validates it, binds listeners it adds, swaps routing, and stops
    /// accepting on listeners it removes. Established connections are never touched.
    pub async fn apply_config(&self, mut config: ProxyConfig) -> Result<(), ApplyError> {
        let invalid = config.validate();
        if !invalid.is_empty() {
            return Err(ApplyError::Invalid(invalid));
        }
        if self.shared.draining.is_cancelled() {
            return Err(ApplyError::Draining);
        }
        self.start_identity(&config).await?;
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
            if self.shared.draining.is_cancelled() {
                return Err(ApplyError::Draining);
            }
            let old = self.shared.routing.load_full();
            if self.shared.config_version.load(Ordering::SeqCst) > 0 {
                let changed = old
                    .config
                    .admin
                    .addresses()
                    .into_iter()
                    .zip(config.admin.addresses());
                for ((key, old), (_, new)) in changed.filter(|(old, new)| old != new) {
                    tracing::warn!(%old, %new, "{key} changes take effect at the next restart");
                }
                if old.config.identity != config.identity {
                    // Started once, before the listeners (see Shared::identity).
                    tracing::warn!("identity changes take effect at the next restart");
                }
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
            metrics::route_table_applied(route_version);

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

    /// Starts the mesh identity with the first config that has `identity:` (before its
    /// listeners bind: an `hbone` listener needs the certificate from its first accept).
    /// Later changes to `identity:` take effect at the next restart; the identity module
    /// watches its own files and renews its own certificate.
    async fn start_identity(&self, config: &ProxyConfig) -> Result<(), ApplyError> {
        let Some(identity_config) = config.identity.as_ref() else {
            return Ok(());
        };
        if self.shared.identity.get().is_some() {
            return Ok(());
        }
        let handle =
            identity::start_with_status(identity_config, self.shared.hard_stop.child_token())
                .await
                .map_err(ApplyError::Identity)?;
        // Two appliers racing here both loaded the same identity; either result serves.
        let _ = self.shared.identity.set(handle);
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
        metrics::route_table_applied(version);
        drop_in_background(old);
        Ok(())
    }

    /// Where listener `name` is bound (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        Shared::lock(&self.shared.listeners)
            .get(name)
            .map(|l| l.local_addr)
    }

    /// Where the status server (`/healthz/ready` only) is bound.
    pub fn status_addr(&self) -> SocketAddr {
        self.status_addr
    }

    /// Where the metrics server (`/metrics`) is bound.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Where the debug server (`/config_dump`, `/metrics`, `/healthz/ready`) is bound.
    pub fn debug_addr(&self) -> SocketAddr {
        self.debug_addr
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
        if ready && self.shared.draining.is_cancelled() {
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

    /// Records the outcome of a config reload for `/config_dump`: `Err` keeps the error and
    /// its time until a reload succeeds.
    pub(crate) fn record_reload(&self, result: Result<(), String>) {
        *Shared::lock(&self.shared.last_reload_error) = result.err().map(|error| ReloadError {
            error,
            at: std::time::SystemTime::now(),
        });
    }

    /// Graceful drain, in the order a load balancer in front needs: readiness fails at once,
    /// the listeners keep accepting and routing for `drain_accept_period` (until the health
    /// check has seen it), then close; established connections get `drain_period` to finish;
    /// then the rest are closed.
    pub async fn shutdown(self) {
        let config = self.shared.routing.load().config.clone();
        // In this order: see set_ready.
        self.shared.draining.cancel();
        self.shared.ready.store(false, Ordering::SeqCst);
        tracing::info!(accept_period = ?config.drain_accept_period, "draining: not ready; still accepting");
        tokio::time::sleep(config.drain_accept_period).await;
        self.shared.stop_accepting.cancel();
        // The accept loops hold the sockets too; once they stop, the sockets close and new
        // connections are refused instead of queueing.
        Shared::lock(&self.shared.listeners).clear();
        self.shared.connections.close();
        let active = self.shared.connections.len();
        let period = config.drain_period;
        tracing::info!(active, ?period, "draining: stopped accepting");
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
        // Also stops the admin servers.
        self.shared.hard_stop.cancel();
        tracing::info!("drained");
    }
}
