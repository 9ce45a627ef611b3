//! The admin endpoint: `/healthz/ready`, `/metrics`, `/debug/routes?network=N`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::debug;

use crate::server::{query_param, text, Body};
use crate::state::Shared;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz/ready" => {
            let pending = shared.not_synced();
            if pending.is_empty() {
                // Ready without a remote that timed out: say so, its routes are missing.
                let unsynced = crate::state::unsynced(shared, &shared.model());
                if unsynced.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::OK,
                        format!(
                            "ready; tables partial, not synced: {}\n",
                            unsynced.join(", ")
                        ),
                    )
                }
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not synced: {}\n", pending.join(", ")),
                )
            }
        }
        "/metrics" => text(StatusCode::OK, crate::metrics::render(shared)),
        "/debug/routes" => {
            let network =
                query_param(req.uri().query(), "network").unwrap_or(&shared.settings.network);
            match shared.publisher.current(network) {
                Some(p) => text(
                    StatusCode::OK,
                    String::from_utf8_lossy(&p.line()).into_owned(),
                ),
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no table for network {network}\n"),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /healthz/ready, /metrics or /debug/routes?network=N\n",
        ),
    }
}
