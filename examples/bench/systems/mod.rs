//! The systems compared, one module each: how a node of each sets itself
//! up as a receiver or an origin, and the servers (redis-server,
//! nats-server) or sidecars (`cachecast run`) some of them need.

use serde::{Deserialize, Serialize};

use crate::participant::{Node, NodeSpec};

pub(crate) mod cachecast;
pub(crate) mod http;
pub(crate) mod nats;
pub(crate) mod raw;
pub(crate) mod raw_async;
pub(crate) mod redis;
pub(crate) mod sidecar;

/// A system compared: a column of the tables, a key of the JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum System {
    Cachecast,
    Redis,
    Nats,
    Raw,
    /// Redis clients, each talking to its own sidecar process.
    Resp,
    /// HTTP clients: POST to the origin's sidecar, SSE from each other.
    Http,
}

impl System {
    pub(crate) fn key(self) -> &'static str {
        match self {
            System::Cachecast => "cachecast",
            System::Redis => "redis",
            System::Nats => "nats",
            System::Raw => "raw_tcp",
            System::Resp => "cachecast_resp",
            System::Http => "cachecast_http",
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            System::Cachecast => "cachecast",
            System::Redis => "Redis pub/sub",
            System::Nats => "NATS",
            System::Raw => "raw TCP",
            System::Resp => "Redis clients via sidecars",
            System::Http => "HTTP and SSE via sidecars",
        }
    }
}

/// One node of `spec`'s system, set up and ready.
pub(crate) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    match spec.system {
        System::Cachecast => cachecast::setup(spec).await,
        System::Redis | System::Resp => redis::setup(spec).await,
        System::Nats => nats::setup(spec).await,
        System::Http => http::setup(spec).await,
        System::Raw => raw::setup(spec).await,
    }
}
