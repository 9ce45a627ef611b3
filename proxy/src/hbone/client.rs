//! A ztunnel-like HBONE client: mTLS + HTTP/2 over any transport, and CONNECT streams that
//! are themselves transports, so an inner HBONE can run inside an outer one (double HBONE).
//!
//! Used by the integration tests and by eastwest-bench. The settings are ztunnel's
//! (`src/proxy/h2/client.rs`): 4 MiB stream window, 16 MiB connection window, 1 MiB frames.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

/// ztunnel's HTTP/2 stream window (`window_size`).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// ztunnel's HTTP/2 connection window (`connection_window_size`).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// ztunnel's HTTP/2 max frame size (`frame_size`).
pub const MAX_FRAME: u32 = 1024 * 1024;

/// Why opening an HBONE connection or stream failed.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("HBONE TLS handshake: {0}")]
    Tls(#[source] io::Error),
    #[error("HBONE peer did not negotiate ALPN h2 (got {0:?})")]
    NoH2(Option<String>),
    #[error("HBONE HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
    #[error("HBONE CONNECT {authority}: bad authority: {source}")]
    BadAuthority {
        authority: String,
        #[source]
        source: http::Error,
    },
    #[error("HBONE CONNECT {authority}: {source}")]
    Stream {
        authority: String,
        #[source]
        source: h2::Error,
    },
    /// The gateway (or destination) answered the CONNECT with something other than 200.
    #[error("HBONE CONNECT {authority}: refused with status {status}")]
    Status {
        authority: String,
        status: http::StatusCode,
    },
}

impl HboneError {
    /// The HTTP status of a refused CONNECT.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One outer HBONE connection; clones share it. Its driver task ends when every clone and
/// stream is gone, or the peer closes.
#[derive(Clone)]
pub struct HboneClient {
    send: SendRequest<Bytes>,
}

impl HboneClient {
    /// mTLS (ALPN h2) over `transport`, then the HTTP/2 handshake. `server_name` only picks
    /// what rustls sends; ztunnel sends no SNI, which rustls does for an IP address name.
    pub async fn connect<T>(
        transport: T,
        tls: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<HboneClient, HboneError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls = TlsConnector::from(tls)
            .connect(server_name, transport)
            .await
            .map_err(HboneError::Tls)?;
        let alpn = tls.get_ref().1.alpn_protocol();
        if alpn != Some(b"h2") {
            let got = alpn.map(|p| String::from_utf8_lossy(p).into_owned());
            return Err(HboneError::NoH2(got));
        }
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(STREAM_WINDOW as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(HboneError::Handshake)?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%err, "HBONE client connection ended");
            }
        });
        Ok(HboneClient { send })
    }

    /// Opens a CONNECT stream to `authority` (`host:port`) and waits for its 200.
    pub async fn open(&self, authority: &str) -> Result<HboneStream, HboneError> {
        let stream_err = |source| HboneError::Stream {
            authority: authority.to_string(),
            source,
        };
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .version(http::Version::HTTP_2)
            .body(())
            .map_err(|source| HboneError::BadAuthority {
                authority: authority.to_string(),
                source,
            })?;
        let mut send = self.send.clone().ready().await.map_err(stream_err)?;
        let (response, body) = send.send_request(req, false).map_err(stream_err)?;
        let response = response.await.map_err(stream_err)?;
        if response.status() != http::StatusCode::OK {
            return Err(HboneError::Status {
                authority: authority.to_string(),
                status: response.status(),
            });
        }
        Ok(HboneStream::new(body, response.into_body()))
    }
}

/// One CONNECT stream as a byte stream. Shutting down the write side sends END_STREAM; the
/// peer's END_STREAM, or a reset with NO_ERROR/CANCEL, reads as EOF (as in ztunnel).
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What the last DATA frame had left over after the reader's buffer filled.
    pending: Bytes,
}

impl HboneStream {
    /// The two halves of a CONNECT stream as one byte stream: a client's, or a server's once
    /// it has sent its 200 (a destination ztunnel stand-in terminating the inner HBONE).
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        HboneStream {
            send,
            recv,
            pending: Bytes::new(),
        }
    }

    /// Resets the stream with `reason` (e.g. CANCEL to abort it).
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

