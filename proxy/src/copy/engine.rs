//! Bulk connections relayed outside the async runtime.
//!
//! Once a connection carries bulk (see [`super`]), both of its sockets leave tokio for an engine
//! thread: a level-triggered epoll loop that splices each direction socket → pipe → socket. Per
//! wake-up it does what the kernel needs — `epoll_wait`, a fill, a drain — where the runtime
//! spent about as much again waking the task, polling its futures and parking (measured with
//! bench/compare's `floor` target, docs/benchmarks.md run L). Bytes still move the moment they
//! arrive: nothing waits to batch, and level-triggered epoll reports a socket again while it
//! holds more, so no read is spent finding it empty.
//!
//! The connection's task keeps waiting for the verdict (both sides closed, idle, an error) and
//! asks for a cancel at the end of the drain; its metrics and access log are written as before.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use metrics::Counter;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags};
use socket2::SockRef;
use tokio::sync::oneshot;

use super::pipe::Pipe;
use super::CopyEnd;

/// A connection handed over: its sockets, where its bytes are counted, and how far it got.
pub(super) struct Handed {
    /// `[downstream, upstream]`; way 0 moves downstream → upstream, way 1 the reverse.
    pub sides: [TcpStream; 2],
    /// Ways whose EOF was already passed on before the handoff.
    pub ended: [bool; 2],
    pub counters: [Counter; 2],
    pub idle: Duration,
}

/// How a handed-over connection ended, and the bytes the engine moved each way.
pub(super) struct Verdict {
    pub moved: [u64; 2],
    pub end: CopyEnd,
}

/// A handed-over connection, as its task sees it.
pub(super) struct Ticket {
    id: u64,
    engine: &'static Engine,
    pub verdict: oneshot::Receiver<Verdict>,
}

impl Ticket {
    /// Ends the connection now (the drain is over); the verdict follows.
    pub fn cancel(&self) {
        self.engine.send(Command::Cancel(self.id));
    }
}

/// The engine threads (one per runtime worker), started on the first handoff; `None` if they
/// could not be.
pub(super) fn engines() -> Option<&'static [Engine]> {
    static ENGINES: OnceLock<Option<Vec<Engine>>> = OnceLock::new();
    ENGINES
        .get_or_init(|| {
            // As many as the runtime has workers (`--worker-threads`, by default the CPUs this
            // process may use): the operator's choice of how many cores relay.
            let n = tokio::runtime::Handle::try_current()
                .map_or(1, |rt| rt.metrics().num_workers())
                .max(1);
            match (0..n).map(Engine::start).collect::<io::Result<Vec<_>>>() {
                Ok(engines) => Some(engines),
                Err(err) => {
                    tracing::warn!(%err, "cannot start the bulk relay threads; bulk stays in the runtime");
                    None
                }
            }
        })
        .as_deref()
}

/// Connections handed over so far (their ids).
static NEXT: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
pub(super) fn handed_over() -> u64 {
    NEXT.load(Ordering::Relaxed)
}

/// Hands a connection to an engine thread.
pub(super) fn hand_over(engines: &'static [Engine], handed: Handed) -> Ticket {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let engine = &engines[id as usize % engines.len()];
    let (tx, verdict) = oneshot::channel();
    engine.send(Command::Add(id, Box::new(handed), tx));
    Ticket {
        id,
        engine,
        verdict,
    }
}

enum Command {
    Add(u64, Box<Handed>, oneshot::Sender<Verdict>),
    Cancel(u64),
}

pub(super) struct Engine {
    commands: mpsc::Sender<Command>,
    /// Written after each command: wakes the thread from `epoll_wait`.
    wake: OwnedFd,
}

impl Engine {
    fn start(index: usize) -> io::Result<Engine> {
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &wake, EventData::new_u64(WAKE), EventFlags::IN)?;
        let (commands, rx) = mpsc::channel();
        let thread_wake = wake.try_clone()?;
        std::thread::Builder::new()
            .name(format!("eastwest-bulk-{index}"))
            .spawn(move || Loop::new(epoll, thread_wake, rx).run())?;
        Ok(Engine { commands, wake })
    }

    fn send(&self, command: Command) {
        // Fails only once the thread is gone; then the ticket's verdict reports it (dropped).
        if self.commands.send(command).is_ok() {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }
}

