//! Who may connect, how many at once, and how much of it is logged.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::NodeAddr;

/// Connections still in their handshake from one source address at once.
pub(crate) const MAX_HANDSHAKES_PER_IP: usize = 8;

/// How often the allowlist may be re-resolved because of an unknown source.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// The configured peers' addresses: inbound connections from anywhere else
/// are closed before the handshake.
pub(crate) struct Allowlist {
    peers: Vec<NodeAddr>,
    state: Mutex<(HashSet<IpAddr>, Option<Instant>)>,
}

async fn resolve_all(peers: &[NodeAddr]) -> HashSet<IpAddr> {
    let mut ips = HashSet::new();
    for p in peers {
        if let Ok(ip) = p.host.parse::<IpAddr>() {
            ips.insert(ip.to_canonical());
            continue;
        }
        let lookup = tokio::net::lookup_host((p.host.as_str(), p.port));
        if let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(2), lookup).await {
            ips.extend(addrs.map(|a| a.ip().to_canonical()));
        }
    }
    ips
}

impl Allowlist {
    pub(crate) fn new(peers: Vec<NodeAddr>) -> Self {
        Allowlist {
            peers,
            state: Mutex::new((HashSet::new(), None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashSet<IpAddr>, Option<Instant>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` is a peer's address. Names are resolved again when an
    /// unknown address shows up (at most every few seconds), so a peer
    /// whose address changed is let in without a restart.
    pub(crate) async fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let stale = {
            let st = self.lock();
            if st.0.contains(&ip) {
                return true;
            }
            st.1.is_none_or(|at| at.elapsed() >= REFRESH_EVERY)
        };
        if !stale {
            return false;
        }
        let fresh = resolve_all(&self.peers).await;
        let allowed = fresh.contains(&ip);
        *self.lock() = (fresh, Some(Instant::now()));
        allowed
    }
}

/// Counts connections in their handshake per source address.
#[derive(Default)]
pub(crate) struct PerIp(Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    /// Takes a slot for `ip`, or `None` when it has too many.
    pub(crate) fn enter(&self, ip: IpAddr) -> Option<IpSlot<'_>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot { owner: self, ip })
    }
}

/// A handshake slot; released on drop.
pub(crate) struct IpSlot<'a> {
    owner: &'a PerIp,
    ip: IpAddr,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.owner.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Logs at most `burst` lines per window, then counts what it holds back,
/// so that a port scan cannot fill the disk.
pub(crate) struct LogLimiter {
    state: Mutex<(Instant, u32, u64)>,
    burst: u32,
    window: Duration,
}

impl LogLimiter {
    pub(crate) fn new(burst: u32, window: Duration) -> Self {
        LogLimiter {
            state: Mutex::new((Instant::now(), 0, 0)),
            burst,
            window,
        }
    }

    /// Whether to log this one; with it, how many were held back in the
    /// previous window (to report once).
    pub(crate) fn admit(&self) -> (bool, u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, logged, held) = &mut *st;
        let mut report = 0;
        if start.elapsed() >= self.window {
            report = *held;
            *start = Instant::now();
            *logged = 0;
            *held = 0;
        }
        if *logged < self.burst {
            *logged += 1;
            (true, report)
        } else {
            *held += 1;
            (false, report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_holds_back_beyond_the_burst() {
        let l = LogLimiter::new(3, Duration::from_secs(3600));
        let admitted = (0..100).filter(|_| l.admit().0).count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn per_ip_slots_are_bounded_and_released() {
        let p = PerIp::default();
        let ip: IpAddr = "127.0.0.2".parse().expect("ip");
        let slots: Vec<_> = (0..MAX_HANDSHAKES_PER_IP)
            .map(|_| p.enter(ip).expect("slot"))
            .collect();
        assert!(p.enter(ip).is_none());
        drop(slots);
        assert!(p.enter(ip).is_some());
    }

    #[tokio::test]
    async fn allowlist_admits_peers_only() {
        let a = Allowlist::new(vec![NodeAddr::new("127.0.0.1", 1)]);
        assert!(a.permits("127.0.0.1".parse().expect("ip")).await);
        assert!(a.permits("::ffff:127.0.0.1".parse().expect("ip")).await);
        assert!(!a.permits("127.0.0.2".parse().expect("ip")).await);
    }
}
