//! The floor of a relay on tokio, for `bench/compare`: what relaying costs on the same runtime
//! as eastwest-proxy (multi-thread scheduler, one worker) with nothing of a gateway added.
//! Beside `splice_floor` (one thread, plain epoll), it splits eastwest's cost per connection
//! and per request into what the runtime takes and what eastwest's own work adds.
//!
//! One task per connection: connect to BACKEND, then `tokio::io::copy_bidirectional`, which
//! passes a half-close on. TCP_NODELAY both sides, as eastwest sets it. No ClientHello, routing,
//! metrics, timeouts or drain.
//!
//!   tokio_floor LISTEN BACKEND        # e.g. tokio_floor 127.0.0.1:18407 127.0.0.1:18401

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: tokio_floor LISTEN BACKEND");
        std::process::exit(2);
    };
    let parse = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| std::io::Error::other(format!("{s}: {e}")))
    };
    let (listen, backend) = (parse(&listen)?, parse(&backend)?);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(listen).await?;
            loop {
                let (mut client, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        eprintln!("tokio_floor: accept: {err}");
                        continue;
                    }
                };
                tokio::spawn(async move {
                    let mut upstream = TcpStream::connect(backend).await?;
                    client.set_nodelay(true)?;
                    upstream.set_nodelay(true)?;
                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                    Ok::<_, std::io::Error>(())
                });
            }
        })
}
