//! The relay's own tests: buffers and pipes given back, and the handoff to a bulk thread.

use super::*;
use tokio::net::TcpListener;

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

fn pooled() -> [usize; 3] {
    POOLS.with(|p| p.borrow().each_ref().map(Vec::len))
}

/// client ↔ downstream, relayed to upstream ↔ server. The relay takes the middle two.
struct Ends {
    client: TcpStream,
    downstream: Option<TcpStream>,
    upstream: Option<TcpStream>,
    server: TcpStream,
}

impl Ends {
    /// The two sides the relay takes.
    fn middle(&mut self) -> (TcpStream, TcpStream) {
        (
            self.downstream.take().expect("middle taken twice"),
            self.upstream.take().expect("middle taken twice"),
        )
    }
}

async fn ends() -> Ends {
    let (client, downstream) = pair().await;
    let (upstream, server) = pair().await;
    Ends {
        client,
        downstream: Some(downstream),
        upstream: Some(upstream),
        server,
    }
}

/// Relays 1 MiB from client to server; returns `measure()` taken as soon as the server has
/// it all, with the relay still running. (Single-threaded: the relay's last write and what
/// it does right after happen in one poll, before the server could read the last byte.)
async fn after_bulk<T>(ends: &mut Ends, splice: Splice, measure: impl FnOnce() -> T) -> T {
    let meters = Uncounted::new();
    let hour = Duration::from_secs(3600);
    let relay = meters.relay_with(splice, ends.middle(), hour, std::future::pending());
    let bulk = vec![7u8; 1 << 20];
    let exchange = async {
        let mut got = vec![0u8; bulk.len()];
        let (wrote, read) = tokio::join!(
            ends.client.write_all(&bulk),
            ends.server.read_exact(&mut got)
        );
        wrote.unwrap();
        read.unwrap();
        assert!(got == bulk);
        measure()
    };
    tokio::select! {
        measured = exchange => measured,
        end = relay => panic!("relay ended: {:?}", end.end),
    }
}

/// A direction that moved enough to earn 64 KiB buffers gives its buffer back once the
/// socket is drained: a quiet connection holds none, whatever it moved before.
#[tokio::test(flavor = "current_thread")]
async fn a_quiet_connection_holds_no_buffer_whatever_it_moved() {
    let pooled = after_bulk(&mut ends().await, Splice::Off, pooled).await;
    assert!(
        pooled[1] >= 1,
        "no 64 KiB buffer back in the pool: {pooled:?}"
    );
}

/// Splicing in the runtime, a bulk direction moves through a pipe and gives it back, empty,
/// once drained; a pipe that still holds bytes is closed instead, never pooled.
#[tokio::test(flavor = "current_thread")]
async fn spliced_directions_pool_only_empty_pipes() {
    let mut ends = ends().await;
    let before = pipe::pooled();
    let after = after_bulk(&mut ends, Splice::InRuntime, pipe::pooled).await;
    assert_eq!(
        after,
        before + 1,
        "the spliced direction's pipe is not back"
    );

    // A pipe given back while holding bytes is closed.
    let mut dirty = Pipe::take().unwrap();
    let pooled = pipe::pooled();
    let (mut client, downstream) = pair().await;
    client.write_all(b"left in the pipe").await.unwrap();
    let downstream = &downstream;
    downstream.readable().await.unwrap();
    let n = downstream.try_io(Interest::READABLE, || dirty.fill(downstream));
    assert_eq!(n.unwrap(), 16);
    dirty.give();
    assert_eq!(pipe::pooled(), pooled);
}

fn config(splice: Splice, idle: Duration) -> RelayConfig {
    let hour = Duration::from_secs(3600);
    RelayConfig {
        idle,
        upstream_keepalive: hour,
        splice,
        stall_threshold: hour,
        token_timing: true,
    }
}

/// Writes `len` bytes on `from` while `to` reads them; true if they arrived intact.
async fn through(from: &mut TcpStream, to: &mut TcpStream, len: usize) -> bool {
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut got = vec![0u8; len];
    let (wrote, read) = tokio::join!(from.write_all(&bytes), to.read_exact(&mut got));
    wrote.is_ok() && read.is_ok() && got == bytes
}

/// What a relay counts into, which these tests don't read (they read its result).
struct Uncounted {
    sent: Counter,
    received: Counter,
    stream: StreamMetrics,
}

impl Uncounted {
    fn new() -> Self {
        Uncounted {
            sent: Counter::noop(),
            received: Counter::noop(),
            stream: StreamMetrics::noop(),
        }
    }

    /// `relay` of `(downstream, upstream)` with `splice`, `idle` and `cancel`.
    fn relay_with<'a>(
        &'a self,
        splice: Splice,
        (downstream, upstream): (TcpStream, TcpStream),
        idle: Duration,
        cancel: impl Future<Output = ()> + 'a,
    ) -> impl Future<Output = CopyResult> + 'a {
        let counters = (&self.sent, &self.received);
        let config = config(splice, idle);
        relay(downstream, upstream, counters, &self.stream, config, cancel)
    }
}

