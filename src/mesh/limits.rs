//! Who may connect, how many at once, and how much of it is logged.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::NodeAddr;

/// Connections still in their handshake from one source address at once.
pub(crate) const MAX_HANDSHAKES_PER_IP: usize = 8;

/// How often the allowlist may be re-resolved because of an unknown source.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Connections from unknown addresses that may wait for a refresh at once:
/// enough for every peer of a 5-node cluster, too few for a flood of
/// strangers to tie up the connection limit.
const MAX_WAITING_FOR_REFRESH: usize = 4;

/// Longest wait for one name lookup: a slow resolver must not hold up a
/// handshake or a redial for longer than a connect attempt.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses `host` resolves to (an IP literal is itself); an error
/// text when the lookup fails or takes longer than [`LOOKUP_TIMEOUT`].
pub(crate) async fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => Ok(addrs.collect()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
    }
}

/// The configured peers' addresses: inbound connections from anywhere else
/// are closed before the handshake, and a peer's identity is taken only
/// from that peer's own addresses.
pub(crate) struct Allowlist {
    peers: Vec<NodeAddr>,
    state: Mutex<Known>,
    /// Done once the names were first resolved.
    first: tokio::sync::OnceCell<()>,
    /// Woken when a refresh ends.
    refreshed: Notify,
    /// Places for connections waiting on a refresh.
    waiting: Arc<Semaphore>,
}

/// Each peer's addresses, resolved side by side; `None` for a name that
/// did not resolve now.
async fn resolve_all(peers: &[NodeAddr]) -> Vec<Option<HashSet<IpAddr>>> {
    let lookups = peers.iter().map(|p| async move {
        lookup(&p.host, p.port)
            .await
            .ok()
            .map(|addrs| addrs.iter().map(|a| a.ip().to_canonical()).collect())
    });
    futures_util::future::join_all(lookups).await
}

/// What the allowlist knows: each peer's last good addresses.
struct Known {
    per_peer: Vec<HashSet<IpAddr>>,
    refreshed: Option<Instant>,
    refreshing: bool,
}

