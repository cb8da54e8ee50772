//! Event streams: the channel subscribers read from.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use super::*;

/// Where [`Events`] streams come from: the channel, the count of live
/// streams, and the signal that the node has stopped.
#[derive(Clone)]
pub(crate) struct Fanout {
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) subscribers: Arc<AtomicUsize>,
    pub(crate) finished: CancellationToken,
}

impl Fanout {
    pub(crate) fn new(capacity: usize) -> Self {
        Fanout {
            events: broadcast::channel(capacity.max(16)).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
            finished: CancellationToken::new(),
        }
    }

    pub(crate) fn subscribe(&self) -> Events {
        // Counted before the receiver exists, so that no event sent after
        // it does is skipped.
        self.subscribers.fetch_add(1, Ordering::SeqCst);
        Events {
            inner: BroadcastStream::new(self.events.subscribe()),
            finished: Box::pin(self.finished.clone().cancelled_owned()),
            _counted: Subscribed(self.subscribers.clone()),
        }
    }
}

/// A stream of [`Event`]s; see [`MeshHandle::subscribe`].
#[must_use = "events are only kept for a stream that is read"]
pub struct Events {
    pub(crate) inner: BroadcastStream<Event>,
    /// Resolves when the node has stopped: the stream then ends.
    pub(crate) finished: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Dropped after `inner`: uncounts this stream.
    pub(crate) _counted: Subscribed,
}

/// One live [`Events`] stream, counted in `Shared::subscribers`.
pub(crate) struct Subscribed(Arc<AtomicUsize>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Events {
    /// The next event; `None` once the mesh has shut down.
    pub async fn recv(&mut self) -> Option<Event> {
        use futures_util::StreamExt;
        self.next().await
    }
}

impl futures_util::Stream for Events {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        // Looked at first: once the node has stopped, whatever is still
        // queued is delivered, then the stream ends.
        let finished = self.finished.as_mut().poll(cx).is_ready();
        let next = std::pin::Pin::new(&mut self.inner).poll_next(cx).map(|r| {
            r.map(|r| match r {
                Ok(ev) => ev,
                Err(BroadcastStreamRecvError::Lagged(missed)) => Event::Flush {
                    origin: None,
                    reason: FlushReason::Lagged { missed },
                },
            })
        });
        match next {
            std::task::Poll::Pending if finished => std::task::Poll::Ready(None),
            other => other,
        }
    }
}
