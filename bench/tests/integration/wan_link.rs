//! The WAN link over real loopback sockets: bytes intact and in order both ways, delay at
//! least the configured one, half-close passed through, bandwidth cap, bounded queue.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eastwest_bench::wan::{WanLink, WanOptions, QUEUE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Deterministic pseudo-random bytes, so reordering or loss would show.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn bytes_intact_both_ways_with_half_close() {
    let upstream = TcpListener::bind(local()).await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let request = pattern(1 << 20, 1);
    let response = pattern(700_000, 2);
    let (want_req, reply) = (request.clone(), response.clone());
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        // Reads to EOF: only possible if the client's half-close came through.
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert!(got == want_req, "request corrupted: {} bytes", got.len());
        // The other direction still works after the half-close.
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let opts = WanOptions {
        rtt: Duration::from_millis(10),
        jitter: Duration::from_millis(3),
        bandwidth_bytes_per_sec: None,
    };
    let link = WanLink::start(local(), up_addr, opts).await.unwrap();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    let exchange = async {
        // Many small writes then a big one: chunk boundaries differ, bytes must not.
        for piece in request[..4096].chunks(64) {
            c.write_all(piece).await.unwrap();
        }
        c.write_all(&request[4096..]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        got
    };
    let got = timeout(DEADLINE, exchange)
        .await
        .expect("exchange within deadline");
    assert!(got == response, "response corrupted: {} bytes", got.len());
    timeout(DEADLINE, server).await.unwrap().unwrap();
    let stats = link.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.bytes_up, request.len() as u64);
    assert_eq!(stats.bytes_down, response.len() as u64);
}

#[tokio::test]
async fn delay_is_at_least_the_configured_one() {
    let rtt = Duration::from_millis(40);
    let upstream = TcpListener::bind(local()).await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut b = [0u8; 1];
        // Echo one byte at a time, noting when each arrived (same clock as the client).
        while s.read_exact(&mut b).await.is_ok() {
            let _ = arrived_tx.send(Instant::now());
            if s.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let opts = WanOptions {
        rtt,
        ..Default::default()
    };
    let link = WanLink::start(local(), up_addr, opts).await.unwrap();
    let connected = Instant::now();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut b = [7u8; 1];
    for round in 0..6 {
        let sent = Instant::now();
        c.write_all(&b).await.unwrap();
        let arrived = timeout(DEADLINE, arrived_rx.recv()).await.unwrap().unwrap();
        timeout(DEADLINE, c.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        let back = Instant::now();
        assert!(
            arrived - sent >= rtt / 2,
            "round {round}: one way {:?}",
            arrived - sent
        );
        assert!(
            back - sent >= rtt,
            "round {round}: round trip {:?}",
            back - sent
        );
        if round == 0 {
            // The first byte also waits out the emulated TCP handshake round trip.
            assert!(
                back - connected >= 2 * rtt,
                "first round trip {:?}",
                back - connected
            );
        }
    }
}

#[tokio::test]
async fn bandwidth_cap_spreads_a_transfer() {
    let upstream = TcpListener::bind(local()).await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let _ = done_tx.send((got.len(), Instant::now()));
    });
    let opts = WanOptions {
        rtt: Duration::ZERO,
        jitter: Duration::ZERO,
        bandwidth_bytes_per_sec: Some(1_000_000),
    };
    let link = WanLink::start(local(), up_addr, opts).await.unwrap();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    let start = Instant::now();
    c.write_all(&pattern(200_000, 3)).await.unwrap();
    c.shutdown().await.unwrap();
    let (len, end) = timeout(DEADLINE, done_rx).await.unwrap().unwrap();
    assert_eq!(len, 200_000);
    // 200 kB at 1 MB/s cannot take less than 200 ms.
    assert!(
        end - start >= Duration::from_millis(200),
        "took {:?}",
        end - start
    );
}

#[tokio::test]
async fn slow_reader_makes_the_sender_block_not_the_link_buffer() {
    let upstream = TcpListener::bind(local()).await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    const TOTAL: usize = 64 << 20;
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        // Does not read until told to.
        go_rx.await.unwrap();
        let mut got = Vec::with_capacity(TOTAL);
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let opts = WanOptions {
        rtt: Duration::from_millis(2),
        ..Default::default()
    };
    let link = WanLink::start(local(), up_addr, opts).await.unwrap();
    let data = Arc::new(pattern(TOTAL, 4));
    let written = Arc::new(AtomicU64::new(0));
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    let writer = {
        let (data, written) = (data.clone(), written.clone());
        tokio::spawn(async move {
            for piece in data.chunks(64 << 10) {
                c.write_all(piece).await.unwrap();
                written.fetch_add(piece.len() as u64, Ordering::SeqCst);
            }
            c.shutdown().await.unwrap();
        })
    };
    // The link's queue fills up (the upstream socket buffers first)...
    wait_for("the link queue to fill", || {
        link.stats().peak_queued_up > QUEUE_BYTES - (16 << 10)
    })
    .await;
    // ...and the sender is held back: far from all of it could be written (only socket
    // buffers and the bounded queue hold data), and the queue never exceeded its bound.
    let held = written.load(Ordering::SeqCst);
    assert!(
        held < TOTAL as u64 / 2,
        "sender wrote {held} bytes into a stalled link"
    );
    assert!(link.stats().peak_queued_up <= QUEUE_BYTES);
    assert!(!writer.is_finished());

    go_tx.send(()).unwrap();
    timeout(DEADLINE, writer).await.unwrap().unwrap();
    let got = timeout(DEADLINE, server).await.unwrap().unwrap();
    assert!(
        got == *data,
        "data corrupted: {} of {TOTAL} bytes",
        got.len()
    );
    assert!(link.stats().peak_queued_up <= QUEUE_BYTES);
}

#[tokio::test]
async fn refused_upstream_does_not_stop_the_link() {
    // Nothing listens here (bound then dropped).
    let dead = TcpListener::bind(local())
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let link = WanLink::start(local(), dead, WanOptions::default())
        .await
        .unwrap();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    let mut buf = [0u8; 8];
    // The relay closes the client connection.
    let n = timeout(DEADLINE, c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // And still accepts the next one.
    let mut c2 = TcpStream::connect(link.local_addr()).await.unwrap();
    let n = timeout(DEADLINE, c2.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(link.stats().connections, 2);
}