/// epoll data of the wake-up eventfd; a connection side is `slot * 2 + side`.
const WAKE: u64 = u64::MAX;
/// How often idle connections are looked for.
const TICK: Duration = Duration::from_secs(1);

struct Way {
    /// Lent while bytes move, as on the runtime's splice path.
    pipe: Option<Pipe>,
    /// EOF read from the source.
    eof: bool,
    /// EOF passed on (or it was before the handoff).
    shut: bool,
    /// No pipe could be had (out of descriptors): not read until the next tick.
    starved: bool,
    moved: u64,
}

struct Conn {
    id: u64,
    sides: [TcpStream; 2],
    ways: [Way; 2],
    counters: [Counter; 2],
    /// What epoll watches on each side now: changed only when it must (a syscall each).
    interest: [EventFlags; 2],
    /// Per side: hung up (both ways shut), and so taken out of the epoll set.
    hung_up: [bool; 2],
    registered: [bool; 2],
    idle: Duration,
    last: Instant,
    verdict: oneshot::Sender<Verdict>,
}

struct Loop {
    epoll: OwnedFd,
    wake: OwnedFd,
    commands: mpsc::Receiver<Command>,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Closed during this batch of events: reused only after it, so a later event of the same
    /// batch for the old connection cannot reach a new one.
    retired: Vec<usize>,
    by_id: HashMap<u64, usize>,
    /// Some way could not get a pipe (out of descriptors): it reads again at the next tick.
    starved: bool,
    /// How often idle connections are looked for: [`TICK`], or less for shorter idle timeouts.
    tick: Duration,
}

impl Loop {
    fn new(epoll: OwnedFd, wake: OwnedFd, commands: mpsc::Receiver<Command>) -> Self {
        Loop {
            epoll,
            wake,
            commands,
            slots: Vec::new(),
            free: Vec::new(),
            retired: Vec::new(),
            by_id: HashMap::new(),
            starved: false,
            tick: TICK,
        }
    }

    fn run(mut self) {
        let mut events: Vec<Event> = Vec::with_capacity(256);
        let mut next_tick = Instant::now() + self.tick;
        loop {
            events.clear();
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let timeout = rustix::event::Timespec {
                tv_sec: timeout.as_secs() as i64,
                tv_nsec: i64::from(timeout.subsec_nanos()),
            };
            let spare = rustix::buffer::spare_capacity(&mut events);
            match epoll::wait(&self.epoll, spare, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(err) => {
                    // Nothing to do but end every connection (their tasks see the errors).
                    tracing::error!(%err, "bulk relay thread: epoll_wait failed");
                    return;
                }
            }
            // One clock read per batch: when these bytes moved, to a wake-up's precision.
            let now = Instant::now();
            for event in &events {
                let data = event.data.u64();
                if data == WAKE {
                    if !self.commands() {
                        return;
                    }
                } else {
                    self.ready(data as usize / 2, data as usize % 2, event.flags, now);
                }
            }
            self.free.append(&mut self.retired);
            if now >= next_tick {
                self.tick(now);
                next_tick = now + self.tick;
            }
            // A connection with a shorter idle timeout than the tick was just added.
            next_tick = next_tick.min(now + self.tick);
        }
    }

