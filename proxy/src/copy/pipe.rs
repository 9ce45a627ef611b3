//! Pipes for `splice(2)`: socket → pipe → socket moves a bulk direction's bytes as page
//! references inside the kernel, without copying them into the proxy and out again.
//!
//! A pipe is lent to a direction only while bytes move, like the copy buffers: once the socket
//! is drained and the pipe is empty it goes back to a per-thread pool. A pipe that still holds
//! bytes (its connection failed or was cancelled mid-way) is closed, never pooled, so no
//! connection can receive another's bytes.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};

/// Capacity asked for: 4 round trips of a 64 KiB TCP window per wake-up. The kernel may refuse
/// (an unprivileged process beyond `/proc/sys/fs/pipe-max-size`); then the pipe keeps its 64 KiB.
const PIPE_SIZE: usize = 256 * 1024;
/// Idle pipes kept per thread (two fds each); more are closed when given back.
const POOL_MAX: usize = 64;

/// Non-blocking on the pipe side (the sockets are non-blocking already); MOVE is a hint to
/// move pages rather than copy them.
const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
    /// Bytes spliced in and not yet out.
    held: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one (which fails at the fd limit).
    pub(super) fn take() -> io::Result<Pipe> {
        if let Some(pipe) = POOL.with(|p| p.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let size = match fcntl_setpipe_size(&write, PIPE_SIZE) {
            Ok(size) => size,
            Err(_) => rustix::pipe::fcntl_getpipe_size(&write)?,
        };
        Ok(Pipe {
            read,
            write,
            size,
            held: 0,
        })
    }

    /// Back to the pool if empty; a pipe still holding bytes is closed.
    pub(super) fn give(self) {
        if self.held != 0 {
            return;
        }
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }

    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// Splices what `from` has (up to the pipe's room) into the pipe; 0 at EOF.
    pub(super) fn fill(&mut self, from: impl AsFd) -> io::Result<usize> {
        let n = splice(from, None, &self.write, None, self.size - self.held, FLAGS)?;
        self.held += n;
        Ok(n)
    }

    /// Splices what the pipe holds into `to`, as much as it takes now.
    pub(super) fn drain(&mut self, to: impl AsFd) -> io::Result<usize> {
        let n = splice(&self.read, None, to, None, self.held, FLAGS)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.held -= n;
        Ok(n)
    }
}

#[cfg(test)]
pub(super) fn pooled() -> usize {
    POOL.with(|p| p.borrow().len())
}