/// What the accept loop may decide about a source address without waiting.
#[derive(Debug)]
pub(crate) enum Admit {
    /// A peer's address.
    Yes,
    /// No peer's address, by lookups at most a few seconds old.
    No,
    /// The names have not been resolved yet: the connection's own task
    /// waits for that ([`Allowlist::permits`]), never the accept loop.
    Unknown,
    /// Not an address known now, but the names are being resolved again
    /// (a peer whose address changed is let in on its first attempt): the
    /// connection's own task waits for that ([`Allowlist::after_refresh`]),
    /// holding one of a few places.
    Refreshing(OwnedSemaphorePermit),
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
            first: tokio::sync::OnceCell::new(),
            refreshed: Notify::new(),
            waiting: Arc::new(Semaphore::new(MAX_WAITING_FOR_REFRESH)),
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
        drop(st);
        self.refreshed.notify_waiters();
    }

    /// Resolves the names once (the node starts this at once; a connection
    /// that arrives first waits for the same lookups).
    pub(crate) async fn resolve_first(&self) {
        self.first.get_or_init(|| self.refresh()).await;
    }

    /// Whether `ip` is a peer's address, by what is known now, without
    /// waiting. An unknown address starts a refresh in the background (at
    /// most every few seconds, in `tracker`) and may wait for it, so that a
    /// peer whose address changed is let in on its first attempt.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, tracker: &TaskTracker) -> Admit {
        let ip = ip.to_canonical();
        if self.known(&ip) {
            return Admit::Yes;
        }
        if !self.first.initialized() {
            return Admit::Unknown;
        }
        let (start, running) = {
            let mut st = self.lock();
            let due = st.refreshed.is_none_or(|at| at.elapsed() >= REFRESH_EVERY);
            let start = due && !st.refreshing;
            if start {
                st.refreshing = true;
            }
            (start, st.refreshing)
        };
        if start {
            let me = self.clone();
            tracker.spawn(async move { me.refresh().await });
        }
        match self.waiting.clone().try_acquire_owned() {
            Ok(place) if running => Admit::Refreshing(place),
            _ => Admit::No,
        }
    }

    /// Whether `ip` is a peer's address once the refresh under way ends
    /// (bounded by the lookups' own deadline).
    pub(crate) async fn after_refresh(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        loop {
            let done = self.refreshed.notified();
            tokio::pin!(done);
            // Registered before the check, so an end in between is seen.
            done.as_mut().enable();
            if !self.lock().refreshing {
                return self.known(&ip);
            }
            done.await;
        }
    }

    /// Whether `ip` is a peer's address, once the names were resolved.
    pub(crate) async fn permits(&self, ip: IpAddr) -> bool {
        self.resolve_first().await;
        self.known(&ip.to_canonical())
    }

    /// Whether `ip` is an address of configured peer `peer` (by index).
    pub(crate) fn is_address_of(&self, peer: usize, ip: IpAddr) -> bool {
        self.lock()
            .per_peer
            .get(peer)
            .is_some_and(|s| s.contains(&ip.to_canonical()))
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
        let a = Arc::new(Allowlist::new(vec![
            NodeAddr::new("127.0.0.1", 1),
            NodeAddr::new("127.0.0.3", 1),
        ]));
        let tracker = TaskTracker::new();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // Before the first resolution the accept loop does not wait.
        assert!(matches!(a.admit(ip("127.0.0.1"), &tracker), Admit::Unknown));
        assert!(a.permits(ip("127.0.0.1")).await);
        assert!(a.permits(ip("::ffff:127.0.0.1")).await);
        assert!(!a.permits(ip("127.0.0.2")).await);
        assert!(matches!(a.admit(ip("127.0.0.1"), &tracker), Admit::Yes));
        assert!(matches!(a.admit(ip("127.0.0.2"), &tracker), Admit::No));
        // Each peer's identity only from its own address.
        assert!(a.is_address_of(0, ip("127.0.0.1")));
        assert!(!a.is_address_of(0, ip("127.0.0.3")));
        assert!(a.is_address_of(1, ip("127.0.0.3")));
        tracker.close();
        tracker.wait().await;
    }

    /// A peer whose address changed under its name comes in on its first
    /// attempt: its unknown address waits for the refresh it starts,
    /// instead of being refused until a later attempt.
    #[tokio::test]
    async fn an_unknown_address_waits_for_the_refresh_it_starts() {
        let a = Arc::new(Allowlist::new(vec![NodeAddr::new("127.0.0.1", 1)]));
        let tracker = TaskTracker::new();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        a.resolve_first().await;
        // What was resolved before the change: an old address, long ago.
        {
            let mut st = a.lock();
            st.per_peer[0] = HashSet::from([ip("127.0.0.9")]);
            st.refreshed = Instant::now().checked_sub(REFRESH_EVERY * 2);
        }
        let Admit::Refreshing(place) = a.admit(ip("127.0.0.1"), &tracker) else {
            panic!("the new address is refused without a refresh");
        };
        assert!(a.after_refresh(ip("127.0.0.1")).await);
        drop(place);
        // A stranger right after finds the lookups fresh: no wait, no lookup.
        assert!(matches!(a.admit(ip("127.0.0.2"), &tracker), Admit::No));
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn few_strangers_wait_on_one_refresh() {
        let a = Arc::new(Allowlist::new(vec![NodeAddr::new("127.0.0.1", 1)]));
        let tracker = TaskTracker::new();
        a.resolve_first().await;
        a.lock().refreshed = None;
        let ip: IpAddr = "127.0.0.2".parse().expect("ip");
        let admits: Vec<Admit> = (0..10).map(|_| a.admit(ip, &tracker)).collect();
        let waiting = admits
            .iter()
            .filter(|x| matches!(x, Admit::Refreshing(_)))
            .count();
        assert!(waiting <= MAX_WAITING_FOR_REFRESH, "{waiting} wait");
        assert!(!a.after_refresh(ip).await);
        tracker.close();
        tracker.wait().await;
    }
}
