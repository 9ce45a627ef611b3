//! The floor of a user-space TCP relay, for `bench/compare`: what relaying costs a process when
//! nothing but the kernel's work is left. Not a gateway: a reference point for what any gateway
//! on this box can reach, so a benchmark can say how far eastwest-proxy is from it.
//!
//! One thread and a level-triggered epoll. Each direction moves socket → pipe → socket with
//! `splice(2)`, one fill per readiness event (level-triggered epoll reports again if more is
//! waiting, so there is no read that finds the socket empty). No ClientHello, routing, metrics,
//! timeouts or drain: every connection goes to BACKEND, and a half-close is passed on.
//!
//!   splice_floor LISTEN BACKEND        # e.g. splice_floor 127.0.0.1:18406 127.0.0.1:18401

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use socket2::{Domain, SockRef, Socket, Type};

const PIPE_SIZE: usize = 256 * 1024;
const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);
/// epoll data of the listening socket; a connection side is `index * 2 + side`.
const LISTENER: u64 = u64::MAX;

/// One direction: bytes from `sides[from]` to the other side, through a pipe while they move.
#[derive(Default)]
struct Way {
    pipe: Option<(OwnedFd, OwnedFd)>,
    held: usize,
    /// The source sent FIN.
    eof: bool,
    /// The FIN was passed on.
    shut: bool,
}

struct Conn {
    sides: [TcpStream; 2],
    /// `ways[s]` reads from `sides[s]`.
    ways: [Way; 2],
    /// What epoll watches on each side now: changed only when it must (a syscall each).
    interest: [EventFlags; 2],
}

struct Floor {
    epoll: OwnedFd,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Closed during this batch of events: reused only after it, so a later event of the same
    /// batch for the old connection cannot reach a new one.
    retired: Vec<usize>,
    pipes: Vec<(OwnedFd, OwnedFd)>,
    backend: SocketAddr,
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(backend)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: splice_floor LISTEN BACKEND");
        std::process::exit(2);
    };
    let parse = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{s}: {e}")))
    };
    let (listen, backend) = (parse(listen)?, parse(backend)?);
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit it, as eastwest's do.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&listen.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    let listener: TcpListener = socket.into();

    let mut floor = Floor {
        epoll: epoll::create(CreateFlags::CLOEXEC)?,
        conns: Vec::new(),
        free: Vec::new(),
        retired: Vec::new(),
        pipes: Vec::new(),
        backend,
    };
    epoll::add(
        &floor.epoll,
        &listener,
        EventData::new_u64(LISTENER),
        EventFlags::IN,
    )?;
    let mut events: Vec<Event> = Vec::with_capacity(256);
    loop {
        events.clear();
        match epoll::wait(
            &floor.epoll,
            rustix::buffer::spare_capacity(&mut events),
            None,
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        for event in &events {
            let data = event.data.u64();
            if data == LISTENER {
                floor.accept_all(&listener);
            } else {
                floor.ready(data as usize / 2, data as usize % 2, event.flags);
            }
        }
        let retired = std::mem::take(&mut floor.retired);
        floor.free.extend(retired);
    }
}

