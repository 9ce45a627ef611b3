//! The `hbone` listener (Istio's 15008): mTLS (TLS 1.3, ALPN h2, client certificate of the
//! mesh required), HTTP/2 with ztunnel's settings, and per CONNECT stream: route the
//! authority's service port to an ambient endpoint, dial its HBONE port, answer 200 once
//! connected, then relay the stream's bytes (the inner HBONE) unopened both ways.
//!
//! Routing, balancing, outlier detection, connect retries, metrics and the access log are the
//! 15443 path's ([`crate::routing`], [`crate::connect`]); only the framing differs.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::{Method, Response, StatusCode};
use metrics::Counter;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::authority;
use super::client::{poll_write_error, read_error};
use crate::connect::{connect, keepalive};
use crate::istio_metrics::{self, ConnectionInfo, IstioTcp};
use crate::listener::ListenerStats;
use crate::metrics::{self as m, Outcome};
use crate::routing::{RouteMiss, Routing};
use crate::Shared;

/// ztunnel's server settings (`src/proxy/h2/server.rs`, `config.rs`): windows big enough for
/// a 90 ms RTT link (4 MiB per stream is ~45 MB/s per stream there).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// CONNECT headers are small; Go's 16 MiB default is an invitation.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// What h2 may queue per stream ahead of the peer's window; hyper's default, as ztunnel.
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// PING keepalive, as ztunnel: a peer that stops answering is closed.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Read buffer for upstream bytes; each read is sent at once, and the buffer's memory is
/// reused once h2 has written what was sent from it.
const READ_CHUNK: usize = 32 * 1024;

/// What every stream of one outer connection shares.
struct Downstream {
    shared: Arc<Shared>,
    stats: Arc<ListenerStats>,
    peer: SocketAddr,
    /// The client's SPIFFE ID (a source ztunnel), for the access log.
    peer_id: Arc<str>,
    access_log: bool,
}

/// Serves one accepted connection on an `hbone` listener until the peer closes it, the
/// drain's GOAWAY has let its streams finish, or the drain period ends.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stats: Arc<ListenerStats>,
    routing: Arc<Routing>,
    listener: usize,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let handshake_timeout = routing.config.listeners[listener].hello_timeout;
    let access_log = routing.config.access_log;
    // Streams route with the routing in force when they arrive, not this snapshot.
    drop(routing);
    let Some(tls) = shared
        .identity
        .get()
        .map(|id| id.server_config.borrow().clone())
    else {
        // apply_config starts the identity before any hbone listener binds.
        return refused(&stats, peer, access_log, Outcome::TlsFailed, "no identity");
    };
    let handshake = async {
        let tls = TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let peer_id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| eastwest_certs::spiffe_id_of(leaf).ok().flatten())
            .map_or_else(|| Arc::from("-"), |id| Arc::from(id.to_string()));
        let conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        Ok::<_, String>((conn, peer_id))
    };
    let (mut conn, peer_id) = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(done)) => done,
        Ok(Err(detail)) => return refused(&stats, peer, access_log, Outcome::TlsFailed, &detail),
        Err(_) => {
            let detail = format!("no TLS + HTTP/2 handshake within {handshake_timeout:?}");
            return refused(&stats, peer, access_log, Outcome::HelloTimeout, &detail);
        }
    };
    let downstream = Arc::new(Downstream {
        shared: shared.clone(),
        stats: stats.clone(),
        peer,
        peer_id,
        access_log,
    });
    // Counted once per outer connection, however it ends from here on (opened - closed is
    // the connections open, as on every listener); streams have their own series.
    let served = stats.closed(Outcome::Served, "");
    let Some(ping) = conn.ping_pong() else {
        tracing::debug!(%peer, "h2 gave no ping handle");
        served.increment(1);
        return;
    };
    let keepalive = ping_keepalive(ping);
    tokio::pin!(keepalive);
    let mut going_away = false;
    let end = loop {
        tokio::select! {
            biased;
            _ = shared.hard_stop.cancelled() => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                break "closed at end of drain".to_string();
            }
            // The drain: no new streams (GOAWAY); those open run on until they end or the
            // drain period is over.
            _ = shared.stop_accepting.cancelled(), if !going_away => {
                going_away = true;
                conn.graceful_shutdown();
            }
            why = &mut keepalive => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                break why;
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    let downstream = downstream.clone();
                    // Tracked, so the drain waits for streams as it does for connections.
                    shared.connections.spawn(stream(downstream, req, respond));
                }
                Some(Err(e)) => break format!("HTTP/2: {e}"),
                None => break String::new(),
            },
        }
    };
    // Flush the GOAWAY of an abrupt shutdown, briefly: its streams are gone anyway.
    let flush = std::future::poll_fn(|cx| conn.poll_closed(cx));
    let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
    stats
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    served.increment(1);
    tracing::debug!(%peer, peer_id = %downstream.peer_id, detail = %end, "HBONE connection closed");
}

