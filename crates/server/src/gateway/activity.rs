//! Space idle/active transitions, written to the store by one task.
//!
//! Only a space's latest state matters to the store, so transitions are coalesced per
//! space: the queue holds at most one entry per space however slow the store is, and a
//! burst of joins and leaves in one space costs one write. Each write runs in its own
//! task, so a panicking store call is caught and reported, and the writer goes on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use spacegate_proto::{SessionId, SpaceId};
use spacegate_store::Store;
use tokio::sync::mpsc;

use super::lock;
use crate::metrics::Metrics;

#[derive(Debug)]
pub(super) enum Activity {
    Active(SessionId),
    Idle,
}

pub(super) struct ActivityQueue {
    pending: Mutex<HashMap<SpaceId, Activity>>,
    /// Holds at most one wakeup: the writer takes everything pending when it wakes.
    wake: mpsc::Sender<()>,
    /// False after a write failed, until one succeeds: `/readyz` reports it.
    up: AtomicBool,
}

impl ActivityQueue {
    /// The queue and its writer task, which ends when the queue is dropped.
    pub(super) fn spawn(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        let (wake, rx) = mpsc::channel(1);
        let queue = Arc::new(ActivityQueue {
            pending: Mutex::new(HashMap::new()),
            wake,
            up: AtomicBool::new(true),
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
}

async fn write_all(
    queue: Weak<ActivityQueue>,
    mut wake: mpsc::Receiver<()>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) {
    while wake.recv().await.is_some() {
        let Some(q) = queue.upgrade() else { return };
        let batch: Vec<(SpaceId, Activity)> = lock(&q.pending).drain().collect();
        for (space, a) in batch {
            let store = store.clone();
            let started = Instant::now();
            let what = match a {
                Activity::Active(_) => "active",
                Activity::Idle => "idle",
            };
            let id = space.clone();
            let write = tokio::spawn(async move {
                match a {
                    Activity::Active(session) => store.mark_space_active(&space, &session).await,
                    Activity::Idle => store.mark_space_idle(&space).await,
                }
            });
            let ok = match write.await {
                // `false` means the space is gone: nothing left to record.
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, space = %id, activity = what, "could not record space activity");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, space = %id, activity = what, "recording space activity panicked");
                    false
                }
            };
            metrics.store_write(started.elapsed(), ok);
            q.up.store(ok, Ordering::Relaxed);
        }
    }
}
