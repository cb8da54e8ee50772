//! The limit on open files, and the share of it the API may take.

use rlimit::Resource;

use crate::config::ClusterConfig;
use crate::sidecar::MAX_API_CONNECTIONS;

/// Raises the soft limit on open files to the hard limit (a service may
/// need more than the usual soft default of 1024, and only the hard limit
/// is the administrator's choice). Returns the soft limit in force.
fn raise_nofile_limit() -> std::io::Result<u64> {
    let (soft, hard) = Resource::NOFILE.get()?;
    // It can fail (an unlimited hard limit is above the kernel's nr_open):
    // then the soft limit stays as it was.
    if soft < hard && Resource::NOFILE.set(hard, hard).is_ok() {
        return Ok(hard);
    }
    Ok(soft)
}

/// Descriptors kept aside beside connections: listeners, the runtime's
/// own, the state file, webhook and DNS sockets, stdio.
const FD_RESERVE: u64 = 32;

/// The cap on API connections: the default, or less when the limit on
/// open files would not leave room for the mesh (its inbound connections
/// and one outbound per peer) and the Redis-protocol endpoint's
/// connections (`cachecast.resp.max.connections`), so that API clients
/// can never starve them. Raises the limit first, and warns when it is
/// too low for all.
pub fn api_connection_cap(config: &ClusterConfig) -> usize {
    let mesh = crate::Tuning::default().max_connections as u64
        + config.peers.len() as u64
        + config.resp.as_ref().map_or(0, |r| r.max_connections as u64);
    let wanted = mesh + MAX_API_CONNECTIONS as u64 + FD_RESERVE;
    let soft = match raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the limit on open files; assuming it suffices");
            return MAX_API_CONNECTIONS;
        }
    };
    if soft >= wanted {
        return MAX_API_CONNECTIONS;
    }
    // Never zero: the API must stay usable, if cramped.
    let cap = soft
        .saturating_sub(mesh + FD_RESERVE)
        .clamp(8, MAX_API_CONNECTIONS as u64);
    tracing::warn!(
        limit = soft,
        wanted,
        api_max_connections = cap,
        "the limit on open files is too low for the mesh and {MAX_API_CONNECTIONS} API connections; \
         the API gets fewer. Raise it (under systemd: LimitNOFILE={wanted} or more)"
    );
    cap as usize
}
