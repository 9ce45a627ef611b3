//! The admin server (port 15021 by default): readiness, Prometheus metrics, config dump.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{Shared, Shared as S};

/// Admin connections served at once. The port usually sits on the east-west load balancer
/// (as Istio's status port does): a flood of connections must not take the file descriptors
/// the gateway's listeners need. Beyond this, new ones are closed at once.
const MAX_CONNECTIONS: usize = 128;
/// A connection that has not sent a whole request head this long after opening, or after
/// its last response, is closed (probes and scrapes send theirs at once).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) fn spawn(shared: Arc<Shared>, listener: TcpListener, prometheus: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shared.hard_stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        tracing::warn!(%err, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("admin connection limit reached; closing a new connection");
                continue;
            };
            let shared = shared.clone();
            let prometheus = prometheus.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    let prometheus = prometheus.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, &prometheus, req)) }
                });
                // HTTP/1.1 only: what kubelet probes, Prometheus and curl speak.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(err) = conn.await {
                    tracing::debug!(%err, "admin connection error");
                }
            });
        }
    });
}

fn handle(
    shared: &Shared,
    prometheus: &PrometheusHandle,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/healthz/ready" => {
            if shared.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            prometheus.run_upkeep();
            let mut resp =
                Response::new(Full::new(Bytes::from(crate::metrics::render(prometheus))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/config_dump" => {
            let routing = shared.routing.load();
            // The routing keeps its table apart from the settings; show them together.
            let mut config = serde_json::to_value(&*routing.config).unwrap_or_default();
            config["routes"] = serde_json::to_value(&routing.routes).unwrap_or_default();
            let dump = serde_json::json!({
                "config_version": shared.config_version.load(Ordering::SeqCst),
                "route_table_version": routing.routes.version,
                "routes_source": if shared.routes_from_control.load(Ordering::SeqCst) { "control" } else { "config" },
                "config_file": S::lock(&shared.config_file).as_ref().map(|p| p.display().to_string()),
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
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz/ready, /metrics, /config_dump\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}
