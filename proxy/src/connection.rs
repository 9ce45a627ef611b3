//! One downstream connection, top to bottom: read the ClientHello, route, connect, relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eastwest_routes::{ListenerConfig, ListenerMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::balance::ActiveGuard;
use crate::client_hello::{self, HelloError, HelloReader, Parse};
use crate::connect::connect;
use crate::copy::{relay, CopyEnd, RelayConfig};
use crate::istio_sni;
use crate::listener::ListenerStats;
use crate::metrics::Outcome;
use crate::routing::{PassthroughSeries, RouteMiss, Routing, UpstreamSet};
use crate::Shared;

/// What the hello said, kept for the access log.
struct HelloSummary {
    sni: Option<String>,
    alpn: Option<String>,
}

/// Everything an access log line reports.
struct Report<'a> {
    listener: &'a str,
    peer: SocketAddr,
    /// Only with the access log on.
    hello: Option<Box<HelloSummary>>,
    route: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    to_upstream: u64,
    to_downstream: u64,
    outcome: Outcome,
    detail: String,
    /// The route's cached `closed_total{result="routed"}` series, once relayed.
    closed_routed: Option<metrics::Counter>,
    /// Whether to write the access-log line (the setting when the connection was admitted).
    access_log: bool,
}

/// Where the listener `stats` counts for sits in `routing`'s config: found by name, or, when a
/// reload renamed it between accept and now, by address (the socket went to the new name).
pub(crate) fn listener_index(routing: &Routing, stats: &ListenerStats) -> Option<usize> {
    let listeners = &routing.config.listeners;
    listeners
        .iter()
        .position(|l| *l.name == *stats.name)
        .or_else(|| listeners.iter().position(|l| l.address == stats.address))
}

/// Serves one accepted connection with the routing snapshot it was admitted under.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stats: Arc<ListenerStats>,
    routing: Arc<Routing>,
    listener: usize,
    mut downstream: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let mut report = Report {
        listener: &stats.name,
        peer,
        hello: None,
        route: None,
        endpoint: None,
        to_upstream: 0,
        to_downstream: 0,
        outcome: Outcome::Malformed,
        detail: String::new(),
        closed_routed: None,
        access_log: routing.config.access_log,
    };
    // 1–3 in a function of their own: what they need (the hello buffer, the parse, the connect
    // future) is gone before the relay, which is what an idle connection holds for hours.
    let Some(opened) = open(
        &stats,
        &routing,
        listener,
        &mut downstream,
        &mut report,
        started,
    )
    .await
    else {
        return finish(&stats, report, started);
    };
    let Opened {
        upstream,
        guard,
        set,
        hello_len,
        series,
    } = opened;
    let upstream_config = &routing.config.upstream;
    let relay_config = RelayConfig {
        idle: upstream_config.idle_timeout,
        upstream_keepalive: upstream_config.tcp_keepalive,
        splice: upstream_config.splice,
        stall_threshold: upstream_config.stall_threshold,
        token_timing: routing.config.telemetry.token_timing,
    };
    // The snapshot is not needed any more; don't pin old configs for the connection's life.
    drop(routing);

    // 4. Everything after the hello, both ways.
    let route_metrics = set.metrics();
    let result = relay(
        downstream,
        upstream,
        (&series.to_upstream, &series.to_downstream),
        &route_metrics.stream,
        relay_config,
        shared.hard_stop.cancelled(),
    )
    .await;
    drop(guard);
    series.istio.closed.increment(1);
    report.outcome = Outcome::Routed;
    report.closed_routed = Some(route_metrics.closed_routed(&set.route, &stats.name));
    report.to_upstream = hello_len + result.to_upstream;
    report.to_downstream = result.to_downstream;
    // Only the access log reads it. With the log off, formatting the error of every
    // connection a client resets (strerror's locale lookup, an allocation) was 0.5–2 % of the
    // proxy's user-space CPU per new connection (perf, wrk with `Connection: close`).
    if report.access_log {
        report.detail = match result.end {
            CopyEnd::Closed => String::new(),
            CopyEnd::Idle => format!("idle for {:?}", relay_config.idle),
            CopyEnd::Cancelled => "closed at end of drain".into(),
            CopyEnd::Error(e) => e.to_string(),
        };
    }
    stats
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    finish(&stats, report, started)
}

/// A connection whose upstream is connected and has been sent the ClientHello.
struct Opened {
    upstream: TcpStream,
    /// Keeps the connection counted against its upstream endpoint.
    guard: ActiveGuard,
    set: Arc<UpstreamSet>,
    hello_len: u64,
    /// Byte counters (eastwest's and Istio's at once) and Istio's connection counters.
    series: PassthroughSeries,
}