    /// Takes the queued commands; `false` once every sender is gone (the process is ending).
    fn commands(&mut self) -> bool {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.wake, &mut count);
        loop {
            match self.commands.try_recv() {
                Ok(Command::Add(id, handed, verdict)) => self.add(id, *handed, verdict),
                Ok(Command::Cancel(id)) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        self.end(slot, CopyEnd::Cancelled);
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn add(&mut self, id: u64, handed: Handed, verdict: oneshot::Sender<Verdict>) {
        let Handed {
            sides,
            ended,
            counters,
            idle,
        } = handed;
        let way = |ended: bool| Way {
            pipe: None,
            eof: ended,
            shut: ended,
            starved: false,
            moved: 0,
        };
        let mut conn = Conn {
            id,
            sides,
            ways: [way(ended[0]), way(ended[1])],
            counters,
            interest: [EventFlags::empty(); 2],
            hung_up: [false; 2],
            registered: [false; 2],
            idle,
            last: Instant::now(),
            verdict,
        };
        // Idle is checked at ticks: a quarter of the shortest timeout apart at most.
        self.tick = self.tick.min(idle / 4).max(Duration::from_millis(10));
        let slot = self.free.pop().unwrap_or(self.slots.len());
        for side in 0..2 {
            let flags = conn.wanted(side);
            let data = EventData::new_u64((slot * 2 + side) as u64);
            if let Err(err) = epoll::add(&self.epoll, &conn.sides[side], data, flags) {
                let _ = conn.verdict.send(Verdict {
                    moved: [0, 0],
                    end: CopyEnd::Error(err.into()),
                });
                return;
            }
            conn.interest[side] = flags;
            conn.registered[side] = true;
        }
        if slot == self.slots.len() {
            self.slots.push(Some(conn));
        } else {
            self.slots[slot] = Some(conn);
        }
        self.by_id.insert(id, slot);
        // Bytes may have arrived between the runtime's last read and the registration: level-
        // triggered epoll reports them at once, so nothing is left waiting.
    }

    /// `sides[side]` of the connection in `slot` is readable and/or writable (or failed).
    fn ready(&mut self, slot: usize, side: usize, flags: EventFlags, now: Instant) {
        let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let result = conn.advance(side, flags, now, &mut self.starved);
        let result = result.and_then(|()| conn.update_interest(&self.epoll, slot));
        match result {
            Ok(()) if conn.ways.iter().all(|w| w.shut) => self.end(slot, CopyEnd::Closed),
            Ok(()) => {}
            Err(err) => self.end(slot, CopyEnd::Error(err)),
        }
    }

    /// Once per tick: idle connections end, and starved ways try for a pipe again.
    fn tick(&mut self, now: Instant) {
        let starved = std::mem::take(&mut self.starved);
        for slot in 0..self.slots.len() {
            let Some(conn) = self.slots[slot].as_mut() else {
                continue;
            };
            if now.saturating_duration_since(conn.last) >= conn.idle {
                self.end(slot, CopyEnd::Idle);
                continue;
            }
            if starved {
                for way in &mut conn.ways {
                    way.starved = false;
                }
                let mut still_starved = false;
                let result = conn
                    .push(now, &mut still_starved)
                    .and_then(|()| conn.update_interest(&self.epoll, slot));
                self.starved |= still_starved;
                match result {
                    Ok(()) if conn.ways.iter().all(|w| w.shut) => self.end(slot, CopyEnd::Closed),
                    Ok(()) => {}
                    Err(err) => self.end(slot, CopyEnd::Error(err)),
                }
            }
        }
        self.free.append(&mut self.retired);
    }

    /// Closes the connection's sockets (which takes them out of the epoll set) and reports.
    fn end(&mut self, slot: usize, end: CopyEnd) {
        let Some(conn) = self.slots[slot].take() else {
            return;
        };
        self.by_id.remove(&conn.id);
        self.retired.push(slot);
        let moved = [conn.ways[0].moved, conn.ways[1].moved];
        for way in conn.ways {
            if let Some(pipe) = way.pipe {
                // Closed if it still holds bytes (never pooled dirty).
                pipe.give();
            }
        }
        let _ = conn.verdict.send(Verdict { moved, end });
    }
}

impl Conn {
    /// Moves what can move after an event on `sides[side]`.
    fn advance(
        &mut self,
        side: usize,
        flags: EventFlags,
        now: Instant,
        starved: &mut bool,
    ) -> io::Result<()> {
        if flags.contains(EventFlags::ERR) {
            // A reset: level-triggered, it would be reported again and again. Its error says which.
            let err = SockRef::from(&self.sides[side]).take_error()?;
            return Err(err.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
        }
        if flags.contains(EventFlags::HUP) {
            // Both ways of this socket are shut (its FIN is in, ours went out). epoll reports
            // that at every wait, whatever it is asked for: `update_interest` takes the socket
            // out, and `push` reads what it still holds whenever its pipe is empty.
            self.hung_up[side] = true;
        }
        if flags.contains(EventFlags::IN) {
            self.fill(side, starved)?;
        }
        self.push(now, starved)
    }

    /// Drains both ways as far as their destinations take, passing EOFs on; a way whose source
    /// hung up is filled again each time its pipe empties (its reads never block: bytes or EOF).
    fn push(&mut self, now: Instant, starved: &mut bool) -> io::Result<()> {
        for way in 0..2 {
            loop {
                if self.drain(way)? {
                    self.last = now;
                }
                let w = &self.ways[way];
                let empty = w.pipe.as_ref().is_none_or(|p| p.held() == 0);
                let refill = self.hung_up[way] && !w.eof && !w.starved && empty;
                if !refill {
                    break;
                }
                self.fill(way, starved)?;
                let w = &self.ways[way];
                if !w.eof && w.pipe.as_ref().is_none_or(|p| p.held() == 0) {
                    // Nothing came (or no pipe): don't spin.
                    break;
                }
            }
        }
        Ok(())
    }

    /// One splice from `sides[side]` into its way's pipe, while the pipe is empty.
    fn fill(&mut self, side: usize, starved: &mut bool) -> io::Result<()> {
        let way = &mut self.ways[side];
        if way.eof || way.pipe.as_ref().is_some_and(|p| p.held() > 0) {
            return Ok(());
        }
        let pipe = match way.pipe.take() {
            Some(pipe) => pipe,
            None => match Pipe::take() {
                Ok(pipe) => pipe,
                Err(err) => {
                    tracing::debug!(%err, "bulk relay: no pipe; reading again at the next tick");
                    way.starved = true;
                    *starved = true;
                    return Ok(());
                }
            },
        };
        let pipe = way.pipe.insert(pipe);
        match pipe.fill(&self.sides[side]) {
            Ok(0) => way.eof = true,
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
        Ok(())
    }

    /// Empties `ways[way]`'s pipe into the other side as far as it takes, and passes EOF on.
    /// `true` if bytes moved.
    fn drain(&mut self, way: usize) -> io::Result<bool> {
        let to = &self.sides[1 - way];
        let w = &mut self.ways[way];
        let mut moved = false;
        if let Some(pipe) = &mut w.pipe {
            while pipe.held() > 0 {
                match pipe.drain(to) {
                    Ok(n) => {
                        moved = true;
                        w.moved += n as u64;
                        self.counters[way].increment(n as u64);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
                    Err(err) => return Err(err),
                }
            }
        }
        if let Some(pipe) = w.pipe.take() {
            // Empty: back to the pool until this way reads again.
            pipe.give();
        }
        if w.eof && !w.shut {
            w.shut = true;
            match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                _ => {}
            }
        }
        Ok(moved)
    }

    /// Read a side while its way is open and its pipe empty; write it while the other way
    /// holds bytes for it.
    fn wanted(&self, side: usize) -> EventFlags {
        let mut flags = EventFlags::empty();
        let reading = &self.ways[side];
        if !reading.eof && !reading.starved && reading.pipe.as_ref().is_none_or(|p| p.held() == 0) {
            flags |= EventFlags::IN;
        }
        if self.ways[1 - side]
            .pipe
            .as_ref()
            .is_some_and(|p| p.held() > 0)
        {
            flags |= EventFlags::OUT;
        }
        flags
    }

    fn update_interest(&mut self, epoll: &OwnedFd, slot: usize) -> io::Result<()> {
        for side in 0..2 {
            if self.hung_up[side] {
                if self.registered[side] {
                    epoll::delete(epoll, self.sides[side].as_fd())?;
                    self.registered[side] = false;
                }
                continue;
            }
            let flags = self.wanted(side);
            if flags != self.interest[side] {
                let data = EventData::new_u64((slot * 2 + side) as u64);
                epoll::modify(epoll, self.sides[side].as_fd(), data, flags)?;
                self.interest[side] = flags;
            }
        }
        Ok(())
    }
}
