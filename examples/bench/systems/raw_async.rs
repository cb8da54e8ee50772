//! The raw floor on Tokio sockets (`--raw async`): the shape of the
//! other systems' origins and receivers, without their protocols.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock;
use crate::participant::{Node, NodeSpec, Origin, payload};
use crate::stats::Recorder;
use crate::systems::raw;

const BURST: usize = 1024;

pub(super) async fn setup(spec: &NodeSpec) -> anyhow::Result<Node> {
    let rec = Recorder::new(spec.workload);
    if spec.index == 0 {
        let mut socks = Vec::new();
        for s in raw::connect_all(spec).await? {
            s.set_nonblocking(true)?;
            socks.push(TcpStream::from_std(s)?);
        }
        return Ok(Node::sending(
            rec,
            Origin::RawAsync(RawAsyncOrigin {
                socks,
                buf: Vec::with_capacity(BURST * 48),
            }),
        ));
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", spec.binds[spec.index])).await?;
    let r = rec.clone();
    let task = tokio::spawn(async move {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let _ = sock.set_nodelay(true);
        let mut buf = BytesMut::with_capacity(256 * 1024);
        loop {
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            while buf.len() >= 4 {
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() < 4 + len {
                    break;
                }
                r.record(&buf[4..4 + len]);
                buf.advance(4 + len);
            }
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(256 * 1024);
            }
        }
    });
    Ok(Node::receiving(rec, task))
}

pub(crate) struct RawAsyncOrigin {
    socks: Vec<TcpStream>,
    buf: Vec<u8>,
}

impl RawAsyncOrigin {
    fn frame(&mut self, stamp: u64) {
        let p = payload(stamp);
        self.buf.extend_from_slice(&(p.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(&p);
    }

    async fn write(&mut self) -> anyhow::Result<()> {
        for s in &mut self.socks {
            s.write_all(&self.buf).await?;
        }
        self.buf.clear();
        Ok(())
    }

    pub(crate) async fn one(&mut self, stamp: u64) -> anyhow::Result<()> {
        self.frame(stamp);
        self.write().await
    }

    pub(crate) async fn burst(&mut self) -> anyhow::Result<u64> {
        for _ in 0..BURST {
            self.frame(clock::now_ns());
        }
        self.write().await?;
        Ok(BURST as u64)
    }
}
