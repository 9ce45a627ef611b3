//! Accepting connections on one listener: connection limit, running out of descriptors,
//! accept-error backoff, spawning.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use eastwest_routes::ListenerConfig;
use metrics::{Counter, Gauge, Histogram};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::{self as m, Outcome};
use crate::Shared;
use crate::{connect, connection, hbone};

/// Per-listener metric handles and the live connection count, made once per listener.
pub(crate) struct ListenerStats {
    pub name: Arc<str>,
    /// As configured: after a rename, the listener now configured here owns the socket.
    pub address: SocketAddr,
    /// Connections open, counted against `max_connections`. Shared with the listener this
    /// one replaced (same name, or same address under a new name), whose connections still
    /// count until they end.
    pub active: Arc<AtomicUsize>,
    opened: Counter,
    refused: Counter,
    accept_errors: Counter,
    active_gauge: Gauge,
    pub hello_duration: Histogram,
    pub connection_duration: Histogram,
    /// `closed_total{route=""}` per outcome: the connections that never got a route.
    unrouted: [Counter; Outcome::ALL.len()],
    /// `hbone` listeners: `eastwest_hbone_streams_opened_total`, made on the first connection.
    hbone_streams_opened: OnceLock<Counter>,
}

impl ListenerStats {
    fn new(name: &str, address: SocketAddr, active: Arc<AtomicUsize>) -> Self {
        let label = || ("listener", name.to_string());
        ListenerStats {
            name: name.into(),
            address,
            active,
            opened: metrics::counter!(m::CONNECTIONS_OPENED, &[label()]),
            refused: metrics::counter!(m::CONNECTIONS_REFUSED, &[label()]),
            accept_errors: metrics::counter!(m::ACCEPT_ERRORS, &[label()]),
            active_gauge: metrics::gauge!(m::CONNECTIONS_ACTIVE, &[label()]),
            hello_duration: metrics::histogram!(m::HELLO_DURATION, &[label()]),
            connection_duration: metrics::histogram!(m::CONNECTION_DURATION, &[label()]),
            unrouted: Outcome::ALL.map(|outcome| m::closed(name, "", outcome)),
            hbone_streams_opened: OnceLock::new(),
        }
    }

    /// `hbone`: the streams-opened counter; on first use the stream refusals without a route
    /// are registered at 0 too, so an alert's rate() sees their first increase.
    pub fn hbone_streams_opened(&self) -> &Counter {
        self.hbone_streams_opened.get_or_init(|| {
            for outcome in [Outcome::BadRequest, Outcome::UnknownRoute] {
                m::hbone_stream_closed(&self.name, "", outcome).increment(0);
            }
            m::hbone_streams_opened(&self.name)
        })
    }

    /// A connection turned away at once (over `max_connections`, or out of descriptors).
    fn overloaded(&self) {
        self.refused.increment(1);
        self.closed(Outcome::Overloaded, "").increment(1);
    }

    /// An admitted connection has ended: it no longer counts against `max_connections`.
    fn connection_ended(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.active_gauge.decrement(1.0);
    }

    /// The `eastwest_connections_closed_total` series for a finished connection.
    pub fn closed(&self, outcome: Outcome, route: &str) -> Counter {
        if route.is_empty() {
            self.unrouted[outcome as usize].clone()
        } else {
            m::closed(&self.name, route, outcome)
        }
    }
}

/// A bound listener whose accept loop runs until `stop` is cancelled.
pub(crate) struct RunningListener {
    /// As configured (port 0 means "any free port").
    pub address: SocketAddr,
    pub local_addr: SocketAddr,
    pub stop: CancellationToken,
    /// Shared so a reload that renames the listener hands the bound socket over.
    pub socket: Arc<TcpListener>,
    /// The open-connection count, handed to the listener that replaces this one.
    pub active: Arc<AtomicUsize>,
}

