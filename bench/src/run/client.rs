//! HTTP/1.1 connections to the target: TCP (+TLS), dialled at `--connect-to` or the URL's
//! host, with an idle pool for `--connection keepalive`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::config::{ConnectionMode, RunConfig, TlsClient};
use super::record::Failure;

pub type Sender = SendRequest<Full<Bytes>>;

/// Where and how to connect, resolved once before the run so that DNS is not timed.
pub struct Target {
    /// `Host` header value (the URL's authority).
    pub authority: String,
    /// Path prefix from the base URL, without a trailing slash.
    pub path_prefix: String,
    dial: Result<Vec<SocketAddr>, String>,
    dial_name: String,
    tls: Option<(TlsClient, ServerName<'static>)>,
    mode: ConnectionMode,
    idle: Mutex<Vec<Sender>>,
    /// `--header KEY=VALUE`s, sent with every benchmark request.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Target {
    pub async fn resolve(cfg: &RunConfig) -> anyhow::Result<Arc<Target>> {
        let url: http::Uri = cfg
            .base_url
            .parse()
            .with_context(|| format!("--base-url {:?} is not a URL", cfg.base_url))?;
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!(
                "--base-url {:?}: scheme must be http or https",
                cfg.base_url
            ),
        };
        let Some(host) = url.host() else {
            bail!("--base-url {:?} has no host", cfg.base_url);
        };
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.to_string());
        let path_prefix = url.path().trim_end_matches('/').to_string();

        let tls = match (&cfg.tls, https) {
            (Some(t), _) => Some(t.clone()),
            (None, true) => Some(TlsClient::from_files(&Default::default())?),
            (None, false) => None,
        };
        let tls = match tls {
            Some(t) => {
                let bare_host = host.trim_start_matches('[').trim_end_matches(']');
                let name = cfg.sni.as_deref().unwrap_or(bare_host);
                let sni = ServerName::try_from(name.to_string())
                    .with_context(|| format!("TLS server name {name:?} is not a DNS name or IP"))?;
                Some((t, sni))
            }
            None => None,
        };

        let dial_name = cfg
            .connect_to
            .clone()
            .unwrap_or_else(|| format!("{}:{port}", host));
        // A name that does not resolve fails each request (counted), not the run.
        let dial = match tokio::net::lookup_host(dial_name.as_str()).await {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                if addrs.is_empty() {
                    Err(format!("{dial_name}: no addresses"))
                } else {
                    Ok(addrs)
                }
            }
            Err(e) => Err(format!("resolving {dial_name}: {e}")),
        };
        Ok(Arc::new(Target {
            authority,
            path_prefix,
            dial,
            dial_name,
            tls,
            mode: cfg.connection,
            idle: Mutex::new(Vec::new()),
            headers: cfg.headers.clone(),
        }))
    }

    /// A connection ready to send: an idle pooled one (keepalive) or a new one.
    pub async fn checkout(&self) -> Result<Sender, Failure> {
        Ok(self.checkout_reused().await?.0)
    }

    /// Like [`Target::checkout`]; also says whether the connection came from the pool.
    pub async fn checkout_reused(&self) -> Result<(Sender, bool), Failure> {
        if self.mode == ConnectionMode::Keepalive {
            loop {
                let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some(mut sender) = candidate else { break };
                // A connection the server closed while idle is dropped, not used.
                if sender.ready().await.is_ok() {
                    return Ok((sender, true));
                }
            }
        }
        Ok((self.connect().await?, false))
    }

    /// A new connection, bypassing the pool.
    pub async fn connect_new(&self) -> Result<Sender, Failure> {
        self.connect().await
    }

    /// Returns a connection whose response was read to the end (keepalive only).
    pub fn checkin(&self, sender: Sender) {
        if self.mode == ConnectionMode::Keepalive && !sender.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sender);
        }
    }

    async fn connect(&self) -> Result<Sender, Failure> {
        let addrs = self
            .dial
            .as_ref()
            .map_err(|e| Failure::new("connect", e.clone()))?;
        let tcp = TcpStream::connect(addrs.as_slice())
            .await
            .map_err(|e| Failure::new("connect", format!("{}: {e}", self.dial_name)))?;
        // Tokens are tiny writes; Nagle would hold the request back.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some((tls, sni)) => {
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(sni.clone(), tcp)
                    .await
                    .map_err(|e| Failure::new("tls", format!("{}: {e}", self.dial_name)))?;
                handshake(TokioIo::new(stream)).await
            }
        }
    }
}

async fn handshake<T>(io: T) -> Result<Sender, Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Failure::new("connect", format!("HTTP/1.1 handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("client connection ended: {e}");
        }
    });
    Ok(sender)
}
