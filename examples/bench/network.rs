//! The network between servers (`--link-delay D`): every byte that
//! crosses from one server to another goes through a relay that holds it
//! for D, in both directions, whatever the system: sidecar to sidecar,
//! node to node, a client to the Redis or NATS server (a host of its own).
//! What stays on one server (an application and its sidecar) is direct.
//!
//! The relay runs in the driver's process, outside every system's CPU
//! count: it stands for the wire. Each direction of each connection is a
//! thread that stamps what arrives and writes it once D has passed since
//! (waiting with a nanosecond timeout and a timer slack of 1 µs). Network namespaces would carry the bytes through the
//! kernel, but without netem (not in every kernel) they cannot delay
//! them; this relay can, and its own cost is measured by running it with
//! D = 0 against no relay at all.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;

use crate::clock;

/// Bytes read at once from a connection.
const CHUNK: usize = 64 * 1024;

/// A relay listening on one loopback port, forwarding every connection to
/// `target` with `delay` each way; stops accepting when dropped
/// (connections it carries end with their ends).
pub(crate) struct Relay {
    pub(crate) port: u16,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on `port` (0: any free one).
    pub(crate) fn start(port: u16, target: SocketAddr, delay: Duration) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        // Non-blocking, so that the accepting thread sees `stop`.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::Builder::new()
            .name(format!("relay-{port}"))
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let spawned = thread::Builder::new()
                                .name("relay-connect".into())
                                .spawn(move || {
                                    if let Err(e) = carry(client, target, delay) {
                                        eprintln!("relay {port} -> {target}: {e}");
                                    }
                                });
                            if let Err(e) = spawned {
                                eprintln!("relay {port}: {e}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => {
                            eprintln!("relay {port}: accept failed: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(Relay { port, stop })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connects to `target` for `client` and carries both directions. A
/// target not listening yet (a receiver still starting) is tried again
/// for a while, as a SYN is resent: the client already holds a
/// connection, as it would across a network.
fn carry(client: TcpStream, target: SocketAddr, delay: Duration) -> anyhow::Result<()> {
    client.set_nonblocking(false)?;
    let deadline = std::time::Instant::now() + crate::STEP;
    let server = loop {
        match TcpStream::connect(target) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    };
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let delay_ns = delay.as_nanos() as u64;
    direction(client.try_clone()?, server.try_clone()?, delay_ns)?;
    direction(server, client, delay_ns)?;
    Ok(())
}

/// One direction, on one thread: waits for bytes from `from` or for the
/// next write to fall due (`ppoll` with a nanosecond timeout, timer slack
/// 1 µs), stamps what arrives and writes it to `to` `delay_ns` after. One
/// thread, so that a chunk costs one wake-up and no hand-off; with no
/// delay it is written as soon as read. An end or error on either side
/// ends the direction once what was read is written.
fn direction(from: TcpStream, to: TcpStream, delay_ns: u64) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("relay".into())
        .spawn(move || pump(from, to, delay_ns))?;
    Ok(())
}

fn pump(mut from: TcpStream, mut to: TcpStream, delay_ns: u64) {
    clock::fine_timer_slack();
    let mut queue: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    let mut open = true;
    loop {
        let now = clock::now_ns();
        while queue.front().is_some_and(|(at, _)| at + delay_ns <= now) {
            let Some((_, bytes)) = queue.pop_front() else {
                break;
            };
            if to.write_all(&bytes).is_err() {
                return;
            }
        }
        let wait = queue
            .front()
            .map(|(at, _)| (at + delay_ns).saturating_sub(clock::now_ns()));
        if !open {
            match wait {
                Some(ns) => clock::sleep_until(clock::now_ns() + ns),
                None => break,
            }
            continue;
        }
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        let timeout = wait.map(|ns| TimeSpec::from_duration(Duration::from_nanos(ns)));
        match ppoll(&mut fds, timeout, None) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => open = false,
        }
        if !open {
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) | Err(_) => open = false,
            Ok(n) => queue.push_back((clock::now_ns(), buf[..n].to_vec())),
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// The relays of one run: one in front of every port a server is reached
/// at from another server.
#[derive(Default)]
pub(crate) struct Network {
    relays: Vec<Relay>,
}

impl Network {
    /// A relay on `port` (0: a free one) to 127.0.0.1:`target`; returns
    /// its port.
    pub(crate) fn relay(&mut self, port: u16, target: u16, delay: Duration) -> anyhow::Result<u16> {
        let relay = Relay::start(port, SocketAddr::from(([127, 0, 0, 1], target)), delay)?;
        let port = relay.port;
        self.relays.push(relay);
        Ok(port)
    }
}

/// Parses a delay: microseconds (`100us`, `100µs`), or what `?wait=`
/// takes (`2ms`, `1s`; a bare number is milliseconds); at most 10 s.
pub(crate) fn parse_delay(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.strip_suffix("us").or_else(|| s.strip_suffix("µs")) {
        Some(us) => us
            .trim()
            .parse::<u64>()
            .map(Duration::from_micros)
            .map_err(|_| format!("{s:?}: whole microseconds, e.g. 100us"))?,
        None => cachecast::sidecar::parse_duration(s)?,
    };
    if d > Duration::from_secs(10) {
        return Err(format!("{s:?}: at most 10 s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse_with_units() {
        assert_eq!(parse_delay("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_delay("100µs"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert_eq!(parse_delay("1.5ms"), Ok(Duration::from_micros(1500)));
        assert!(parse_delay("5 parsecs").is_err());
        assert!(parse_delay("-1us").is_err());
        assert!(parse_delay("11s").is_err());
    }
}
