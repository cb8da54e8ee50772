//! What a quick restart logs, in a test binary of its own: a log line is
//! read through a subscriber scoped to this test, and tracing caches per
//! call site whether anyone listens. Another test hitting the same call
//! site at the same moment, in the same process, could leave it cached as
//! unheard.

mod common;

use std::sync::Arc;

use common::{Cluster, Mode};

const LONG: std::time::Duration = std::time::Duration::from_secs(30);

/// Hazard: after a peer crash-restarted faster than `dead_after`, the
/// survivor logged an ERROR "two running nodes answer as …" (an operator
/// pages on it) while it held the new run back until the old link died.
/// Now that is an INFO line; only a claim that outlasts a restart is an
/// error.
#[test]
fn a_quick_restart_is_no_error_about_two_running_nodes() {
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("logs").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // One thread: every task logs to this test's subscriber.
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (mut c, listeners) = Cluster::reserve(2).await;
            // A reaches B through a relay that will keep B's inbound link
            // from A's first run open and silent, as a crash across a
            // network does.
            let relay = c.start_through_proxy(listeners, (0, 1), LONG).await;
            relay.set(Mode::Stall);
            c.nodes[0].take().expect("a").abort().await;
            // The next run dials B directly, before B noticed the crash.
            c.via.clear();
            c.start_node(0, None).await;
            c.wait_connected(LONG).await;
            c.shutdown_all().await;
        });
    });
    let text = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
    assert!(
        text.contains("held back until its previous run's link is gone"),
        "the restart was not held back at all: {text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("two running nodes")),
        "{text}"
    );
}
