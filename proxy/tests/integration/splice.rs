//! The bulk path: a direction that carries bulk is spliced (socket → pipe → socket) by the
//! proxy. Byte-exact, half-close both ways, resets, exact byte counters, no fd leak, and token
//! writes still leave one by one. The process-level checks run the binary, so that its
//! /proc/<pid>/fd holds only the gateway's descriptors.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use crate::support::*;
use eastwest_proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

/// Deterministic, non-repeating-looking bytes, so a lost or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// An eastwest-proxy process routing `SGLANG:8000` to `backend`, with `upstream.splice`.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn gateway(backend: SocketAddr, splice: &str) -> Gateway {
    gateway_with(backend, splice, &[]).await
}

async fn gateway_with(backend: SocketAddr, splice: &str, args: &[&str]) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let yaml = format!(
        "admin: {{status_address: 127.0.0.1:0, metrics_address: 127.0.0.1:0, debug_address: 127.0.0.1:0}}\n\
         upstream: {{splice: {splice}}}\n\
         listeners:\n  - name: bulk\n    address: 127.0.0.1:{port}\n\
         routes:\n  services:\n    - hostname: {SGLANG}\n      ports:\n        - port: 8000\n          endpoints:\n            - address: {backend}\n"
    );
    let config = dir.path().join("gw.yaml");
    std::fs::write(&config, yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_eastwest-proxy"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut gw = Gateway {
        child,
        addr,
        _dir: dir,
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            gw.child.try_wait().unwrap().is_none(),
            "eastwest-proxy exited (config rejected?)"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no listener on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw
}

/// The gateway's descriptors that belong to connections: its TCP sockets other than listeners,
/// and its pipe ends (pooled, or lent to a spliced direction). Not the rest: the runtime, the
/// admin servers and the config watcher open theirs while the gateway starts, which may still
/// be going on after its listener first answers.
struct ConnectionFds {
    sockets: usize,
    pipes: usize,
}

fn connection_fds(gw: &Gateway) -> ConnectionFds {
    let pid = gw.child.id();
    // Inodes of the sockets in this network namespace that are not listening (state 0A): the
    // gateway's are those its descriptors point at.
    let mut connected = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols[3] != "0A" {
                connected.insert(cols[9].to_string());
            }
        }
    }
    let mut fds = ConnectionFds {
        sockets: 0,
        pipes: 0,
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        // Err: a descriptor closed between the listing and the readlink.
        let Ok(target) = std::fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if target.starts_with("pipe:") {
            fds.pipes += 1;
        } else if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            fds.sockets += usize::from(connected.contains(inode));
        }
    }
    fds
}

/// Sends `up` through an Istio mTLS connection to the echo backend and reads the echo back,
/// 256 KiB at a time: both directions carry `up.len()` bytes. (Lockstep: one task drives the
/// TLS stream, with no split halves to wake each other.)
async fn echo_through(gw: SocketAddr, pki: &Pki, up: &[u8]) -> Vec<u8> {
    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    greeting(&mut tls).await;
    let mut down = vec![0u8; up.len()];
    for (out, back) in up.chunks(256 * 1024).zip(down.chunks_mut(256 * 1024)) {
        tls.write_all(out).await.unwrap();
        tls.read_exact(back).await.unwrap();
    }
    down
}

