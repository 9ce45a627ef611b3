//! The load-generating client: one mode per run, one JSON line of results on stdout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::wire::{self, CHUNK, STREAM};
use crate::{tls, ClientArgs, Mode};

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker that keeps failing stops instead of spinning until the deadline.
const MAX_ERRORS_IN_A_ROW: u32 = 1000;

type Tls = TlsStream<TcpStream>;

#[derive(Debug, Default, Serialize)]
struct Report {
    mode: String,
    target: String,
    connections: usize,
    seconds: f64,
    requests: u64,
    requests_per_sec: f64,
    /// New connections that completed the handshake and one request.
    connects: u64,
    connects_per_sec: f64,
    /// Response bytes received (TLS plaintext).
    bytes: u64,
    mb_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

/// What one worker did.
#[derive(Default)]
struct Tally {
    requests: u64,
    connects: u64,
    bytes: u64,
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    /// Idle mode: the connections to hold.
    held: Vec<Tls>,
}

impl Tally {
    fn error(&mut self, err: io::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| err.to_string());
    }
}

#[derive(Clone)]
struct Dialer {
    target: SocketAddr,
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Dialer {
    /// TCP connect and a full mTLS handshake, like a sidecar opening a connection.
    async fn dial(&self) -> io::Result<Tls> {
        let dial = async {
            let tcp = TcpStream::connect(self.target).await?;
            tcp.set_nodelay(true)?;
            self.connector.connect(self.name.clone(), tcp).await
        };
        tokio::time::timeout(DIAL_TIMEOUT, dial)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out")))
    }
}

async fn request(tls: &mut Tls, req: &[u8], resp: &mut [u8]) -> io::Result<()> {
    let exchange = async {
        tls.write_all(req).await?;
        tls.flush().await?;
        tls.read_exact(resp).await.map(|_| ())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")))
}

pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let dialer = Dialer {
        target: args.target,
        connector: TlsConnector::from(tls::client_config(&args.certs)?),
        name: ServerName::try_from(args.sni.clone()).context("--sni is not a DNS name")?,
    };
    let records = wire::Records {
        size: args.record_size,
        gap_us: args.record_gap_us,
    };
    let req: Arc<[u8]> = wire::request(args.request_size, args.response_size, records).into();
    let n = args.connections.max(1);
    let mut workers = JoinSet::new();
    let started;
    match args.mode {
        Mode::Keepalive => {
            // Connect first so the timed part is only requests.
            let mut opening = JoinSet::new();
            for _ in 0..n {
                let dialer = dialer.clone();
                opening.spawn(async move { dialer.dial().await });
            }
            let mut conns = Vec::with_capacity(n);
            while let Some(res) = opening.join_next().await {
                conns.push(res.context("dial task")?.context("opening connections")?);
            }
            started = Instant::now();
            let deadline = started + args.duration();
            for tls in conns {
                let req = req.clone();
                let resp_len = args.response_size as usize;
                workers.spawn(keepalive(tls, req, resp_len, deadline));
            }
        }
        Mode::Connect => {
            started = Instant::now();
            let deadline = started + args.duration();
            for _ in 0..n {
                let (dialer, req) = (dialer.clone(), req.clone());
                let resp_len = args.response_size as usize;
                workers.spawn(async move { connect(&dialer, &req, resp_len, deadline).await });
            }
        }
        Mode::Bulk => {
            started = Instant::now();
            let deadline = started + args.duration();
            for _ in 0..n {
                let dialer = dialer.clone();
                workers.spawn(async move { bulk(&dialer, deadline).await });
            }
        }
        Mode::Idle => {
            started = Instant::now();
            let per_worker = n.div_ceil(args.open_concurrency.max(1));
            let mut left = n;
            while left > 0 {
                let count = per_worker.min(left);
                left -= count;
                let (dialer, req) = (dialer.clone(), req.clone());
                let resp_len = args.response_size as usize;
                workers.spawn(async move { open(&dialer, &req, resp_len, count).await });
            }
        }
    }
    let mut total = Tally::default();
    while let Some(res) = workers.join_next().await {
        let t = res.context("worker task")?;
        total.requests += t.requests;
        total.connects += t.connects;
        total.bytes += t.bytes;
        total.latencies_ns.extend(t.latencies_ns);
        total.errors += t.errors;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
        total.held.extend(t.held);
    }
    let seconds = started.elapsed().as_secs_f64();
    total.latencies_ns.sort_unstable();
    let pct = |p: usize| {
        let v = &total.latencies_ns;
        if v.is_empty() {
            0.0
        } else {
            v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0
        }
    };
    let report = Report {
        mode: format!("{:?}", args.mode).to_lowercase(),
        target: args.target.to_string(),
        connections: if args.mode == Mode::Idle {
            total.held.len()
        } else {
            n
        },
        seconds,
        requests: total.requests,
        requests_per_sec: total.requests as f64 / seconds,
        connects: total.connects,
        connects_per_sec: total.connects as f64 / seconds,
        bytes: total.bytes,
        mb_per_sec: total.bytes as f64 / seconds / 1e6,
        p50_us: pct(50),
        p99_us: pct(99),
        errors: total.errors,
        first_error: total.first_error,
    };
    println!("{}", serde_json::to_string(&report)?);
    if args.mode == Mode::Idle {
        // The script reads the gateway's memory now, then stops us (or the hold runs out).
        tokio::time::sleep(args.duration()).await;
        drop(total.held);
    }
    Ok(())
}

async fn keepalive(mut tls: Tls, req: Arc<[u8]>, resp_len: usize, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let mut resp = vec![0u8; resp_len];
    while Instant::now() < deadline {
        let sent = Instant::now();
        match request(&mut tls, &req, &mut resp).await {
            Ok(()) => {
                t.latencies_ns.push(sent.elapsed().as_nanos() as u64);
                t.requests += 1;
                t.bytes += resp_len as u64;
            }
            Err(err) => {
                t.error(err);
                break;
            }
        }
    }
    t
}

async fn connect(dialer: &Dialer, req: &[u8], resp_len: usize, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let mut resp = vec![0u8; resp_len];
    let mut failing = 0;
    while Instant::now() < deadline && failing < MAX_ERRORS_IN_A_ROW {
        let sent = Instant::now();
        let res = match dialer.dial().await {
            Ok(mut tls) => request(&mut tls, req, &mut resp).await,
            Err(err) => Err(err),
        };
        match res {
            Ok(()) => {
                t.latencies_ns.push(sent.elapsed().as_nanos() as u64);
                t.connects += 1;
                t.requests += 1;
                t.bytes += resp_len as u64;
                failing = 0;
            }
            Err(err) => {
                t.error(err);
                failing += 1;
            }
        }
    }
    t
}

async fn bulk(dialer: &Dialer, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let run = async {
        let mut tls = dialer.dial().await?;
        tls.write_all(&wire::header(0, STREAM)).await?;
        tls.flush().await?;
        let mut buf = vec![0u8; CHUNK];
        while Instant::now() < deadline {
            let read = tokio::time::timeout_at(deadline, tls.read(&mut buf)).await;
            match read {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the stream",
                    ))
                }
                Ok(Ok(n)) => t.bytes += n as u64,
                Ok(Err(err)) => return Err(err),
                Err(_) => break,
            }
        }
        Ok(())
    };
    if let Err(err) = run.await {
        t.error(err);
    }
    t
}

async fn open(dialer: &Dialer, req: &[u8], resp_len: usize, count: usize) -> Tally {
    let mut t = Tally::default();
    let mut resp = vec![0u8; resp_len];
    for _ in 0..count {
        let res = match dialer.dial().await {
            Ok(mut tls) => request(&mut tls, req, &mut resp).await.map(|()| tls),
            Err(err) => Err(err),
        };
        match res {
            Ok(tls) => {
                t.connects += 1;
                t.held.push(tls);
            }
            Err(err) => t.error(err),
        }
    }
    t
}