/// The tests that hand connections over run one at a time, so each sees its own count.
static HANDING_OVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// With `splice: auto` a connection that carried bulk is relayed by a bulk thread from
/// then on: bytes stay exact both ways, each half-close passes on, and the relay ends
/// with every byte counted.
#[tokio::test(flavor = "current_thread")]
async fn a_bulk_connection_moves_to_a_bulk_thread_and_ends_cleanly() {
    let _one_at_a_time = HANDING_OVER.lock().await;
    let handed_before = engine::handed_over();
    let mut ends = ends().await;
    let meters = Uncounted::new();
    let hour = Duration::from_secs(3600);
    let relay = meters.relay_with(Splice::Auto, ends.middle(), hour, std::future::pending());
    let Ends { client, server, .. } = &mut ends;
    let exchange = async {
        assert!(through(client, server, 1 << 20).await, "upload");
        assert!(through(server, client, 1 << 20).await, "download");
        assert_eq!(engine::handed_over(), handed_before + 1, "not handed over");
        // The client's half-close reaches the server, which still answers.
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut [0u8; 16]).await.unwrap(), 0);
        server.write_all(b"tail").await.unwrap();
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tail");
    };
    let (result, ()) = tokio::join!(relay, exchange);
    assert!(matches!(result.end, CopyEnd::Closed), "{:?}", result.end);
    assert_eq!(result.to_upstream, 1 << 20);
    assert_eq!(result.to_downstream, (1 << 20) + 4);
}

/// A connection on a bulk thread still ends after `idle` without traffic, and at the end
/// of the drain (`cancel`); either way both sides see it closed.
#[tokio::test(flavor = "current_thread")]
async fn a_bulk_connection_ends_when_idle_or_cancelled() {
    let _one_at_a_time = HANDING_OVER.lock().await;
    for cancelled in [false, true] {
        let handed_before = engine::handed_over();
        let mut ends = ends().await;
        let meters = Uncounted::new();
        let idle = if cancelled {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(200)
        };
        let cancel = tokio::sync::Notify::new();
        let relay = meters.relay_with(Splice::Auto, ends.middle(), idle, cancel.notified());
        let Ends { client, server, .. } = &mut ends;
        let exchange = async {
            assert!(through(client, server, 1 << 20).await);
            assert_eq!(engine::handed_over(), handed_before + 1, "not handed over");
            if cancelled {
                cancel.notify_one();
            }
            // Closed by the gateway: EOF (or a reset) on both sides.
            let mut buf = [0u8; 16];
            assert!(matches!(client.read(&mut buf).await, Ok(0) | Err(_)));
            assert!(matches!(server.read(&mut buf).await, Ok(0) | Err(_)));
        };
        let (result, ()) = tokio::join!(relay, exchange);
        let expected = if cancelled { "Cancelled" } else { "Idle" };
        assert_eq!(format!("{:?}", result.end), expected);
        assert_eq!(result.to_upstream, 1 << 20);
    }
}

/// CPU seconds the process's bulk threads have used (`/proc`, in clock ticks of 10 ms).
fn bulk_thread_cpu() -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("eastwest-bulk") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the name: utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks as f64 / 100.0
}

/// A client that half-closed and then reads slowly: the response waits in the gateway's pipe
/// while the upstream socket hangs up (the server's FIN is in, ours went out), which epoll
/// reports at every wait. The bulk thread waits for room without spinning on it (it did: 0.49
/// s of CPU in the 0.5 s pause), and the response arrives whole.
#[tokio::test(flavor = "current_thread")]
async fn a_bulk_thread_waits_for_a_slow_client_after_both_sides_shut() {
    let _one_at_a_time = HANDING_OVER.lock().await;
    // A client with a small receive buffer...
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (downstream, _) = listener.accept().await.unwrap();
    // And a small send buffer at the gateway, so the response waits in its pipe.
    socket2::SockRef::from(&downstream)
        .set_send_buffer_size(4096)
        .unwrap();
    let (upstream, mut server) = pair().await;
    let meters = Uncounted::new();
    let hour = Duration::from_secs(3600);
    let relay = meters.relay_with(
        Splice::Auto,
        (downstream, upstream),
        hour,
        std::future::pending(),
    );
    // Small enough to leave the server entirely, FIN included, while the client waits.
    let response: Vec<u8> = (0..48 << 10).map(|i: u32| (i % 253) as u8).collect();
    let exchange = async {
        assert!(through(&mut client, &mut server, 1 << 20).await, "upload");
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut [0u8; 16]).await.unwrap(), 0);
        // The whole response and its FIN leave the server.
        server.write_all(&response).await.unwrap();
        server.shutdown().await.unwrap();
        // The slow client: not reading for a while. (The pause is the scenario.)
        let cpu_before = bulk_thread_cpu();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spent = bulk_thread_cpu() - cpu_before;
        assert!(
            spent < 0.2,
            "the bulk thread spun: {spent:.2} s of CPU in 0.5 s"
        );
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == response, "the response differs");
    };
    let (result, ()) = tokio::join!(relay, exchange);
    assert!(matches!(result.end, CopyEnd::Closed), "{:?}", result.end);
    assert_eq!(result.to_downstream, 48 << 10);
}
