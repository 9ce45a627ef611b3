//! Subscription to eastwest-control's route stream.
//!
//! `GET /v1/routes?cluster=C&network=N&delta=1` over HTTP/2 (mTLS, or h2c on loopback) returns
//! one JSON [`RouteUpdate`] per line: the full current table, then per version a delta naming
//! the version it applies to. The client keeps control's current table (sharing unchanged
//! services between versions) and hands every new version to `apply` (which validates and swaps
//! it in atomically, leaving existing connections alone); a refused table keeps the old one. A
//! delta that is malformed, invalid or meant for another version is refused and counted, and
//! the client resubscribes to get a full table. A control that predates deltas answers with bare
//! tables, which are applied as full updates. While control is unreachable the proxy keeps
//! routing with the last table it applied, reconnecting with exponential backoff; with a route
//! cache that table also survives a proxy restart.
//!
//! Control marks a table `partial` while some cluster has not synced. A partial table that
//! would withdraw more than half of the hostnames the proxy routes ([`withdraws_most`]) is held
//! back: the old table stays, a warning is logged and `eastwest_route_tables_held_total`
//! counted, until control sends one that does not (or a complete one). Only complete tables
//! are written to the route cache, so a restart never starts from a partial view.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use eastwest_routes::{RouteTable, RouteUpdate, ROUTES_STREAM_PATH};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

mod route_cache;
pub use route_cache::load_route_cache;
use route_cache::spawn_cache_writer;

/// Counter of stream (re)connection failures.
pub const CONTROL_STREAM_ERRORS: &str = "eastwest_control_stream_errors_total";
/// 1 while a route stream is open.
pub const CONTROL_CONNECTED: &str = "eastwest_control_connected";
/// Route updates received from control that could be used, by `kind`: `full` or `delta`.
pub const ROUTE_UPDATES: &str = "eastwest_route_updates_total";
/// Same counter the proxy bumps for tables that fail validation.
const ROUTE_TABLES_REJECTED: &str = "eastwest_route_tables_rejected_total";
/// Partial tables held back because they would withdraw most routes (see [`withdraws_most`]).
pub const ROUTE_TABLES_HELD: &str = "eastwest_route_tables_held_total";

/// A table larger than this is refused (and the stream restarted) rather than buffered.
const MAX_LINE: usize = 512 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that applied a table and lasted this long was healthy: the backoff starts over.
/// A shorter one (control sends a table, then something this proxy can't use, every time) is
/// a failure like any other, so a skewed or broken control is not hammered 10 times a second.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Default bound on connect + handshakes + response headers.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct ControlClientConfig {
    /// `https://host:port`, or `http://127.0.0.1:port` (plain text only on loopback).
    pub url: String,
    pub cluster: String,
    pub network: String,
    /// Client identity and trusted root for `https` (ALPN is set to h2 here).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where the last applied table is kept for restarts while control is down.
    pub route_cache: Option<PathBuf>,
    /// How long connecting, the TLS and HTTP/2 handshakes and control's response headers may
    /// take together; a control that accepts but never answers is then left for another try.
    pub subscribe_timeout: Duration,
}

impl ControlClientConfig {
    /// A plain-text subscription (`http://` on loopback) without a route cache.
    pub fn plain_text(url: String, cluster: &str, network: &str) -> Self {
        ControlClientConfig {
            url,
            cluster: cluster.into(),
            network: network.into(),
            tls: None,
            route_cache: None,
            subscribe_timeout: SUBSCRIBE_TIMEOUT,
        }
    }
}

