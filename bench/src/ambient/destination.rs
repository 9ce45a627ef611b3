//! The destination ztunnel stand-in: ztunnel's inbound HBONE listener (`15008`) in front of
//! its node's workloads. mTLS (TLS 1.3, ALPN h2, the workload's certificate, client
//! certificate required), HTTP/2, and per CONNECT `<pod ip>:<port>`: TCP to that workload,
//! `200`, then bytes both ways unchanged, frame by frame.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::stoppable::{accept_until_stopped, StoppableTask};

/// A TLS handshake or workload connect that takes longer than this is dead.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// ztunnel's HTTP/2 windows and frame size (`src/proxy/h2/server.rs`): a long link needs
/// windows far above HTTP/2's 64 KiB default.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;
/// Read size towards the tunnel: one read becomes one DATA frame, sent at once.
const READ_CHUNK: usize = 16 * 1024;

/// A running destination ztunnel; stops on [`DestinationZtunnel::shutdown`] or drop.
pub struct DestinationZtunnel {
    addr: SocketAddr,
    task: StoppableTask,
}

impl DestinationZtunnel {
    /// Listens on `listen` (port 0 for any). `tls` is the workload's mTLS server config
    /// (`Identity::server_config_tls13`); ALPN is set to `h2` here. CONNECTs are served only
    /// for `workloads`, the addresses of the pods on this "node": no open relay.
    pub async fn start(
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        workloads: Vec<SocketAddr>,
    ) -> anyhow::Result<DestinationZtunnel> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding destination ztunnel to {listen}"))?;
        let addr = listener
            .local_addr()
            .context("destination ztunnel local address")?;
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let workloads: Arc<[SocketAddr]> = workloads.into();
        let task = StoppableTask::spawn(|stopped| {
            accept_until_stopped(
                listener,
                stopped,
                "destination ztunnel",
                move |tcp, peer| {
                    let (acceptor, workloads) = (acceptor.clone(), workloads.clone());
                    async move {
                        if let Err(err) = serve_connection(tcp, acceptor, workloads).await {
                            tracing::info!(%peer, "destination ztunnel connection: {err:#}");
                        }
                    }
                },
            )
        });
        Ok(DestinationZtunnel { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    workloads: Arc<[SocketAddr]>,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let tls = tokio::time::timeout(SETUP_TIMEOUT, acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let (_, session) = tls.get_ref();
    // HBONE is TLS 1.3 only; checked here too in case the config given also offers 1.2.
    anyhow::ensure!(
        session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
        "peer negotiated {:?}, HBONE needs TLS 1.3",
        session.protocol_version()
    );
    anyhow::ensure!(
        session.alpn_protocol() == Some(b"h2"),
        "peer did not negotiate ALPN h2"
    );
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(1000)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    streams.spawn(serve_stream(req, respond, workloads.clone()));
                }
                Some(Err(err)) => return Err(err).context("HTTP/2 connection"),
                None => return Ok(()),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// Where a CONNECT goes, or the status refusing it (as ztunnel's inbound answers).
fn destination(
    req: &Request<RecvStream>,
    workloads: &[SocketAddr],
) -> Result<SocketAddr, (StatusCode, String)> {
    if req.method() != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not CONNECT", req.method()),
        ));
    }
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let addr: SocketAddr = authority.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!("authority {authority:?} is not <ip>:<port>"),
        )
    })?;
    if !workloads.contains(&addr) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{addr} is no workload of this node"),
        ));
    }
    Ok(addr)
}

async fn serve_stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    workloads: Arc<[SocketAddr]>,
) {
    let target = match destination(&req, &workloads) {
        Ok(addr) => addr,
        Err((status, why)) => return refuse(&mut respond, status, &why),
    };
    let tcp = match tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => {
            let why = format!("connecting to {target}: {err}");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE, &why);
        }
        Err(_) => {
            let why = format!("connecting to {target}: timed out");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE, &why);
        }
    };
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%target, %err, "TCP_NODELAY");
    }
    // 200 only now that the workload is reachable: the client sends nothing before it.
    let Ok(send) = respond.send_response(Response::new(()), false) else {
        return; // the client reset the stream meanwhile
    };
    if let Err(err) = relay(req.into_body(), send, tcp).await {
        tracing::debug!(%target, "destination ztunnel stream: {err:#}");
    }
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode, why: &str) {
    tracing::info!(%status, "destination ztunnel refused a CONNECT: {why}");
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// A reset with NO_ERROR or CANCEL is how HBONE peers close cleanly (as ztunnel maps it).
fn is_clean_close(err: &h2::Error) -> bool {
    matches!(err.reason(), Some(Reason::NO_ERROR | Reason::CANCEL))
}

/// Bytes both ways until both sides are done; END_STREAM <-> FIN. Each read goes out at
/// once as its own frame or write: token streams keep their timing.
async fn relay(
    mut recv: RecvStream,
    mut send: SendStream<Bytes>,
    tcp: TcpStream,
) -> anyhow::Result<()> {
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let to_workload = async {
        loop {
            match recv.data().await {
                Some(Ok(data)) => {
                    tcp_write
                        .write_all(&data)
                        .await
                        .context("writing to the workload")?;
                    // Written, so the client may send that much more.
                    let _ = recv.flow_control().release_capacity(data.len());
                }
                Some(Err(err)) if !is_clean_close(&err) => {
                    return Err(err).context("reading the CONNECT stream")
                }
                Some(Err(_)) | None => break,
            }
        }
        tcp_write
            .shutdown()
            .await
            .context("half-closing towards the workload")
    };
    let from_workload = async {
        // One buffer, reused once h2 has written (and dropped) what was split off it.
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            let n = tcp_read
                .read_buf(&mut buf)
                .await
                .context("reading from the workload")?;
            if n == 0 {
                return send
                    .send_data(Bytes::new(), true)
                    .context("ending the CONNECT stream");
            }
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .context("CONNECT stream closed")?
                    .context("waiting for flow-control capacity")?;
                if granted == 0 {
                    continue; // h2 may wake with no capacity yet: ask again
                }
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false)
                    .context("writing to the CONNECT stream")?;
            }
        }
    };
    tokio::try_join!(to_workload, from_workload)?;
    Ok(())
}
