//! The open-file limit: raised to the hard limit at startup, and the default
//! `max_connections` derived from it.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept out of `max_connections`' default: every admin server at its
/// connection bound, plus the listening sockets, the config watcher, the control stream, the
/// route cache, DNS lookups and the runtime's own (epoll, eventfd, stdio).
pub const RESERVED: u64 = crate::admin::MAX_ADMIN_CONNECTIONS as u64 + 64;

/// The soft and hard limits before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

/// `None` in an rlimit means unlimited.
fn value(limit: Option<u64>) -> u64 {
    limit.unwrap_or(u64::MAX)
}

/// The soft limit in force.
pub fn current() -> u64 {
    value(getrlimit(Resource::Nofile).current)
}

/// Raises the soft open-file limit to the hard one. Many shells and some container runtimes
/// hand processes a soft limit of 1024, a few hundred connections; the hard limit is what
/// the administrator actually allows.
pub fn raise() -> std::io::Result<FdLimit> {
    let limit = getrlimit(Resource::Nofile);
    let before = value(limit.current);
    let hard = value(limit.maximum);
    if before < hard {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    Ok(FdLimit {
        before,
        now: current(),
        hard,
    })
}

/// `max_connections` when a listener does not set it: a relayed connection holds two
/// descriptors (client and upstream), and [`RESERVED`] stay free for everything else.
pub fn default_max_connections(soft_limit: u64) -> usize {
    let per_connection = 2;
    let usable = soft_limit.saturating_sub(RESERVED) / per_connection;
    usize::try_from(usable).unwrap_or(usize::MAX).max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_descriptors_per_connection_after_the_reserve() {
        let reserved = super::RESERVED;
        assert_eq!(super::default_max_connections(reserved + 2000), 1000);
        // A limit below the reserve still admits a connection, rather than none.
        assert_eq!(super::default_max_connections(10), 1);
        assert!(super::default_max_connections(u64::MAX) > 1 << 40);
    }
}
