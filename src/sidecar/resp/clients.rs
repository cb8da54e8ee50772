//! The connections of the endpoint as `CLIENT LIST`, `CLIENT INFO` and
//! `CLIENT KILL` see them: each connection registers what Redis's client
//! line reports, and a token that closes it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

/// What a connection's line reports, updated by its session.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// `CLIENT SETNAME`.
    pub name: Option<Bytes>,
    /// Channels, patterns, shard channels subscribed to.
    pub sub: usize,
    /// See [`View::sub`].
    pub psub: usize,
    /// See [`View::sub`].
    pub ssub: usize,
    /// The protocol version (2 or 3).
    pub resp: u8,
    /// The last command's full name (`client|list`), `NULL` before any.
    pub cmd: Option<std::borrow::Cow<'static, str>>,
    /// When it last sent a command.
    pub last: Option<Instant>,
    /// `CLIENT SETINFO`.
    pub lib_name: Option<Bytes>,
    /// See [`View::lib_name`].
    pub lib_ver: Option<Bytes>,
    /// Output queued, in bytes (`omem`).
    pub omem: usize,
}

/// One connection.
#[derive(Debug)]
pub struct Client {
    /// Its `CLIENT ID`.
    pub id: u64,
    /// The client's address.
    pub addr: SocketAddr,
    /// The address it connected to.
    pub laddr: SocketAddr,
    /// Its socket's descriptor.
    pub fd: i32,
    /// When it connected.
    pub created: Instant,
    /// Cancelled by `CLIENT KILL`: the connection closes.
    pub kill: CancellationToken,
    view: Mutex<View>,
}

impl Client {
    /// A connection just accepted.
    pub fn new(id: u64, addr: SocketAddr, laddr: SocketAddr, fd: i32) -> Arc<Self> {
        Arc::new(Client {
            id,
            addr,
            laddr,
            fd,
            created: Instant::now(),
            kill: CancellationToken::new(),
            view: Mutex::new(View {
                resp: 2,
                ..View::default()
            }),
        })
    }

    /// Its view, to read or update.
    pub fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Redis's client line (`catClientInfoString`, Redis 7.2), without the
    /// line end. What a pub/sub endpoint has no notion of (transactions,
    /// tracking, buffers Redis sizes) is reported as Redis reports an
    /// idle client with none.
    pub fn line(&self, now: Instant) -> String {
        let v = self.view().clone();
        let text = |b: &Option<Bytes>| {
            b.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let flags = if v.sub + v.psub + v.ssub > 0 {
            "P"
        } else {
            "N"
        };
        let idle = now.duration_since(v.last.unwrap_or(self.created)).as_secs();
        format!(
            "id={} addr={} laddr={} fd={} name={} age={} idle={idle} flags={flags} db=0 sub={} psub={} ssub={} multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem={} tot-mem={} events=r cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            self.fd,
            text(&v.name),
            now.duration_since(self.created).as_secs(),
            v.sub,
            v.psub,
            v.ssub,
            v.omem,
            v.omem,
            v.cmd.as_deref().unwrap_or("NULL"),
            v.resp,
            text(&v.lib_name),
            text(&v.lib_ver),
        )
    }

    /// Whether it counts as a pub/sub client (`TYPE pubsub`).
    pub fn pubsub(&self) -> bool {
        let v = self.view();
        v.sub + v.psub + v.ssub > 0
    }
}

/// Every open connection, by id (so listed in the order they came).
#[derive(Debug, Default)]
pub struct Clients {
    map: Mutex<BTreeMap<u64, Arc<Client>>>,
}

impl Clients {
    fn map(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Client>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection.
    pub fn add(&self, c: Arc<Client>) {
        self.map().insert(c.id, c);
    }

    /// Forgets a connection that ended.
    pub fn remove(&self, id: u64) {
        self.map().remove(&id);
    }

    /// Every connection, in id order.
    pub fn all(&self) -> Vec<Arc<Client>> {
        self.map().values().cloned().collect()
    }

    /// The connection with this id.
    pub fn get(&self, id: u64) -> Option<Arc<Client>> {
        self.map().get(&id).cloned()
    }
}