/// Runs forever: connects, applies every table received, caches applied tables, reconnects
/// with exponential backoff (100 ms .. 30 s, jittered) after any error.
pub async fn run(
    cfg: ControlClientConfig,
    apply: impl Fn(RouteTable) -> Result<(), String> + Send + Sync + 'static,
) {
    ::metrics::describe_counter!(
        ROUTE_TABLES_HELD,
        "Partial route tables from the control plane not applied because they would withdraw \
         more than half of the routed services (the old table is kept)."
    );
    ::metrics::counter!(ROUTE_TABLES_HELD).increment(0);
    // What the proxy routes by when it starts: the cache, which the caller applied first.
    let mut routed = match cfg.route_cache.as_deref().map(load_route_cache) {
        Some(Ok(table)) => table,
        _ => None,
    };
    let cache = cfg.route_cache.clone().map(spawn_cache_writer);
    let mut backoff = Backoff::default();
    loop {
        let mut applied_any = false;
        let started = tokio::time::Instant::now();
        let mut state = Session {
            apply: &apply,
            cache: cache.as_ref(),
            routed: &mut routed,
            applied_any: &mut applied_any,
        };
        let result = session(&cfg, &mut state).await;
        ::metrics::gauge!(CONTROL_CONNECTED).set(0.0);
        match result {
            Ok(()) => info!(url = %cfg.url, "control closed the route stream; reconnecting"),
            Err(e) => {
                ::metrics::counter!(CONTROL_STREAM_ERRORS).increment(1);
                warn!(url = %cfg.url, error = format!("{e:#}"),
                      "route stream failed; keeping the last table and retrying");
            }
        }
        let healthy = applied_any && started.elapsed() >= HEALTHY_SESSION;
        tokio::time::sleep(jitter(backoff.after_session(healthy))).await;
    }
}

/// Exponential backoff between sessions, 100 ms .. 30 s.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The wait before the next session (before jitter).
    fn after_session(&mut self, healthy: bool) -> Duration {
        if healthy {
            self.next = BACKOFF_MIN;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }
}

/// A value in `[d/2, d]` so that many proxies do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.5 + f64::from(nanos % 1024) / 2048.0)
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
}

fn parse_url(url: &str, have_tls: bool) -> anyhow::Result<Target> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("control URL {url:?}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("control URL {url:?}: scheme must be https or http"),
    };
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("control URL {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if tls && !have_tls {
        bail!("control URL {url:?} is https but no TLS identity was configured");
    }
    if !tls {
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!("control URL {url:?}: plain http is only allowed to a loopback address");
        }
    }
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| format!("{host}:{port}"));
    Ok(Target {
        tls,
        host,
        port,
        authority,
    })
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn handshake<IO>(io: IO) -> anyhow::Result<Sender>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Notice a control plane that vanished without closing the connection.
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // Tables of 100 000 endpoints are megabytes: large windows avoid stalls.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake(TokioIo::new(io))
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "control connection ended");
        }
    });
    Ok(sender)
}

/// What a session works with and leaves for the next.
struct Session<'a, F> {
    apply: &'a F,
    cache: Option<&'a watch::Sender<Option<RouteTable>>>,
    /// The table the proxy routes by (the last applied, or the cache it started from).
    routed: &'a mut Option<RouteTable>,
    applied_any: &'a mut bool,
}

async fn session<F: Fn(RouteTable) -> Result<(), String> + Send + Sync>(
    cfg: &ControlClientConfig,
    state: &mut Session<'_, F>,
) -> anyhow::Result<()> {
    let target = parse_url(&cfg.url, cfg.tls.is_some())?;
    let resp = tokio::time::timeout(cfg.subscribe_timeout, subscribe(cfg, &target))
        .await
        .map_err(|_| {
            anyhow!(
                "{} did not answer the subscription within {:?}",
                target.authority,
                cfg.subscribe_timeout
            )
        })??;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != http::StatusCode::OK {
        let text = match tokio::time::timeout(cfg.subscribe_timeout, body.collect()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
            _ => String::new(),
        };
        bail!("control answered {status}: {text}");
    }
    info!(url = %cfg.url, cluster = %cfg.cluster, network = %cfg.network, "subscribed to control");
    ::metrics::gauge!(CONTROL_CONNECTED).set(1.0);

    // Control's current table (applied or not): what the next delta applies to.
    let mut current: Option<RouteTable> = None;
    let mut buf = BytesMut::new();
    // Bytes of `buf` already searched for a newline.
    let mut scanned = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading route stream")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let line = buf.split_to(scanned + pos + 1).freeze();
            scanned = 0;
            if handle_line(&line, &mut current, state)? {
                *state.applied_any = true;
            }
        }
        scanned = buf.len();
        if buf.len() > MAX_LINE {
            bail!("route table line exceeds {MAX_LINE} bytes");
        }
    }
    Ok(())
}

