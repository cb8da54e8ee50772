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
    state: Mutex<Known>,
}

/// Each peer's addresses; `None` for a name that did not resolve now.
async fn resolve_all(peers: &[NodeAddr]) -> Vec<Option<HashSet<IpAddr>>> {
    let mut out = Vec::with_capacity(peers.len());
    for p in peers {
        if let Ok(ip) = p.host.parse::<IpAddr>() {
            out.push(Some(HashSet::from([ip.to_canonical()])));
            continue;
        }
        let lookup = tokio::net::lookup_host((p.host.as_str(), p.port));
        out.push(
            match tokio::time::timeout(Duration::from_secs(2), lookup).await {
                Ok(Ok(addrs)) => Some(addrs.map(|a| a.ip().to_canonical()).collect()),
                _ => None,
            },
        );
    }
    out
}

/// What the allowlist knows: each peer's last good addresses.
struct Known {
    per_peer: Vec<HashSet<IpAddr>>,
    refreshed: Option<Instant>,
    refreshing: bool,
}

impl Allowlist {
    pub(crate) fn new(peers: Vec<NodeAddr>) -> Self {
        let n = peers.len();
        Allowlist {
            peers,
            state: Mutex::new(Known {
                per_peer: vec![HashSet::new(); n],
                refreshed: None,
                refreshing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known(&self, ip: &IpAddr) -> bool {
        self.lock().per_peer.iter().any(|s| s.contains(ip))
    }

    /// Resolves every peer again; a name that fails keeps its last good
    /// addresses (a DNS outage must not lock peers out).
    pub(crate) async fn refresh(&self) {
        let fresh = resolve_all(&self.peers).await;
        let mut st = self.lock();
        for (known, got) in st.per_peer.iter_mut().zip(fresh) {
            if let Some(ips) = got {
                *known = ips;
            }
        }
        st.refreshed = Some(Instant::now());
        st.refreshing = false;
    }

    /// Whether `ip` is a peer's address, by what is known now. Names are
    /// resolved when the list is first needed; after that, an unknown
    /// address starts a refresh in the background (at most every few
    /// seconds, never holding up the accept loop), so a peer whose address
    /// changed is let in on its next attempt.
    pub(crate) async fn permits(self: &std::sync::Arc<Self>, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.known(&ip) {
            return true;
        }
        let first = self.lock().refreshed.is_none();
        if first {
            self.refresh().await;
            return self.known(&ip);
        }
        let start = {
            let mut st = self.lock();
            let due = st.refreshed.is_none_or(|at| at.elapsed() >= REFRESH_EVERY);
            let start = due && !st.refreshing;
            if start {
                st.refreshing = true;
            }
            start
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.refresh().await });
        }
        false
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
        let a = std::sync::Arc::new(Allowlist::new(vec![NodeAddr::new("127.0.0.1", 1)]));
        assert!(a.permits("127.0.0.1".parse().expect("ip")).await);
        assert!(a.permits("::ffff:127.0.0.1".parse().expect("ip")).await);
        assert!(!a.permits("127.0.0.2".parse().expect("ip")).await);
    }
}
