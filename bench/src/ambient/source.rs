//! The source ztunnel stand-in: the fra node's ztunnel outbound for a captured app
//! connection to a service in another network (ztunnel's `proxy_to_double_hbone`). The app
//! connects in plain TCP (ztunnel's capture); per app connection:
//!
//! 1. an outer HBONE connection to the remote east-west gateway (pooled, or new each time);
//! 2. outer CONNECT `<service hostname>:<port>`, wait for its 200;
//! 3. inside that stream, mTLS + HTTP/2 with the destination ztunnel, CONNECT
//!    `<pod ip>:<port>`, wait for its 200;
//! 4. relay the app's bytes both ways.
//!
//! Both TLS layers present the app's workload certificate, as ztunnel does on its behalf,
//! and send no SNI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eastwest_proxy::hbone::client::HboneClient;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::stoppable::{accept_until_stopped, StoppableTask};

/// Tunnel setup (TCP, both TLS handshakes, both CONNECTs) longer than this is dead.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the outer connection to the gateway is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OuterConnection {
    /// One outer connection, opened before the first app connection and shared by all
    /// (ztunnel's connection pool, warm).
    Pooled,
    /// A new outer TCP + TLS + HTTP/2 connection per app connection (a cold pool).
    PerConnection,
}

#[derive(Clone)]
pub struct SourceZtunnelConfig {
    /// Where the remote network's east-west gateway's HBONE port is dialled.
    pub gateway: SocketAddr,
    /// Outer mTLS: the app's workload certificate, verifying the gateway's SPIFFE ID.
    pub outer_tls: Arc<rustls::ClientConfig>,
    /// Inner mTLS: the same certificate, verifying the destination workload's SPIFFE ID.
    pub inner_tls: Arc<rustls::ClientConfig>,
    /// Outer CONNECT authority: `<service hostname>:<service port>`.
    pub service: String,
    /// Inner CONNECT authority: the destination pod's `<ip>:<port>`.
    pub workload: SocketAddr,
    pub outer: OuterConnection,
}

/// A running source ztunnel; stops on [`SourceZtunnel::shutdown`] or drop.
pub struct SourceZtunnel {
    addr: SocketAddr,
    task: StoppableTask,
}

struct Shared {
    cfg: SourceZtunnelConfig,
    /// The pooled outer connection (`OuterConnection::Pooled`). Locked only while a tunnel
    /// is set up, never while bytes flow.
    pool: tokio::sync::Mutex<Option<HboneClient>>,
}

impl SourceZtunnel {
    /// Listens in plain TCP on `listen` (port 0 for any) for app connections. With
    /// [`OuterConnection::Pooled`] the outer connection is opened before this returns.
    pub async fn start(
        listen: SocketAddr,
        cfg: SourceZtunnelConfig,
    ) -> anyhow::Result<SourceZtunnel> {
        let pool = match cfg.outer {
            OuterConnection::Pooled => Some(dial_gateway(&cfg).await?),
            OuterConnection::PerConnection => None,
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding source ztunnel to {listen}"))?;
        let addr = listener
            .local_addr()
            .context("source ztunnel local address")?;
        let shared = Arc::new(Shared {
            cfg,
            pool: tokio::sync::Mutex::new(pool),
        });
        let task = StoppableTask::spawn(|stopped| {
            accept_until_stopped(listener, stopped, "source ztunnel", move |app, peer| {
                let shared = shared.clone();
                async move {
                    if let Err(err) = proxy_to_double_hbone(app, &shared).await {
                        tracing::warn!(%peer, "source ztunnel connection: {err:#}");
                    }
                }
            })
        });
        Ok(SourceZtunnel { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

/// ztunnel sends no SNI; rustls sends none for an IP address name.
fn no_sni(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// A new outer HBONE connection: TCP (through the WAN), mTLS, HTTP/2.
async fn dial_gateway(cfg: &SourceZtunnelConfig) -> anyhow::Result<HboneClient> {
    let dial = async {
        let tcp = TcpStream::connect(cfg.gateway)
            .await
            .with_context(|| format!("connecting to the gateway {}", cfg.gateway))?;
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        HboneClient::connect(tcp, cfg.outer_tls.clone(), no_sni(cfg.gateway))
            .await
            .with_context(|| format!("outer HBONE connection to {}", cfg.gateway))
    };
    tokio::time::timeout(SETUP_TIMEOUT, dial)
        .await
        .with_context(|| format!("outer HBONE connection to {}: timed out", cfg.gateway))?
}

/// The pooled outer connection, dialled again if there is none.
async fn pooled(shared: &Shared) -> anyhow::Result<HboneClient> {
    let mut pool = shared.pool.lock().await;
    if let Some(client) = pool.as_ref() {
        return Ok(client.clone());
    }
    let client = dial_gateway(&shared.cfg).await?;
    *pool = Some(client.clone());
    Ok(client)
}

async fn proxy_to_double_hbone(mut app: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    app.set_nodelay(true).context("TCP_NODELAY")?;
    let cfg = &shared.cfg;
    let setup = async {
        let outer = match cfg.outer {
            OuterConnection::Pooled => pooled(shared).await?,
            OuterConnection::PerConnection => dial_gateway(cfg).await?,
        };
        let via_gateway = match outer.open(&cfg.service).await {
            Ok(stream) => stream,
            // A refusal (non-200) is the gateway's answer; anything else means the pooled
            // connection is gone: forget it so the next app connection dials a new one.
            Err(err) if err.status().is_none() && cfg.outer == OuterConnection::Pooled => {
                shared.pool.lock().await.take();
                return Err(err).context("outer CONNECT on the pooled connection");
            }
            Err(err) => return Err(err).context("outer CONNECT"),
        };
        let inner = HboneClient::connect(via_gateway, cfg.inner_tls.clone(), no_sni(cfg.workload))
            .await
            .context("inner HBONE connection to the destination ztunnel")?;
        inner
            .open(&cfg.workload.to_string())
            .await
            .context("inner CONNECT")
    };
    let mut tunnel = tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .context("double-HBONE setup timed out")??;
    tokio::io::copy_bidirectional(&mut app, &mut tunnel)
        .await
        .context("relaying")?;
    Ok(())
}
