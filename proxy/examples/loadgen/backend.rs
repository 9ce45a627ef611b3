//! The TLS backend: answers each request with the number of bytes it asks for.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::tls;
use crate::wire::{self, CHUNK, HEADER_LEN, STREAM};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger request bodies are refused (the connection is closed).
const MAX_REQUEST: u32 = 16 * 1024 * 1024;

static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

pub async fn run(listen: SocketAddr, certs: &Path) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls::server_config(certs)?);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("loadgen backend listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors: accepting again at once would spin.
                eprintln!("loadgen backend: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            // Errors just end the connection: clients come and go as they like.
            let _ = serve(tls).await;
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S) -> std::io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    loop {
        match tls.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (request_len, response_len, records) = wire::parse_header(&header);
        if request_len > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request too large",
            ));
        }
        body.resize(request_len as usize, 0);
        tls.read_exact(&mut body).await?;
        if response_len == STREAM {
            loop {
                tls.write_all(&ZEROS).await?;
            }
        }
        if records.size > 0 {
            write_records(&mut tls, response_len as usize, records).await?;
            continue;
        }
        let mut left = response_len as usize;
        while left > 0 {
            let n = left.min(CHUNK);
            tls.write_all(&ZEROS[..n]).await?;
            left -= n;
        }
        tls.flush().await?;
    }
}

/// `len` bytes as records of `records.size` bytes, each written and flushed alone (one TLS
/// record each), `records.gap_us` apart: a model server streaming token events.
async fn write_records<S: AsyncWrite + Unpin>(
    tls: &mut S,
    len: usize,
    records: wire::Records,
) -> std::io::Result<()> {
    let size = (records.size as usize).min(CHUNK);
    let gap = Duration::from_micros(records.gap_us.into());
    let mut left = len;
    let mut first = true;
    while left > 0 {
        if !first && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        first = false;
        let n = left.min(size);
        tls.write_all(&ZEROS[..n]).await?;
        tls.flush().await?;
        left -= n;
    }
    Ok(())
}
