//! The route stream: `GET /v1/routes?cluster=C&network=N` over HTTP/2 answers 200 with an
//! NDJSON body, the current table first and then every new version. With `&delta=1` every
//! line is a `RouteUpdate`: the full table first, then only what changed since the version the
//! stream sent last (a full table again if those changes are no longer known).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eastwest_routes::ROUTES_STREAM_PATH;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::publish::TableRx;
use crate::state::Shared;

pub type Body = BoxBody<Bytes, Infallible>;

/// Accepts control connections until aborted. With `tls`, every client must present a
/// certificate from the mesh root; without, the caller made sure the listener is loopback.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    // Owned here so that stopping the server (aborting this task) closes every stream.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => serve_conn(shared, s).await,
                    Err(e) => info!(%peer, error = %e, "control TLS handshake failed"),
                },
                None => serve_conn(shared, stream).await,
            }
        });
    }
}

async fn serve_conn<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    shared: Arc<Shared>,
    io: IO,
) {
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req)) }
    });
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Notice proxies that vanished without closing their connection.
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20))
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = result {
        debug!(error = %e, "control connection ended");
    }
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Value of `name` in a query string (no percent-decoding: cluster and network names are DNS
/// labels).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() != ROUTES_STREAM_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("no such path; use {ROUTES_STREAM_PATH}\n"),
        );
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let query = req.uri().query();
    let (Some(cluster), Some(network)) = (
        query_param(query, "cluster").filter(|c| !c.is_empty()),
        query_param(query, "network").filter(|n| !n.is_empty()),
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{ROUTES_STREAM_PATH} needs ?cluster=<name>&network=<name>\n"),
        );
    };
    let delta = query_param(query, "delta") == Some("1");
    if let Err((status, reason)) = check_subscriber(shared, cluster, network) {
        warn!(%cluster, %network, %status, %reason, "subscription refused");
        return text(status, format!("{reason}\n"));
    }
    info!(%cluster, %network, delta, "proxy subscribed");
    let (rx, new) = shared.publisher.subscribe(network);
    if new {
        shared.update(|_| true);
    }
    shared
        .metrics
        .connected_proxies
        .fetch_add(1, Ordering::Relaxed);
    let sub = Subscription {
        rx,
        first: true,
        delta,
        sent: None,
        pending: VecDeque::new(),
        shared: shared.clone(),
    };
    let stream = futures::stream::unfold(sub, |mut sub| async move {
        let data = sub.next_frame().await?;
        Some((Ok::<_, Infallible>(Frame::data(data)), sub))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// Refuses a gateway that claims a cluster control does not watch, or a network its cluster
/// is not in: an empty table would make it ready and refuse every SNI. A cluster's network
/// that is still being discovered is taken on trust, and while the remote secrets have not
/// been listed an unknown cluster may still come: 503, which the proxy retries.
fn check_subscriber(
    shared: &Shared,
    cluster: &str,
    network: &str,
) -> Result<(), (StatusCode, String)> {
    let model = shared.model();
    match model.clusters.get(cluster) {
        Some(c) => match &c.network {
            Some(n) if n != network => Err((
                StatusCode::NOT_FOUND,
                format!("cluster {cluster} is in network {n}, not {network}"),
            )),
            _ => Ok(()),
        },
        None if shared.settings.watch_secrets && !shared.secrets_synced.load(Ordering::Acquire) => {
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unknown cluster {cluster} so far: remote secrets not listed yet"),
            ))
        }
        None => {
            let known: Vec<&str> = model.clusters.keys().map(String::as_str).collect();
            Err((
                StatusCode::NOT_FOUND,
                format!(
                    "unknown cluster {cluster}: this control watches {}",
                    known.join(", ")
                ),
            ))
        }
    }
}

/// One proxy's stream; counts itself out of `connected_proxies` when the stream is dropped.
struct Subscription {
    rx: TableRx,
    first: bool,
    /// Whether the proxy asked for deltas.
    delta: bool,
    /// The version sent last (delta streams).
    sent: Option<u64>,
    /// Frames of the line being sent.
    pending: VecDeque<Bytes>,
    shared: Arc<Shared>,
}

impl Subscription {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if !self.first {
                self.rx.changed().await.ok()?;
            }
            self.first = false;
            let Some(p) = self.rx.borrow_and_update().clone() else {
                continue;
            };
            if !self.delta {
                return Some(p.line());
            }
            match self.sent {
                // Already sent (as part of a delta composed from a newer publication).
                Some(sent) if p.version <= sent => continue,
                Some(sent) => {
                    if let Some(line) = p.delta_from(sent) {
                        self.sent = Some(p.version);
                        return Some(line);
                    }
                    debug!(
                        sent,
                        version = p.version,
                        "changes since the last version sent are gone; sending the full table"
                    );
                }
                None => {}
            }
            self.sent = Some(p.version);
            // `{"full":<table>}`: the shared table line is sent as is, not copied.
            let line = p.line();
            let table = line.slice(..line.len().saturating_sub(1));
            self.pending.push_back(table);
            self.pending.push_back(Bytes::from_static(b"}\n"));
            return Some(Bytes::from_static(b"{\"full\":"));
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared
            .metrics
            .connected_proxies
            .fetch_sub(1, Ordering::Relaxed);
    }
}