#[tokio::test]
async fn bulk_through_tls_is_spliced_and_byte_exact_both_ways() {
    let pki = pki();
    let backend = tls_echo_backend("ash-sglang", &pki.server).await;
    let up = pattern(8 * MIB, 0x5a);
    for splice in ["auto", "in-runtime", "off"] {
        let gw = gateway(backend, splice).await;
        let pipes_before = connection_fds(&gw).pipes;
        let down = tokio::time::timeout(DEADLINE * 3, echo_through(gw.addr, &pki, &up))
            .await
            .unwrap_or_else(|_| panic!("splice {splice}: echo of 8 MiB timed out"));
        assert!(
            down == up,
            "splice {splice}: the echo differs from what was sent"
        );
        // Spliced directions give their pipes back to the pool, which keeps them open.
        let pipes = connection_fds(&gw).pipes - pipes_before;
        if splice == "off" {
            assert_eq!(pipes, 0, "splice off: the gateway opened pipes");
        } else {
            assert!(pipes >= 2, "splice {splice}: no pipe was ever used");
        }
        // `auto` hands the bulk connection to a bulk thread (started on the first handoff);
        // the others never start one, also once the connection has ended.
        connections_closed(&gw).await;
        assert_eq!(
            bulk_threads(&gw) > 0,
            splice == "auto",
            "splice {splice}: eastwest-bulk threads"
        );
    }
}

/// Waits until the gateway holds no connection socket (they close a moment after the client
/// sees EOF); its descriptors then.
async fn connections_closed(gw: &Gateway) -> ConnectionFds {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let fds = connection_fds(gw);
        if fds.sockets == 0 {
            return fds;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connection sockets still open",
            fds.sockets
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gateway's threads named `eastwest-bulk-N`, as `ps -L` shows them.
fn bulk_threads(gw: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", gw.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("eastwest-bulk"))
        .count()
}

#[tokio::test]
async fn many_spliced_connections_leave_no_descriptor_behind() {
    // A backend that answers each connection with 1 MiB, then closes (after reading what it
    // was sent: closing with unread bytes would reset the connection).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let reply = pattern(MIB, 3);
    let served = reply.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = served.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
        }
    });
    // One worker, so one bulk thread: pipes are pooled per thread, and with several how many
    // end up pooled depends on which thread each connection went to. With one, each
    // connection reuses the pipe the last one gave back.
    let gw = gateway_with(backend, "auto", &["--worker-threads", "1"]).await;
    let hello = client_hello_bytes(&pki().client, &istio_sni(8000, "", SGLANG));
    let pipes_before = connection_fds(&gw).pipes;
    for i in 0..40 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let got = read_to_eof(&mut s).await;
        assert!(got == reply, "connection {i}: reply differs");
        s.shutdown().await.unwrap();
    }
    // Sockets close a moment after the client sees EOF. Only the reply direction carries
    // bulk, and it gives its pipe back before passing the EOF on: one pipe (two fds) stays
    // pooled for all 40 connections.
    let fds = connections_closed(&gw).await;
    assert_eq!(fds.pipes - pipes_before, 2, "pipe fds pooled");
}

/// A raw backend for one connection, driven by the test through the returned stream.
async fn one_connection_backend() -> (SocketAddr, tokio::sync::oneshot::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            let _ = tx.send(s);
        }
    });
    (addr, rx)
}

/// An in-process proxy for `host:8000` → `backend` (a host per test keeps its metrics apart).
async fn proxy_for(host: &str, backend: SocketAddr) -> Proxy {
    Proxy::start(passthrough_config(
        "splice",
        vec![service(host, 8000, &[(backend, &[])])],
    ))
    .await
    .unwrap()
}

async fn read_exactly(s: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut got))
        .await
        .expect("read timed out")
        .unwrap();
    got
}

async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .expect("no EOF")
        .unwrap();
    got
}

