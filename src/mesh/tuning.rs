//! Timers and bounds of the runtime.

use std::time::Duration;

/// Timers and bounds of the runtime. The defaults suit production; tests
/// may shorten them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Send a `Ping` after this long without writing anything.
    pub ping_every: Duration,
    /// Close a link after this long without hearing anything.
    pub dead_after: Duration,
    /// The peer's `Hello` must arrive within this long.
    pub hello_timeout: Duration,
    /// Give up a TCP connect after this long.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failure.
    pub backoff_first: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// An outbound session counts as healthy, and the reconnect delay
    /// starts again from [`Tuning::backoff_first`], once the peer
    /// acknowledged something on it or it stayed up this long. A peer that
    /// completes the handshake and then fails is redialled ever more slowly.
    pub healthy_after: Duration,
    /// How long shutdown waits for peers to acknowledge what is queued.
    pub shutdown_timeout: Duration,
    /// Events buffered per subscriber, and per peer on their way to the
    /// callbacks, before the queue collapses into a flush.
    pub event_capacity: usize,
    /// Bytes (cache names, keys) those queues may hold, each, before they
    /// collapse into a flush.
    pub event_bytes: usize,
    /// Inbound connections open at once, all sources together.
    pub max_connections: usize,
    /// Bytes the replay buffer may hold, whatever `cachecast.buffer` says
    /// in invalidations: keys can be 64 KiB each.
    pub buffer_bytes: usize,
    /// Each inbound connection writes at most one ack per this long: the
    /// ack then covers every batch read meanwhile, and at a low rate the
    /// sender wakes once for them instead of once per batch (a sixth less
    /// CPU per invalidation, docs/performance.md). Zero: one per batch.
    pub ack_delay: Duration,
    /// Seeds the reconnect delays' jitter, so that a simulated run repeats
    /// exactly (the simulator sets it; nothing secret derives from it).
    /// `None`: drawn from the operating system.
    pub jitter_seed: Option<u64>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            ping_every: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            backoff_first: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            healthy_after: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(2),
            event_capacity: 8192,
            event_bytes: 16 * 1024 * 1024,
            max_connections: 64,
            buffer_bytes: 64 * 1024 * 1024,
            ack_delay: Duration::from_millis(1),
            jitter_seed: None,
        }
    }
}