/// Binds a listener and [`tune`]s it.
pub(crate) fn bind(listener: &ListenerConfig, keepalive: Duration) -> io::Result<TcpListener> {
    let address = listener.address;
    let bind = || -> io::Result<TcpListener> {
        let socket = Socket::new(
            Domain::for_address(address),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        // A restarted proxy can bind at once while old connections linger in TIME_WAIT.
        socket.set_reuse_address(true)?;
        tune(SockRef::from(&socket), listener, keepalive)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        socket.listen(4096)?;
        TcpListener::from_std(socket.into())
    };
    bind().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("listener {}: cannot bind {address}: {e}", listener.name),
        )
    })
}

/// Sets what accepted sockets start out with. Linux copies TCP_NODELAY and the keepalive
/// settings from the listening socket, saving four syscalls per connection; deferred accept
/// saves a wakeup and a failed read. Also applied to running listeners on reload.
pub(crate) fn tune(
    socket: SockRef<'_>,
    listener: &ListenerConfig,
    keepalive: Duration,
) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&connect::keepalive(keepalive))?;
    set_defer_accept(&socket, listener.defer_accept)
}

/// `TCP_DEFER_ACCEPT` of one second: the kernel hands over a silent connection after its first
/// SYN-ACK retransmission (about 1 s), so `hello_timeout` still applies to silent clients.
#[cfg(target_os = "linux")]
fn set_defer_accept(socket: &SockRef<'_>, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = on.into();
    // SAFETY: a live socket descriptor, and a c_int option value of the size passed, as
    // setsockopt(2) requires for TCP_DEFER_ACCEPT. socket2 has no setter for this option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_defer_accept(_: &SockRef<'_>, _: bool) -> io::Result<()> {
    Ok(())
}

pub(crate) fn start(
    shared: &Arc<Shared>,
    name: &str,
    address: SocketAddr,
    listener: Arc<TcpListener>,
    active: Arc<AtomicUsize>,
) -> io::Result<RunningListener> {
    let local_addr = listener.local_addr()?;
    let stop = shared.stop_accepting.child_token();
    let stats = Arc::new(ListenerStats::new(name, address, active.clone()));
    let running = RunningListener {
        address,
        local_addr,
        stop: stop.clone(),
        socket: listener.clone(),
        active,
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        tracing::info!(listener = %stats.name, address = %local_addr, "listening");
        let mut reserve = FdReserve::new();
        let mut backoff = Duration::ZERO;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let err = match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::ZERO;
                    admit(&shared, &stats, stream, peer);
                    continue;
                }
                Err(err) => err,
            };
            stats.accept_errors.increment(1);
            if out_of_descriptors(&err) {
                // The waiting clients would hang in the accept queue until they time out:
                // take each with the reserved descriptor and close it, which they see as EOF.
                reserve.refill();
                let shed = reserve.shed(&listener, SHED_PER_ROUND, || {
                    stats.opened.increment(1);
                    stats.overloaded();
                });
                if shed > 0 {
                    tracing::warn!(listener = %stats.name, shed, "out of file descriptors: closed waiting connections");
                    backoff = Duration::ZERO;
                    continue;
                }
            }
            // Nothing could be done (no reserve, or another error): accepting again at once
            // would spin. Back off as pingora does, doubling up to 1 s.
            backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
            tracing::warn!(listener = %stats.name, error = %err, ?backoff, "accept failed");
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        tracing::info!(listener = %stats.name, "stopped accepting");
    });
    Ok(running)
}

/// Connections closed per out-of-descriptors round before the loop yields to the runtime.
const SHED_PER_ROUND: usize = 1024;

/// EMFILE and its kin: the process (or system) is out of something accept needs.
pub(crate) fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One descriptor held open (on /dev/null) so that, out of descriptors, a waiting
/// connection can still be accepted — to be closed at once, or served — instead of staying
/// in the accept queue. One per accept loop: no lock between them.
pub(crate) struct FdReserve(Option<std::fs::File>);

impl FdReserve {
    pub fn new() -> Self {
        FdReserve(std::fs::File::open("/dev/null").ok())
    }