/// A connection that ended before HTTP/2: counted with no route, logged.
fn refused(stats: &ListenerStats, peer: SocketAddr, access_log: bool, outcome: Outcome, why: &str) {
    stats.closed(outcome, "").increment(1);
    tracing::debug!(listener = %stats.name, %peer, result = outcome.as_str(), detail = why, "HBONE connection refused");
    if access_log {
        tracing::info!(
            target: "eastwest::access",
            listener = %stats.name,
            peer = %peer,
            peer_id = "-",
            authority = "-",
            route = "-",
            endpoint = "-",
            status = 0u16,
            bytes_to_upstream = 0u64,
            bytes_to_downstream = 0u64,
            duration_ms = 0u64,
            result = outcome.as_str(),
            detail = why,
        );
    }
}

/// Resolves with the reason once a PING goes unanswered or fails.
async fn ping_keepalive(mut ping: PingPong) -> String {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keepalive PING: {e}"),
            Err(_) => return format!("keepalive PING unanswered for {PING_TIMEOUT:?}"),
        }
    }
}

/// One stream's access-log line and `eastwest_hbone_streams_closed_total` series.
struct StreamReport {
    authority: String,
    route: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    status: u16,
    to_upstream: u64,
    to_downstream: u64,
    outcome: Outcome,
    detail: String,
}

/// Serves one CONNECT stream: route, connect, 200, relay.
async fn stream(
    down: Arc<Downstream>,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    down.stats.hbone_streams_opened().increment(1);
    let (parts, recv) = req.into_parts();
    let mut report = StreamReport {
        authority: parts
            .uri
            .authority()
            .map_or_else(|| "-".to_string(), |a| a.to_string()),
        route: None,
        endpoint: None,
        status: 0,
        to_upstream: 0,
        to_downstream: 0,
        outcome: Outcome::BadRequest,
        detail: String::new(),
    };
    let opened = open(&down, &parts, &mut report).await;
    let (status, opened) = match opened {
        Ok(opened) => (StatusCode::OK, Some(opened)),
        Err(status) => (status, None),
    };
    report.status = status.as_u16();
    let response = Response::builder().status(status).body(());
    let sent = match response {
        Ok(response) => respond.send_response(response, opened.is_none()),
        Err(e) => {
            report.detail = format!("building response: {e}");
            return finish(&down, report, started);
        }
    };
    let send = match (sent, opened) {
        (Ok(send), Some(opened)) => (send, opened),
        (Ok(_), None) => return finish(&down, report, started),
        (Err(e), _) => {
            // The client reset the stream while we connected.
            report.detail = format!("sending {status}: {e}");
            return finish(&down, report, started);
        }
    };
    let (
        send,
        Opened {
            upstream,
            set,
            guard,
            istio,
        },
    ) = send;
    let metrics = set.metrics();
    report.outcome = Outcome::Routed;
    // Each chunk counts once into both families.
    let counters = (
        istio_metrics::both(&metrics.bytes_to_upstream, &istio.received),
        istio_metrics::both(&metrics.bytes_to_downstream, &istio.sent),
    );
    let relayed = tokio::select! {
        r = relay(recv, send, upstream, (&counters.0, &counters.1), &mut report) => r,
        _ = down.shared.hard_stop.cancelled() => Err(io::Error::other("closed at end of drain")),
    };
    drop(guard);
    istio.closed.increment(1);
    if let Err(e) = relayed {
        report.detail = e.to_string();
    }
    report.outcome = Outcome::Routed;
    finish(&down, report, started);
}

/// A stream whose upstream is connected.
struct Opened {
    upstream: TcpStream,
    set: Arc<crate::routing::UpstreamSet>,
    guard: crate::balance::ActiveGuard,
    istio: IstioTcp,
}