/// Reads the ClientHello, routes it, connects upstream and sends the hello there (steps 1–3).
/// `None` when the connection ends here, with the reason in `report`.
async fn open(
    stats: &ListenerStats,
    routing: &Routing,
    listener: usize,
    downstream: &mut TcpStream,
    report: &mut Report<'_>,
    started: Instant,
) -> Option<Opened> {
    let listener = &routing.config.listeners[listener];
    // 1. The ClientHello, within the listener's timeout.
    let mut buf = Vec::with_capacity(4096);
    if let Err((outcome, detail)) = read_hello(downstream, &mut buf, listener.hello_timeout).await {
        report.outcome = outcome;
        report.detail = detail;
        return None;
    }
    let hello = match client_hello::parse(&buf) {
        Ok(Parse::Done(info)) => info,
        Ok(Parse::NeedMore) => {
            report.detail = "incomplete ClientHello".into();
            return None;
        }
        Err(e) => {
            report.detail = e.to_string();
            return None;
        }
    };
    stats.hello_duration.record(started.elapsed().as_secs_f64());
    let ch = hello.client_hello();
    // Copied out only for the access log: two allocations per connection otherwise wasted.
    if report.access_log {
        report.hello = Some(Box::new(HelloSummary {
            sni: ch.sni.map(str::to_string),
            alpn: ch
                .alpn_protocols()
                .next()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        }));
    }

    // 2. The route.
    let set = match route(routing, listener, ch.sni) {
        Ok(set) => set,
        Err((outcome, detail)) => {
            report.outcome = outcome;
            report.detail = detail;
            return None;
        }
    };
    report.route = Some(set.route.clone());

    // 3. An upstream that accepts, and the hello we consumed.
    let connect_started = Instant::now();
    let connected = match connect(&set, &routing.config.upstream).await {
        Ok(c) => c,
        Err(err) => {
            // Istio's gateway counts these too, with response_flags="UF".
            let istio = set.passthrough_failure(routing);
            istio.opened.increment(1);
            istio.closed.increment(1);
            report.outcome = Outcome::UpstreamFailed;
            report.detail = err.to_string();
            return None;
        }
    };
    let route_metrics = set.metrics();
    let series = set.passthrough_series(connected.index, routing);
    series.istio.opened.increment(1);
    route_metrics
        .connect_duration
        .record(connect_started.elapsed().as_secs_f64());
    report.endpoint = Some(connected.peer);
    let mut upstream = connected.stream;
    if let Err(err) = upstream.write_all(&buf).await {
        series.istio.closed.increment(1);
        report.outcome = Outcome::UpstreamFailed;
        report.detail = format!("writing ClientHello upstream: {err}");
        return None;
    }
    series.to_upstream.increment(buf.len() as u64);
    let series = PassthroughSeries::clone(series);
    Some(Opened {
        upstream,
        guard: connected.guard,
        hello_len: buf.len() as u64,
        set,
        series,
    })
}

/// Reads until `buf` holds a whole ClientHello (or a verdict that it never will).
async fn read_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(), (Outcome, String)> {
    let read = async {
        // Walks each record once however the hello is fragmented, and refuses a handshake
        // message over MAX_HELLO_BYTES; as every record carries at least one byte of it, that
        // also bounds `buf` (record headers included).
        let mut reader = HelloReader::default();
        loop {
            // Grows only for hellos beyond 4 KiB (post-quantum key shares, tiny records).
            if buf.len() == buf.capacity() {
                buf.reserve(4096);
            }
            match stream.read_buf(buf).await {
                Ok(0) => {
                    return Err((
                        Outcome::Malformed,
                        "closed before a whole ClientHello".into(),
                    ))
                }
                Err(err) => {
                    return Err((Outcome::Malformed, format!("reading ClientHello: {err}")))
                }
                Ok(_) => {}
            }
            match reader.parse(buf) {
                Ok(Parse::NeedMore) => continue,
                Err(err @ HelloError::TooLarge) => {
                    return Err((Outcome::TooLarge, err.to_string()))
                }
                // Done, or an error the caller reports with its reason.
                _ => return Ok(()),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(res) => res,
        Err(_) => Err((Outcome::HelloTimeout, String::new())),
    }
}

fn route(
    routing: &Routing,
    listener: &ListenerConfig,
    sni: Option<&str>,
) -> Result<Arc<UpstreamSet>, (Outcome, String)> {
    match listener.mode {
        ListenerMode::AutoPassthrough => {
            let sni = sni.ok_or((Outcome::NoSni, "ClientHello has no SNI".to_string()))?;
            let istio = istio_sni::parse(sni).map_err(|e| (Outcome::BadSni, e.to_string()))?;
            routing.auto_passthrough(&istio).map_err(|miss| {
                let why = match miss {
                    RouteMiss::UnknownService => "unknown service",
                    RouteMiss::UnknownPort => "unknown service port",
                    RouteMiss::UnknownSubset => "unknown subset",
                    RouteMiss::NoEndpoints => "no ready endpoints",
                };
                (Outcome::UnknownRoute, why.to_string())
            })
        }
        // Never reaches here: listener.rs hands hbone connections to hbone::server.
        ListenerMode::Hbone => Err((
            Outcome::UnknownRoute,
            "hbone listeners terminate TLS (hbone::server)".to_string(),
        )),
        ListenerMode::Sni => routing
            .sni_rule(&listener.name, sni)
            .ok_or_else(|| match sni {
                None => (Outcome::NoSni, "ClientHello has no SNI".to_string()),
                Some(_) => (Outcome::UnknownRoute, "no rule matches the SNI".to_string()),
            }),
    }
}

fn finish(stats: &ListenerStats, report: Report<'_>, started: Instant) {
    let route = report.route.as_deref().unwrap_or("");
    match report.closed_routed {
        Some(counter) => counter,
        None => stats.closed(report.outcome, route),
    }
    .increment(1);
    if report.outcome != Outcome::Routed {
        tracing::debug!(listener = report.listener, peer = %report.peer, result = report.outcome.as_str(), detail = %report.detail, "connection closed");
    }
    if report.access_log {
        tracing::info!(
            target: "eastwest::access",
            listener = report.listener,
            peer = %report.peer,
            sni = report.hello.as_ref().and_then(|h| h.sni.as_deref()).unwrap_or("-"),
            alpn = report.hello.as_ref().and_then(|h| h.alpn.as_deref()).unwrap_or("-"),
            route = if route.is_empty() { "-" } else { route },
            endpoint = %report.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            bytes_to_upstream = report.to_upstream,
            bytes_to_downstream = report.to_downstream,
            duration_ms = started.elapsed().as_millis() as u64,
            result = report.outcome.as_str(),
            detail = %report.detail,
        );
    }
}
