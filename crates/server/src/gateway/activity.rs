//! Space idle/active transitions, written to the store by one task.
//!
//! Only a space's latest state matters to the store, so transitions are coalesced per
//! space: the queue holds at most one entry per space however slow the store is, and a
//! burst of joins and leaves in one space costs one write. Whatever is pending is written
//! as one batch (one transaction, one fsync on SQLite), gathered over `BATCH_WINDOW`. Each batch runs in its own task,
//! so a panicking store call is caught and reported, and the writer goes on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use spacegate_proto::{SessionId, SpaceId};
use spacegate_store::Store;
use tokio::sync::mpsc;

use super::lock;
use crate::metrics::Metrics;

/// How long the writer gathers transitions after the first one arrives. Each batch is one
/// durable commit (an fsync and a few thread hops, ~100 µs of CPU on SQLite), so without
/// gathering a node joining a few hundred participants a second into small spaces would
/// pay it per join and per leave. The REST status lags the gateway by this much at most;
/// deletes check the gateway itself.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Pause before writing again after a failed write.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) enum Activity {
    Active(SessionId),
    Idle,
}

pub(super) struct ActivityQueue {
    pending: Mutex<HashMap<SpaceId, Activity>>,
    /// Holds at most one wakeup: the writer takes everything pending when it wakes.
    wake: mpsc::Sender<()>,
    /// False after a write failed, until one succeeds (failed batches are retried every
    /// second): `/readyz` reports it.
    up: AtomicBool,
    /// A batch is being written now.
    writing: AtomicBool,
}

impl ActivityQueue {
    /// The queue and its writer task, which ends when the queue is dropped.
    pub(super) fn spawn(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        let (wake, rx) = mpsc::channel(1);
        let queue = Arc::new(ActivityQueue {
            pending: Mutex::new(HashMap::new()),
            wake,
            up: AtomicBool::new(true),
            writing: AtomicBool::new(false),
        });
        tokio::spawn(write_all(Arc::downgrade(&queue), rx, store, metrics));
        queue
    }

    pub(super) fn push(&self, space: &SpaceId, a: Activity) {
        lock(&self.pending).insert(space.clone(), a);
        // Full means a wakeup is already pending, which will see this entry.
        let _ = self.wake.try_send(());
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Waits (up to `grace`) until every transition pushed so far is written: a drained
    /// node exits with the store telling the truth. Whether it got there.
    pub(super) async fn flushed(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            let idle = lock(&self.pending).is_empty() && !self.writing.load(Ordering::Acquire);
            if idle {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn write_all(
    queue: Weak<ActivityQueue>,
    mut wake: mpsc::Receiver<()>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) {
    while wake.recv().await.is_some() {
        tokio::time::sleep(BATCH_WINDOW).await;
        let Some(q) = queue.upgrade() else { return };
        // Set before the pending map empties, so `flushed` never sees neither.
        q.writing.store(true, Ordering::Release);
        let batch: Vec<(SpaceId, Option<SessionId>)> = lock(&q.pending)
            .drain()
            .map(|(space, a)| match a {
                Activity::Active(session) => (space, Some(session)),
                Activity::Idle => (space, None),
            })
            .collect();
        let started = Instant::now();
        let spaces = batch.len();
        let store = store.clone();
        // Its own task: a panicking store call is reported, and the writer goes on.
        let write = tokio::spawn(async move {
            let result = store.record_space_activity(&batch).await;
            (result, batch)
        });
        let ok = match write.await {
            Ok((Ok(()), _)) => true,
            Ok((Err(e), batch)) => {
                tracing::error!(error = %e, spaces, "could not record space activity; retrying");
                // Back in the queue unless a newer transition of the same space is there
                // already, and tried again after a pause: the store's status must catch up
                // once it recovers, and /readyz must not stay failed for want of traffic.
                let mut pending = lock(&q.pending);
                for (space, session) in batch {
                    pending.entry(space).or_insert(match session {
                        Some(s) => Activity::Active(s),
                        None => Activity::Idle,
                    });
                }
                drop(pending);
                let _ = q.wake.try_send(());
                false
            }
            Err(e) => {
                tracing::error!(error = %e, spaces, "recording space activity panicked");
                false
            }
        };
        metrics.store_write(started.elapsed(), ok);
        q.up.store(ok, Ordering::Relaxed);
        q.writing.store(false, Ordering::Release);
        drop(q);
        if !ok {
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }
}