/// A stream error as ztunnel maps it: NO_ERROR/CANCEL resets are clean closes (EOF on read).
pub(crate) fn read_error(e: h2::Error) -> Option<io::Error> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => None,
        Some(Reason::STREAM_CLOSED) => Some(io::Error::new(io::ErrorKind::BrokenPipe, e)),
        _ => Some(into_io(e)),
    }
}

pub(crate) fn into_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Why writing failed: the peer's reset (NO_ERROR/CANCEL/STREAM_CLOSED are a broken pipe).
pub(crate) fn poll_write_error(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Error> {
    Poll::Ready(match ready!(send.poll_reset(cx)) {
        Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
            io::ErrorKind::BrokenPipe.into()
        }
        Ok(reason) => io::Error::other(h2::Error::from(reason)),
        Err(e) => into_io(e),
    })
}

/// Polls for the next DATA frame, handing its flow-control credit back at once: the reader
/// has taken it, so the peer may send more (per-stream flow control, nothing else buffered).
pub(crate) fn poll_data(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
    loop {
        return Poll::Ready(match ready!(recv.poll_data(cx)) {
            None => Ok(Bytes::new()),
            Some(Ok(data)) if data.is_empty() => continue,
            Some(Ok(data)) => {
                let _ = recv.flow_control().release_capacity(data.len());
                Ok(data)
            }
            Some(Err(e)) => match read_error(e) {
                None => Ok(Bytes::new()),
                Some(err) => Err(err),
            },
        });
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_empty() {
            this.pending = ready!(poll_data(&mut this.recv, cx))?;
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                // h2 owns what it sends: one copy of the caller's slice.
                match send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => poll_write_error(send, cx).map(Err),
                }
            }
            Some(Err(_)) | None => poll_write_error(send, cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes queued frames as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let send = &mut self.send;
        if send.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(match ready!(send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) => Ok(()),
            Ok(Reason::CANCEL | Reason::STREAM_CLOSED) => Err(io::ErrorKind::BrokenPipe.into()),
            Ok(reason) => Err(io::Error::other(h2::Error::from(reason))),
            Err(e) => Err(into_io(e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use eastwest_certs::{Mesh, PeerPolicy, SpiffeId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{HboneClient, HboneStream};

    /// An h2 server over real mTLS answering `echo:1` with 200 and an echo, anything else 503.
    #[tokio::test]
    async fn opens_streams_waits_for_200_and_reports_other_statuses() {
        let mesh = Mesh::generate("cluster.local", &["c1"]).unwrap();
        let id = |sa: &str| {
            mesh.workload("c1", &SpiffeId::workload("cluster.local", "ns", sa))
                .unwrap()
        };
        let policy = PeerPolicy::TrustDomain("cluster.local".into());
        let server_tls = id("server")
            .server_config_with_alpn(policy.clone(), vec![b"h2".to_vec()])
            .unwrap();
        let client_tls = id("client")
            .client_config_with_alpn(policy, vec![b"h2".to_vec()])
            .unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(server_tls)
                .accept(s)
                .await
                .unwrap();
            let mut conn = h2::server::handshake(tls).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let ok = req.uri().authority().map(|a| a.as_str()) == Some("echo:1");
                let status = if ok { 200 } else { 503 };
                let resp = http::Response::builder().status(status).body(()).unwrap();
                let send = respond.send_response(resp, !ok).unwrap();
                if ok {
                    tokio::spawn(async move {
                        let mut stream = HboneStream::new(send, req.into_body());
                        let mut buf = Vec::new();
                        stream.read_to_end(&mut buf).await.unwrap();
                        stream.write_all(&buf).await.unwrap();
                        stream.shutdown().await.unwrap();
                    });
                }
            }
        });
        let name = "127.0.0.1".try_into().unwrap();
        let client = HboneClient::connect(c, client_tls, name).await.unwrap();
        let err = client.open("other:1").await.err().unwrap();
        assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
        let mut stream = client.open("echo:1").await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
    }
}
