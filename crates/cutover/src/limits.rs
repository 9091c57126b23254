//! The daemon's share of the kernel's limits: open descriptors and listen backlogs.
//!
//! A daemon left with the soft `RLIMIT_NOFILE` it was started with (often 1024) was taken
//! down, proxy and API together, by one client holding 1,100 idle connections; and mio's
//! listen backlog dropped SYNs in bursts nginx and HAProxy absorb. So `up` raises the soft
//! limit to the hard one, the services' `max_connections` defaults are derived from what it
//! got (leaving `cutover_proxy::FD_RESERVE` for the API and the rest), and listeners it binds
//! queue up to [`BACKLOG`] connections.

use std::net::SocketAddr;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::net::{TcpListener, TcpSocket};

/// Connections a listener queues before the proxy accepts them: HAProxy's default; the kernel
/// caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 4096;

/// The descriptor limit as found and as left.
#[derive(Clone, Copy, Debug)]
pub struct Nofile {
    pub was: u64,
    pub now: u64,
    pub hard: Option<u64>,
}

/// Raises the soft descriptor limit to the hard one (a process may, unprivileged) and says
/// what it found and got. A hard limit of "unlimited" is not allowed for descriptors on
/// Linux; should one appear, the kernel's ceiling `fs.nr_open` is asked for instead.
pub fn raise_nofile() -> Nofile {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let was = current.unwrap_or(u64::MAX);
    let target = maximum.or_else(nr_open).unwrap_or(was);
    let now = if target > was
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum,
            },
        )
        .is_ok()
    {
        target
    } else {
        was
    };
    Nofile {
        was,
        now,
        hard: maximum,
    }
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `net.core.somaxconn`, the ceiling on every listen backlog, when it can be read.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A new listener on `addr` with a backlog of [`BACKLOG`]. `SO_REUSEADDR`, as std and mio
/// set it, so a daemon restarted right away can bind while old connections sit in TIME_WAIT.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What `up` does before it binds anything: raises the descriptor limit, logs it and the
/// connection limits that follow from it, and warns where the kernel or the config leaves
/// less room than they seem to. Returns the default `max_connections` of a service.
pub fn prepare(settings: &cutover_config::Settings) -> usize {
    let n = raise_nofile();
    let hard = n.hard.map_or("unlimited".to_owned(), |h| h.to_string());
    if n.now > n.was {
        tracing::info!(
            "descriptor limit raised from {} to {} (hard limit {hard})",
            n.was,
            n.now
        );
    } else {
        tracing::info!("descriptor limit {} (hard limit {hard})", n.now);
    }
    let services = settings.services.len();
    let default = cutover_proxy::default_max_connections(n.now, services);
    let limits: Vec<String> = settings
        .services
        .iter()
        .map(|s| {
            let max = s.max_connections.map_or(default, |m| m as usize);
            format!("{} {max}", s.name)
        })
        .collect();
    tracing::info!(
        "client connections kept open at most per service (max_connections): {}; {} descriptors reserved for the API, health checks and the rest",
        limits.join(", "),
        cutover_proxy::FD_RESERVE
    );
    // Set by hand beyond what the descriptors allow: the limit would not protect the API.
    let configured: u64 = settings
        .services
        .iter()
        .map(|s| s.max_connections.map_or(default as u64, u64::from))
        .sum();
    if configured * 2 + cutover_proxy::FD_RESERVE > n.now {
        tracing::warn!(
            "the services' max_connections add up to {configured}, but {} descriptors allow about {} (two per connection, {} kept for the API and the rest): a flood of connections could leave the API none; lower max_connections or raise the limit (ulimit -n, LimitNOFILE=)",
            n.now,
            n.now.saturating_sub(cutover_proxy::FD_RESERVE) / 2,
            cutover_proxy::FD_RESERVE
        );
    }
    if let Some(m) = somaxconn().filter(|m| *m < BACKLOG) {
        tracing::warn!(
            "net.core.somaxconn is {m}: listeners queue at most {m} connections, not {BACKLOG}, and drop what comes beyond in a burst; raise it with `sysctl -w net.core.somaxconn={BACKLOG}`"
        );
    }
    default
}
