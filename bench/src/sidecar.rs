//! `eastwest-bench sidecar`: a local mTLS origination for clients that speak plain HTTP
//! (sglang's bench_serving, curl): listens in plain TCP and relays each connection over
//! TLS to `--upstream` (typically an east-west gateway), sending `--sni` and the client
//! certificate, as a mesh sidecar would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::run::{TlsClient, TlsFlags};
use crate::stoppable::{accept_until_stopped, StoppableTask};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Plain-text listen address for local clients.
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub listen: SocketAddr,
    /// Where to originate TLS to, HOST:PORT (e.g. the remote east-west gateway).
    #[arg(long)]
    pub upstream: String,
    /// TLS server name to send, e.g. outbound_.8000_._.sglang.demo.svc.cluster.local
    /// (default: the upstream's host).
    #[arg(long)]
    pub sni: Option<String>,
    #[command(flatten)]
    pub tls: TlsFlags,
}

/// A running sidecar; stops on [`Sidecar::shutdown`] or drop.
pub struct Sidecar {
    addr: SocketAddr,
    task: StoppableTask,
}

struct Upstream {
    addr: String,
    connector: tokio_rustls::TlsConnector,
    sni: ServerName<'static>,
}

impl Sidecar {
    /// Listens on `listen` (port 0 for any); each accepted connection is relayed over TLS
    /// (`tls`, sending `sni`) to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: String,
        tls: TlsClient,
        sni: &str,
    ) -> anyhow::Result<Sidecar> {
        let sni = ServerName::try_from(sni.to_string())
            .with_context(|| format!("--sni {sni:?} is not a DNS name or IP"))?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding sidecar to {listen}"))?;
        let addr = listener.local_addr().context("sidecar local address")?;
        let up = Arc::new(Upstream {
            addr: upstream,
            connector: tokio_rustls::TlsConnector::from(tls.config),
            sni,
        });
        let task = StoppableTask::spawn(|stopped| {
            accept_until_stopped(listener, stopped, "sidecar", move |plain, peer| {
                let up = up.clone();
                async move {
                    if let Err(err) = relay(plain, &up).await {
                        tracing::warn!(%peer, upstream = %up.addr, "sidecar connection: {err:#}");
                    }
                }
            })
        });
        Ok(Sidecar { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

async fn relay(mut plain: TcpStream, up: &Upstream) -> anyhow::Result<()> {
    plain.set_nodelay(true).context("TCP_NODELAY")?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(up.addr.as_str()))
        .await
        .with_context(|| format!("connecting to {}: timed out", up.addr))?
        .with_context(|| format!("connecting to {}", up.addr))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let mut tls = tokio::time::timeout(CONNECT_TIMEOUT, up.connector.connect(up.sni.clone(), tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    tokio::io::copy_bidirectional(&mut plain, &mut tls)
        .await
        .context("relaying")?;
    Ok(())
}

pub async fn main(args: Args) -> anyhow::Result<()> {
    let host = args
        .upstream
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .context("--upstream must be HOST:PORT")?;
    let sni = args.sni.clone().unwrap_or_else(|| host.to_string());
    let sidecar =
        Sidecar::start(args.listen, args.upstream.clone(), args.tls.client()?, &sni).await?;
    // Scripts wait for this line to learn the port.
    println!(
        "eastwest-bench sidecar: listening on http://{} -> tls://{} (SNI {sni})",
        sidecar.local_addr(),
        args.upstream
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    sidecar.shutdown().await;
    Ok(())
}