    /// Takes the reserved descriptor again if it was spent (fails quietly while none is free).
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }

    /// Frees the reserved descriptor and accepts one waiting connection into it. The reserve
    /// stays empty until [`refill`](Self::refill) finds a free descriptor.
    pub fn release_and_accept(&mut self, listener: &TcpListener) -> Option<TcpStream> {
        self.0.take()?;
        let (socket, _) = SockRef::from(listener).accept().ok()?;
        socket.set_nonblocking(true).ok()?;
        TcpStream::from_std(socket.into()).ok()
    }

    /// Accepts and closes up to `max` waiting connections, one at a time through the reserved
    /// descriptor, calling `closed` for each as it goes; how many were closed.
    pub fn shed(
        &mut self,
        listener: &TcpListener,
        max: usize,
        mut closed_one: impl FnMut(),
    ) -> usize {
        let mut closed = 0;
        while closed < max && self.0.take().is_some() {
            // Closed at once (the client reads EOF), before the reserve is taken again with
            // the descriptor that frees.
            let accepted = SockRef::from(listener).accept().map(drop);
            self.refill();
            match accepted {
                Ok(()) => {
                    closed += 1;
                    closed_one();
                }
                Err(_) => break,
            }
        }
        closed
    }
}

fn admit(shared: &Arc<Shared>, stats: &Arc<ListenerStats>, stream: TcpStream, peer: SocketAddr) {
    stats.opened.increment(1);
    // One snapshot per connection: its limit here, its routes and settings in `serve`.
    let routing = shared.routing.load_full();
    let Some(listener) = connection::listener_index(&routing, stats) else {
        // Removed by a reload between accept and now: nothing routes here any more. Counted
        // as closed too, so opened - closed still adds up to the connections open.
        stats.closed(Outcome::UnknownRoute, "").increment(1);
        return;
    };
    let limit = routing.config.listeners[listener]
        .max_connections
        .unwrap_or(shared.default_max_connections);
    let active = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
    if active > limit {
        stats.active.fetch_sub(1, Ordering::Relaxed);
        stats.overloaded();
        tracing::debug!(listener = %stats.name, %peer, limit, "refused: listener at max_connections");
        // Dropping the stream closes it at once: a clean refusal the client sees as EOF.
        drop(stream);
        return;
    }
    stats.active_gauge.increment(1.0);
    let stats = stats.clone();
    let shared2 = shared.clone();
    // One task type per mode: a task is as large as its future, and an hbone connection's
    // (TLS, HTTP/2) is about three times a passthrough one's, which would otherwise be what
    // every passthrough connection allocates, moves at spawn and holds while idle.
    if routing.config.listeners[listener].mode == eastwest_routes::ListenerMode::Hbone {
        shared.connections.spawn(async move {
            hbone::server::serve(shared2, stats.clone(), routing, listener, stream, peer).await;
            stats.connection_ended();
        });
    } else {
        shared.connections.spawn(async move {
            connection::serve(shared2, stats.clone(), routing, listener, stream, peer).await;
            stats.connection_ended();
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use eastwest_routes::{ListenerConfig, ListenerMode};
    use socket2::SockRef;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    fn config(defer_accept: bool) -> ListenerConfig {
        let mut l = ListenerConfig::new(
            "t",
            "127.0.0.1:0".parse().unwrap(),
            ListenerMode::AutoPassthrough,
        );
        l.defer_accept = defer_accept;
        l
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let keepalive = Duration::from_secs(42);
        let listener = super::bind(&config(true), keepalive).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(b"\x16").await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        let sock = SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), keepalive);
    }

    /// With deferred accept a client that has sent its first bytes is accepted before an
    /// earlier one that is still silent; the silent one is still accepted a little later.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn deferred_accept_hands_over_clients_that_have_spoken_first() {
        for defer in [true, false] {
            let listener = super::bind(&config(defer), Duration::from_secs(60)).unwrap();
            let addr = listener.local_addr().unwrap();
            let silent = TcpStream::connect(addr).await.unwrap();
            let mut speaking = TcpStream::connect(addr).await.unwrap();
            speaking.write_all(b"\x16").await.unwrap();
            let order = if defer {
                [&speaking, &silent]
            } else {
                [&silent, &speaking]
            };
            for expected in order {
                let (_, peer) = listener.accept().await.unwrap();
                let expected = expected.local_addr().unwrap();
                assert_eq!(peer, expected, "defer_accept: {defer}");
            }
        }
    }
}