/// Checks, routes and connects a CONNECT; the status to answer when that fails.
async fn open(
    down: &Downstream,
    parts: &http::request::Parts,
    report: &mut StreamReport,
) -> Result<Opened, StatusCode> {
    if parts.method != Method::CONNECT {
        report.detail = format!("{} is not CONNECT", parts.method);
        return Err(StatusCode::BAD_REQUEST);
    }
    let Some(raw) = parts.uri.authority() else {
        report.detail = "CONNECT without :authority".into();
        return Err(StatusCode::BAD_REQUEST);
    };
    let target = authority::parse(raw.as_str()).map_err(|e| {
        report.detail = e.to_string();
        StatusCode::BAD_REQUEST
    })?;
    let routing = down.shared.routing.load_full();
    let set = routing
        .hbone(target.hostname, target.port)
        .map_err(|miss| {
            report.outcome = Outcome::UnknownRoute;
            report.detail = match miss {
                RouteMiss::UnknownService => "unknown service",
                RouteMiss::UnknownPort => "unknown service port",
                RouteMiss::UnknownSubset => "unknown subset",
                RouteMiss::NoEndpoints => "no ambient (HBONE) endpoints",
            }
            .to_string();
            StatusCode::SERVICE_UNAVAILABLE
        })?;
    report.route = Some(set.route.clone());
    let cfg = &routing.config.upstream;
    let connect_started = Instant::now();
    // Istio's series for the stream, as its gateway reports an HBONE tunnel: one "TCP
    // connection" per CONNECT, with the source ztunnel's verified SPIFFE ID.
    let istio = |workload: Option<&eastwest_routes::Workload>, response_flags| {
        IstioTcp::new(
            &routing.telemetry,
            &set.service,
            workload,
            routing.trust_domain(),
            ConnectionInfo {
                peer_principal: Some(&down.peer_id),
                response_flags,
                ..ConnectionInfo::PASSTHROUGH
            },
        )
    };
    let connected = connect(&set, cfg).await.map_err(|e| {
        let failed = istio(None, istio_metrics::FLAGS_UPSTREAM_FAILURE);
        failed.opened.increment(1);
        failed.closed.increment(1);
        report.outcome = Outcome::UpstreamFailed;
        report.detail = e.to_string();
        StatusCode::SERVICE_UNAVAILABLE
    })?;
    let workload = set
        .upstreams
        .get(connected.index)
        .and_then(|u| u.workload.as_deref());
    let istio = istio(workload, istio_metrics::FLAGS_NONE);
    istio.opened.increment(1);
    set.metrics()
        .connect_duration
        .record(connect_started.elapsed().as_secs_f64());
    report.endpoint = Some(connected.peer);
    // Dead destination ztunnels are noticed on idle streams too.
    if let Err(err) =
        SockRef::from(&connected.stream).set_tcp_keepalive(&keepalive(cfg.tcp_keepalive))
    {
        tracing::debug!(%err, "cannot set upstream keepalive");
    }
    Ok(Opened {
        upstream: connected.stream,
        set,
        guard: connected.guard,
        istio,
    })
}

/// Both directions at once, each passing on its end (END_STREAM ↔ FIN) while the other keeps
/// flowing; the first error ends both. Each chunk is forwarded the moment it arrives.
async fn relay(
    mut recv: RecvStream,
    mut send: SendStream<Bytes>,
    mut upstream: TcpStream,
    (bytes_to_upstream, bytes_to_downstream): (&Counter, &Counter),
    report: &mut StreamReport,
) -> io::Result<()> {
    let (mut up_read, mut up_write) = upstream.split();
    let (mut to_upstream, mut to_downstream) = (0u64, 0u64);
    let downstream_to_upstream = async {
        while let Some(data) = recv.data().await {
            let data = match data {
                Ok(data) => data,
                // A NO_ERROR/CANCEL reset is a close, as in ztunnel.
                Err(e) => match read_error(e) {
                    Some(err) => return Err(err),
                    None => break,
                },
            };
            up_write.write_all(&data).await?;
            to_upstream += data.len() as u64;
            bytes_to_upstream.increment(data.len() as u64);
            // Credit back only what reached the upstream: a slow upstream slows this stream
            // alone, never the connection's other streams.
            let _ = recv.flow_control().release_capacity(data.len());
        }
        up_write.shutdown().await
    };
    let upstream_to_downstream = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if buf.capacity() == buf.len() {
                // Takes the old allocation back once h2 has written what was sent from it.
                buf.reserve(READ_CHUNK);
            }
            let n = up_read.read_buf(&mut buf).await?;
            if n == 0 {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => Ok(()),
                    Err(_) => Err(std::future::poll_fn(|cx| poll_write_error(&mut send, cx)).await),
                };
            }
            to_downstream += n as u64;
            bytes_to_downstream.increment(n as u64);
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let capacity = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                let sent = match capacity {
                    Some(Ok(0)) => continue,
                    Some(Ok(n)) => send.send_data(chunk.split_to(n.min(chunk.len())), false),
                    Some(Err(e)) => Err(e),
                    None => Err(h2::Error::from(Reason::STREAM_CLOSED)),
                };
                if sent.is_err() {
                    return Err(std::future::poll_fn(|cx| poll_write_error(&mut send, cx)).await);
                }
            }
        }
    };
    let result = tokio::try_join!(downstream_to_upstream, upstream_to_downstream).map(|_| ());
    report.to_upstream = to_upstream;
    report.to_downstream = to_downstream;
    result
}

/// Counts the stream's end (a registry lookup per stream, never per chunk) and logs it.
fn finish(down: &Downstream, report: StreamReport, started: Instant) {
    let route = report.route.as_deref().unwrap_or("");
    m::hbone_stream_closed(&down.stats.name, route, report.outcome).increment(1);
    if report.outcome != Outcome::Routed {
        tracing::debug!(listener = %down.stats.name, peer = %down.peer, authority = %report.authority, status = report.status, result = report.outcome.as_str(), detail = %report.detail, "HBONE stream refused");
    }
    if down.access_log {
        tracing::info!(
            target: "eastwest::access",
            listener = %down.stats.name,
            peer = %down.peer,
            peer_id = %down.peer_id,
            authority = %report.authority,
            route = report.route.as_deref().unwrap_or("-"),
            endpoint = %report.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            status = report.status,
            bytes_to_upstream = report.to_upstream,
            bytes_to_downstream = report.to_downstream,
            duration_ms = started.elapsed().as_millis() as u64,
            result = report.outcome.as_str(),
            detail = %report.detail,
        );
    }
}
