//! The listener: accepts TCP (optionally TLS), serves HTTP/1.1 and HTTP/2 on each
//! connection with hyper-util's auto builder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::stoppable::{accept_until_stopped, StoppableTask};
use tokio_rustls::TlsAcceptor;

use super::engine::Engine;
use super::handler;
use super::tls::ALPN;
use super::{ServeConfig, ServeStats};

/// A TLS handshake that takes longer than this is a dead client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running model server; stops on [`ModelServer::shutdown`] or drop.
pub struct ModelServer {
    addr: SocketAddr,
    engine: Arc<Engine>,
    task: StoppableTask,
}

impl ModelServer {
    /// Binds `addr` (port 0 for any) and starts serving.
    pub async fn start(addr: SocketAddr, mut cfg: ServeConfig) -> anyhow::Result<ModelServer> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding model server to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("model server local address")?;
        let tls = cfg.tls.take().map(|tls| {
            let mut tls = (*tls).clone();
            if tls.alpn_protocols.is_empty() {
                tls.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
            }
            TlsAcceptor::from(Arc::new(tls))
        });
        let engine = Arc::new(Engine::new(cfg));
        let task =
            StoppableTask::spawn(|stopped| accept_loop(listener, engine.clone(), tls, stopped));
        Ok(ModelServer { addr, engine, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> ServeStats {
        self.engine.stats()
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    engine: Arc<Engine>,
    tls: Option<TlsAcceptor>,
    stopped: oneshot::Receiver<()>,
) {
    accept_until_stopped(listener, stopped, "model server", |tcp, peer| {
        serve_connection(tcp, peer, engine.clone(), tls.clone())
    })
    .await
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    engine: Arc<Engine>,
    tls: Option<TlsAcceptor>,
) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, %err, "TCP_NODELAY");
    }
    let service = service_fn(move |req| handler::handle(engine.clone(), req));
    let http = auto::Builder::new(TokioExecutor::new());
    let served = match tls {
        None => http.serve_connection(TokioIo::new(tcp), service).await,
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
        {
            Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), service).await,
            Ok(Err(err)) => {
                tracing::info!(%peer, %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    if let Err(err) = served {
        tracing::debug!(%peer, %err, "connection ended with an error");
    }
}