impl Floor {
    fn accept_all(&mut self, listener: &TcpListener) {
        loop {
            match listener.accept() {
                Ok((client, _)) => {
                    if let Err(err) = self.open(client) {
                        eprintln!("splice_floor: {err}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    eprintln!("splice_floor: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Connects to the backend without waiting: bytes spliced towards it before the handshake
    /// ends wait in the pipe until it is writable.
    fn open(&mut self, client: TcpStream) -> io::Result<()> {
        client.set_nonblocking(true)?;
        let socket = Socket::new(Domain::for_address(self.backend), Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&self.backend.into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
            _ => {}
        }
        let conn = Conn {
            sides: [client, socket.into()],
            ways: Default::default(),
            interest: [EventFlags::IN; 2],
        };
        let index = self.free.pop().unwrap_or(self.conns.len());
        for (side, stream) in conn.sides.iter().enumerate() {
            let data = EventData::new_u64((index * 2 + side) as u64);
            epoll::add(&self.epoll, stream, data, EventFlags::IN)?;
        }
        if index == self.conns.len() {
            self.conns.push(Some(conn));
        } else {
            self.conns[index] = Some(conn);
        }
        Ok(())
    }

    /// `sides[side]` of connection `index` is readable and/or writable.
    fn ready(&mut self, index: usize, side: usize, flags: EventFlags) {
        let Some(mut conn) = self.conns.get_mut(index).and_then(Option::take) else {
            return;
        };
        let result = (|| {
            if flags.contains(EventFlags::ERR) {
                // A reset: level-triggered, it would be reported again and again.
                return Err(io::Error::from(io::ErrorKind::ConnectionReset));
            }
            if flags.intersects(EventFlags::IN | EventFlags::HUP) {
                self.fill(&mut conn, side)?;
            }
            // Whatever woke us, push both ways on: a fill above, or room to write.
            for way in 0..2 {
                self.drain(&mut conn, way)?;
            }
            self.update_interest(&mut conn, index)
        })();
        match result {
            Ok(()) if conn.ways.iter().all(|w| w.shut) => self.close(conn, index),
            Ok(()) => self.conns[index] = Some(conn),
            Err(_) => self.close(conn, index),
        }
    }

    /// One splice from `sides[side]` into its way's pipe, when the pipe is empty.
    fn fill(&mut self, conn: &mut Conn, side: usize) -> io::Result<()> {
        let way = &mut conn.ways[side];
        if way.eof || way.held > 0 {
            return Ok(());
        }
        let pipe = match way.pipe.take() {
            Some(pipe) => pipe,
            None => self.take_pipe()?,
        };
        let result = splice(&conn.sides[side], None, &pipe.1, None, PIPE_SIZE, FLAGS);
        way.pipe = Some(pipe);
        match result {
            Ok(0) => way.eof = true,
            Ok(n) => way.held = n,
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Empties `ways[way]`'s pipe into the other side as far as it takes, and passes EOF on.
    fn drain(&mut self, conn: &mut Conn, way: usize) -> io::Result<()> {
        let to = &conn.sides[1 - way];
        let w = &mut conn.ways[way];
        while w.held > 0 {
            let Some((read, _)) = &w.pipe else { break };
            match splice(read, None, to, None, w.held, FLAGS) {
                Ok(n) => w.held -= n,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(pipe) = w.pipe.take() {
            // Empty: back to the pool until this way reads again.
            self.pipes.push(pipe);
        }
        if w.eof && !w.shut {
            w.shut = true;
            match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Read a side while its way is open and its pipe empty; write it while the other way
    /// holds bytes for it.
    fn update_interest(&self, conn: &mut Conn, index: usize) -> io::Result<()> {
        for side in 0..2 {
            let mut flags = EventFlags::empty();
            if !conn.ways[side].eof && conn.ways[side].held == 0 {
                flags |= EventFlags::IN;
            }
            if conn.ways[1 - side].held > 0 {
                flags |= EventFlags::OUT;
            }
            if flags != conn.interest[side] {
                let data = EventData::new_u64((index * 2 + side) as u64);
                epoll::modify(&self.epoll, conn.sides[side].as_fd(), data, flags)?;
                conn.interest[side] = flags;
            }
        }
        Ok(())
    }

    fn take_pipe(&mut self) -> io::Result<(OwnedFd, OwnedFd)> {
        if let Some(pipe) = self.pipes.pop() {
            return Ok(pipe);
        }
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Refused beyond /proc/sys/fs/pipe-max-size: the pipe keeps its 64 KiB.
        let _ = fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok((read, write))
    }

    /// Closing the sockets takes them out of the epoll set.
    fn close(&mut self, conn: Conn, index: usize) {
        drop(conn);
        self.retired.push(index);
    }
}