#[tokio::test]
async fn half_close_passes_both_ways_on_the_splice_path_and_bytes_are_counted_exactly() {
    let host = "halfclose.bulk.svc.cluster.local";
    let (backend, accepted) = one_connection_backend().await;
    let proxy = proxy_for(host, backend).await;
    let gw = proxy.listener_addr("splice").unwrap();
    let hello = client_hello_bytes(&pki().client, &istio_sni(8000, "", host));
    let (up, down) = (pattern(3 * MIB, 1), pattern(2 * MIB + 17, 2));

    let mut client = TcpStream::connect(gw).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let mut server = accepted.await.unwrap();
    assert_eq!(read_exactly(&mut server, hello.len()).await, hello);
    // Backend → client first, then the backend's FIN: the client gets it all and EOF while
    // its own direction stays open.
    let ((), got) = tokio::join!(
        async {
            server.write_all(&down).await.unwrap();
            server.shutdown().await.unwrap();
        },
        read_to_eof(&mut client)
    );
    assert!(got == down, "downstream bytes differ");
    // Then client → backend, and the client's FIN.
    let ((), got) = tokio::join!(
        async {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
        },
        read_to_eof(&mut server)
    );
    assert!(got == up, "upstream bytes differ");

    let route = format!("{host}:8000");
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"splice\",route=\"{route}\",result=\"routed\"}}"),
        1.0,
    )
    .await;
    let bytes =
        |dir: &str| format!("eastwest_bytes_total{{route=\"{route}\",direction=\"{dir}\"}}");
    assert_eq!(
        metric(&proxy, &bytes("to_upstream")).await,
        (hello.len() + up.len()) as f64
    );
    assert_eq!(
        metric(&proxy, &bytes("to_downstream")).await,
        down.len() as f64
    );
}

#[tokio::test]
async fn token_writes_after_bulk_still_arrive_one_by_one() {
    let host = "tokens.bulk.svc.cluster.local";
    let (backend, accepted) = one_connection_backend().await;
    let proxy = proxy_for(host, backend).await;
    let gw = proxy.listener_addr("splice").unwrap();
    let hello = client_hello_bytes(&pki().client, &istio_sni(8000, "", host));
    let (up, down) = (pattern(MIB, 4), pattern(MIB, 5));

    let mut client = TcpStream::connect(gw).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let mut server = accepted.await.unwrap();
    read_exactly(&mut server, hello.len()).await;
    // Bulk both ways first, so that both directions are past the splice threshold.
    {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let (mut got_down, mut got_up) = (vec![0u8; down.len()], vec![0u8; up.len()]);
        let moved = tokio::time::timeout(DEADLINE, async {
            tokio::try_join!(
                cw.write_all(&up),
                sw.write_all(&down),
                cr.read_exact(&mut got_down),
                sr.read_exact(&mut got_up),
            )
        })
        .await
        .expect("bulk timed out");
        moved.unwrap();
        assert!(got_down == down && got_up == up, "bulk differs");
    }
    // Then 100 tokens, each sent only after the client acknowledged the previous one: the
    // client can only read token k if the gateway passed it on alone, without waiting for
    // more bytes (token k + 1 is not sent before the ack).
    for k in 0..100u32 {
        let token = format!("token {k:03};");
        server.write_all(token.as_bytes()).await.unwrap();
        assert_eq!(
            read_exactly(&mut client, token.len()).await,
            token.as_bytes()
        );
        client.write_all(b"ack").await.unwrap();
        assert_eq!(read_exactly(&mut server, 3).await, b"ack");
    }
}

#[tokio::test]
async fn a_reset_mid_splice_ends_the_connection_on_both_sides() {
    let host = "reset.bulk.svc.cluster.local";
    let (backend, accepted) = one_connection_backend().await;
    let proxy = proxy_for(host, backend).await;
    let gw = proxy.listener_addr("splice").unwrap();
    let hello = client_hello_bytes(&pki().client, &istio_sni(8000, "", host));

    let mut client = TcpStream::connect(gw).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let mut server = accepted.await.unwrap();
    read_exactly(&mut server, hello.len()).await;
    let chunk = pattern(256 * 1024, 6);
    server.write_all(&chunk).await.unwrap();
    assert!(read_exactly(&mut client, chunk.len()).await == chunk);
    // The backend dies with a reset while its direction is being spliced.
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    // The client sees its connection end (EOF or reset), not a hang.
    let mut buf = [0u8; 4096];
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client's connection outlived the reset");
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"splice\",route=\"{host}:8000\",result=\"routed\"}}"),
        1.0,
    )
    .await;
}
