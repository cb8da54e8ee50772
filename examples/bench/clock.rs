//! The clock every process of a run shares (CLOCK_MONOTONIC), the stamps
//! an invalidation carries as its key, and paced sleeping.

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
/// machine, so a stamp taken by the origin is comparable at a receiver.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // std's `Instant` reads this clock too but does not show its value,
    // and a value is what crosses between processes.
    // SAFETY: `ts` is a valid, writable timespec that outlives the call,
    // and CLOCK_MONOTONIC always exists on Linux: the call only writes
    // `ts` and cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A stamp as 16 lowercase hex digits: the invalidation's key.
pub(crate) fn stamp_hex(ns: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((ns >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// The stamp in the last 16 bytes of `bytes`.
pub(crate) fn parse_stamp(bytes: &[u8]) -> Option<u64> {
    let hex = bytes.get(bytes.len().checked_sub(16)?..)?;
    hex.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some(acc << 4 | u64::from(d))
    })
}

/// Sleeps until `due` (nanoseconds of [`now_ns`]); the caller's timer
/// slack decides the precision.
pub(crate) fn sleep_until(due: u64) {
    let now = now_ns();
    if due > now {
        std::thread::sleep(std::time::Duration::from_nanos(due - now));
    }
}

/// Timer slack of 1 µs for the calling thread, instead of the default
/// 50 µs: the precision of [`sleep_until`] on a pacing thread.
pub(crate) fn fine_timer_slack() {
    let slack: libc::c_ulong = 1_000;
    // SAFETY: PR_SET_TIMERSLACK takes one plain integer (the slack in
    // nanoseconds, an unsigned long) and touches no memory of ours; it
    // only changes the calling thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack) };
}