/// Connects, handshakes and sends the subscription; returns control's response (headers).
async fn subscribe(
    cfg: &ControlClientConfig,
    target: &Target,
) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("connecting to {}", target.authority))?;
    let _ = tcp.set_nodelay(true);
    let mut sender = match (&cfg.tls, target.tls) {
        (Some(tls), true) => {
            let mut tls = (**tls).clone();
            tls.alpn_protocols = vec![b"h2".to_vec()];
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .with_context(|| format!("{:?} is not a valid TLS server name", target.host))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {}", target.authority))?;
            handshake(stream).await?
        }
        _ => handshake(tcp).await?,
    };
    let scheme = if target.tls { "https" } else { "http" };
    let uri = format!(
        "{scheme}://{}{ROUTES_STREAM_PATH}?cluster={}&network={}&delta=1",
        target.authority, cfg.cluster, cfg.network
    );
    let req = http::Request::get(uri)
        .body(Empty::new())
        .context("building request")?;
    sender
        .send_request(req)
        .await
        .context("sending subscription")
}

/// Parses one update, brings `current` to its version and offers the table to `apply`;
/// returns whether it was applied. An error (an update that cannot be used) ends the session so
/// that the next one starts from a full table.
fn handle_line<F: Fn(RouteTable) -> Result<(), String>>(
    line: &[u8],
    current: &mut Option<RouteTable>,
    state: &mut Session<'_, F>,
) -> anyhow::Result<bool> {
    let json = line.strip_suffix(b"\n").unwrap_or(line);
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    let table = match parse_update(json) {
        Ok(RouteUpdate::Full(mut table)) => {
            // Control sends tables in hostname order; deltas merge in that order.
            if !table.is_sorted() {
                table.sort();
            }
            ::metrics::counter!(ROUTE_UPDATES, "kind" => "full").increment(1);
            table
        }
        Ok(RouteUpdate::Delta(delta)) => {
            let mut invalid = Vec::new();
            delta.validate("delta.", &mut invalid);
            let result = match (invalid.is_empty(), current.as_ref()) {
                (false, _) => Err(invalid
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")),
                (true, None) => Err("no full table to apply it to".to_string()),
                (true, Some(base)) => delta.apply_to(base).map_err(|e| e.to_string()),
            };
            match result {
                Ok(table) => {
                    ::metrics::counter!(ROUTE_UPDATES, "kind" => "delta").increment(1);
                    table
                }
                Err(why) => {
                    ::metrics::counter!(ROUTE_TABLES_REJECTED).increment(1);
                    bail!(
                        "route delta {} (base {}) refused, keeping the old table and resyncing: {why}",
                        delta.version,
                        delta.base
                    );
                }
            }
        }
        Err(e) => {
            ::metrics::counter!(ROUTE_TABLES_REJECTED).increment(1);
            return Err(e).context(
                "control sent an unparsable route update; keeping the old table and resyncing",
            );
        }
    };
    let version = table.version;
    // Deltas apply to control's table even when `apply` refuses it, as control sends them.
    *current = Some(table.clone());
    if let Some(routed) = state.routed.as_ref() {
        if let Some((dropped, of)) = withdraws_most(routed, &table) {
            ::metrics::counter!(ROUTE_TABLES_HELD).increment(1);
            warn!(
                version,
                dropped,
                of,
                routed_version = routed.version,
                "control's table is partial (some cluster has not synced) and would withdraw \
                   most routed services; keeping the old table until control is complete"
            );
            return Ok(false);
        }
    }
    let partial = table.partial;
    match (state.apply)(table.clone()) {
        Ok(()) => {
            info!(version, partial, "applied route table from control");
            // The cache is what a restart routes by with no control: only a complete table.
            if let Some(cache) = state.cache.filter(|_| !partial) {
                cache.send_replace(Some(table.clone()));
            }
            *state.routed = Some(table);
            Ok(true)
        }
        Err(why) => {
            warn!(version, reason = %why, "route table from control refused; keeping the old one");
            Ok(false)
        }
    }
}

/// Whether `next` is a partial table that would withdraw more than half of the services (and
/// remote services, by hostname) that `routed` has: `Some((withdrawn, routed hostnames))`.
/// Control marks a table partial while some cluster has not synced, when a missing Service
/// may just not be known yet; a complete table is always trusted, however much it removes.
pub fn withdraws_most(routed: &RouteTable, next: &RouteTable) -> Option<(usize, usize)> {
    if !next.partial {
        return None;
    }
    let hostnames = |t: &RouteTable| -> HashSet<String> {
        t.services
            .iter()
            .map(|s| s.hostname.to_ascii_lowercase())
            .chain(
                t.remote_services
                    .iter()
                    .map(|r| r.hostname.to_ascii_lowercase()),
            )
            .collect()
    };
    let before = hostnames(routed);
    let after = hostnames(next);
    let withdrawn = before.difference(&after).count();
    (withdrawn * 2 > before.len()).then_some((withdrawn, before.len()))
}

/// A [`RouteUpdate`], or a bare table from a control that predates deltas (it ignores
/// `&delta=1`), taken as a full update. Telling them apart is cheap: a bare table fails as an
/// update at its first key.
fn parse_update(json: &[u8]) -> serde_json::Result<RouteUpdate> {
    serde_json::from_slice::<RouteUpdate>(json).or_else(|e| {
        if json.starts_with(b"{\"full\"") || json.starts_with(b"{\"delta\"") {
            return Err(e);
        }
        serde_json::from_slice::<RouteTable>(json).map(RouteUpdate::Full)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use eastwest_routes::Service;

    fn table(hosts: &[&str], partial: bool) -> RouteTable {
        RouteTable {
            services: hosts
                .iter()
                .map(|h| {
                    Arc::new(Service {
                        hostname: h.to_string(),
                        subsets: vec![],
                        ports: vec![],
                    })
                })
                .collect(),
            partial,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_partial_table_withdrawing_more_than_half_is_held() {
        let routed = table(&["a", "b", "c", "d"], false);
        // Half is not most; three of four is.
        assert_eq!(withdraws_most(&routed, &table(&["a", "b"], true)), None);
        assert_eq!(
            withdraws_most(&routed, &table(&["a", "x"], true)),
            Some((3, 4))
        );
        assert_eq!(withdraws_most(&routed, &table(&[], true)), Some((4, 4)));
        // A complete table is trusted, however much it withdraws.
        assert_eq!(withdraws_most(&routed, &table(&[], false)), None);
        // Nothing routed yet: a partial table is better than none.
        assert_eq!(withdraws_most(&table(&[], false), &table(&[], true)), None);
        // Hostnames compare as the SNI lookup does, without case.
        assert_eq!(
            withdraws_most(&routed, &table(&["A", "B", "C"], true)),
            None
        );
    }

    #[test]
    fn only_a_healthy_session_starts_the_backoff_over() {
        let mut backoff = Backoff::default();
        let waits: Vec<_> = (0..4).map(|_| backoff.after_session(false)).collect();
        assert_eq!(waits, [100, 200, 400, 800].map(Duration::from_millis));
        // Sessions that applied a table and then failed at once (healthy = false) keep growing
        // to the cap instead of retrying every 100 ms.
        for _ in 0..20 {
            backoff.after_session(false);
        }
        assert_eq!(backoff.after_session(false), BACKOFF_MAX);
        assert_eq!(backoff.after_session(true), BACKOFF_MIN);
        assert_eq!(backoff.after_session(false), BACKOFF_MIN * 2);
    }
}
