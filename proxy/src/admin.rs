//! The admin servers, in Istio's layout: status (15021: `/healthz/ready` only, what the load
//! balancer publishes), metrics (15020: `/metrics`, scraped in-cluster) and debug
//! (127.0.0.1:15000: `/config_dump`, plus the other two). One request handler, one
//! connection policy; each server answers only its own paths.
//!
//! A port a load balancer publishes gets floods of idle and slow connections. Each server
//! holds a bounded set of connections, and a new one beyond the bound closes the connection
//! idle the longest instead of being refused: a flood cycles through the set while every
//! probe, which sends its request at once, is still answered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::listener::FdReserve;
use crate::{Shared, Shared as S};

/// A connection that has not sent a whole request head this long after opening, or after
/// its last response, is closed (probes and scrapes send theirs at once).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Which admin server: decides the paths served and how many connections are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    Status,
    Metrics,
    Debug,
}

impl Server {
    pub const ALL: [Server; 3] = [Server::Status, Server::Metrics, Server::Debug];

    fn name(self) -> &'static str {
        match self {
            Server::Status => "status",
            Server::Metrics => "metrics",
            Server::Debug => "debug",
        }
    }

    /// Connections held at once. Load balancer health checkers and kubelet open a handful;
    /// Prometheus one or two. Beyond it the idlest is closed, so the bound only caps the
    /// descriptors a flood can take (they are part of the reserve `max_connections` leaves).
    pub const fn max_connections(self) -> usize {
        match self {
            Server::Status => 128,
            Server::Metrics | Server::Debug => 32,
        }
    }

    fn serves(self, path: &str) -> bool {
        match self {
            Server::Status => path == "/healthz/ready",
            Server::Metrics => path == "/metrics",
            Server::Debug => matches!(path, "/healthz/ready" | "/metrics" | "/config_dump"),
        }
    }

    fn not_found(self) -> &'static str {
        match self {
            Server::Status => "not found: this port serves /healthz/ready only\n",
            Server::Metrics => "not found: this port serves /metrics only\n",
            Server::Debug => "not found: try /healthz/ready, /metrics, /config_dump\n",
        }
    }
}

/// Descriptors all admin servers may hold together.
pub(crate) const MAX_ADMIN_CONNECTIONS: usize = Server::Status.max_connections()
    + Server::Metrics.max_connections()
    + Server::Debug.max_connections();

/// One held connection: when it was last active, and how to close it.
struct Held {
    /// Order of its last activity (accept or response), from the server's clock below.
    last_active: Arc<AtomicU64>,
    close: CancellationToken,
}

/// The connections one server holds; touched at accept and close, never per byte.
#[derive(Default)]
struct HeldConnections {
    conns: Mutex<HashMap<u64, Held>>,
    /// A logical clock: accept and every finished request take the next tick.
    clock: AtomicU64,
}

impl HeldConnections {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new connection, closing the idlest held one first when at `max`.
    /// Requests are answered at once (no handler awaits), so a held connection is idle
    /// unless it is sending a request head — which a probe does within a millisecond of its
    /// last activity, and a slow client is welcome to lose.
    fn admit(&self, id: u64, max: usize) -> (Arc<AtomicU64>, CancellationToken) {
        let held = Held {
            last_active: Arc::new(AtomicU64::new(self.tick())),
            close: CancellationToken::new(),
        };
        let handles = (held.last_active.clone(), held.close.clone());
        let mut conns = S::lock(&self.conns);
        if conns.len() >= max {
            let idlest = conns
                .iter()
                .min_by_key(|(_, h)| h.last_active.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            if let Some(held) = idlest.and_then(|id| conns.remove(&id)) {
                held.close.cancel();
            }
        }
        conns.insert(id, held);
        handles
    }

    fn remove(&self, id: u64) {
        S::lock(&self.conns).remove(&id);
    }
}

/// Serves `server` on `listener` until the drain is over.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    server: Server,
    listener: TcpListener,
    prometheus: &'static PrometheusHandle,
) {
    let held = Arc::new(HeldConnections::default());
    tokio::spawn(async move {
        let mut next_id = 0u64;
        let mut reserve = FdReserve::new();
        loop {
            let accepted = tokio::select! {
                _ = shared.hard_stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) if crate::listener::out_of_descriptors(&err) => {
                    // Out of descriptors: spend the reserved one on the waiting connection, so
                    // a probe is still answered; the reserve is taken again once one frees.
                    reserve.refill();
                    match reserve.release_and_accept(&listener) {
                        Some(stream) => stream,
                        None => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(server = server.name(), %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            reserve.refill();
            next_id += 1;
            serve_connection(&shared, server, &held, next_id, stream, prometheus);
        }
    });
}

fn serve_connection(
    shared: &Arc<Shared>,
    server: Server,
    held: &Arc<HeldConnections>,
    id: u64,
    stream: TcpStream,
    prometheus: &'static PrometheusHandle,
) {
    let (last_active, close) = held.admit(id, server.max_connections());
    let shared = shared.clone();
    let held = held.clone();
    tokio::spawn(async move {
        let service = {
            let shared = shared.clone();
            let held = held.clone();
            hyper::service::service_fn(move |req| {
                let resp = handle(&shared, server, prometheus, req);
                last_active.store(held.tick(), Ordering::Relaxed);
                async move { Ok::<_, Infallible>(resp) }
            })
        };
        // HTTP/1.1 only: what kubelet probes, load balancer checks, Prometheus and curl speak.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            result = conn => if let Err(err) = result {
                tracing::debug!(server = server.name(), %err, "admin connection error");
            },
            _ = close.cancelled() => {
                tracing::debug!(server = server.name(), "closed the idlest admin connection for a new one");
            }
            _ = shared.hard_stop.cancelled() => {}
        }
        held.remove(id);
    });
}

fn handle(
    shared: &Shared,
    server: Server,
    prometheus: &PrometheusHandle,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path();
    if !server.serves(path) {
        return text(StatusCode::NOT_FOUND, server.not_found());
    }
    match path {
        "/healthz/ready" => {
            if shared.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            // Readiness as of this scrape, so alerts see what the load balancer sees.
            let ready = shared.ready.load(Ordering::SeqCst);
            metrics::gauge!(crate::metrics::READY).set(if ready { 1.0 } else { 0.0 });
            prometheus.run_upkeep();
            let mut resp =
                Response::new(Full::new(Bytes::from(crate::metrics::render(prometheus))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => config_dump(shared),
    }
}

fn config_dump(shared: &Shared) -> Response<Full<Bytes>> {
    let routing = shared.routing.load();
    // The routing keeps its table apart from the settings; show them together.
    let mut config = serde_json::to_value(&*routing.config).unwrap_or_default();
    config["routes"] = serde_json::to_value(&routing.routes).unwrap_or_default();
    let last_reload_error = S::lock(&shared.last_reload_error).as_ref().map(|e| {
        serde_json::json!({
            "error": e.error,
            "at": humantime::format_rfc3339_seconds(e.at).to_string(),
        })
    });
    let dump = serde_json::json!({
        "config_version": shared.config_version.load(Ordering::SeqCst),
        "route_table_version": routing.routes.version,
        "routes_source": if shared.routes_from_control.load(Ordering::SeqCst) { "control" } else { "config" },
        "config_file": S::lock(&shared.config_file).as_ref().map(|p| p.display().to_string()),
        "last_reload_error": last_reload_error,
        "identity": shared.identity.get().map(|id| id.status.borrow().clone()),
        "config": config,
    });
    match serde_json::to_vec_pretty(&dump) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}
