//! Each space's state machine (`signaling::Space`), held in a mutex per space, and the
//! delivery of what it outputs. A caller locks the space, feeds it one input and delivers
//! the outputs before unlocking, so every connection sees a space's frames in the order the
//! state machine made them.

use std::sync::{Arc, Mutex};

use spacegate_proto::SpaceId;
use spacegate_signaling::{Output, Space};

use super::activity::Activity;
use super::{CLOSE_NO_RECONNECT, CLOSE_RESTART, Gateway, lock};
use crate::media::message_kind;

pub(super) struct Slot {
    space: Mutex<Space>,
    /// Set under the gateway's `spaces` lock when the slot is dropped from the map; a
    /// joiner that raced with that retries with a fresh slot.
    retired: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// Whether anyone is connected to `space` on this node right now. The store's status
    /// lags behind by one queued write; the REST API checks this too before deleting.
    /// Claims `space` for a REST delete: refused while anyone is connected to it or holds
    /// a registry claim on it (a join between its check and its `joined`). While the
    /// returned guard lives, joins that reach the registry are refused, so a join and a
    /// delete never both succeed: each checks the other's mark after making its own.
    pub async fn begin_delete(&self, space: &SpaceId) -> Result<DeleteClaim<'_>, SpaceBusy> {
        lock(&self.deleting).insert(space.clone());
        let claim = DeleteClaim {
            gateway: self,
            space: space.clone(),
        };
        if self.is_space_live(space) {
            return Err(SpaceBusy);
        }
        match self.registry.participants(space).await {
            Ok(p) if p.is_empty() => Ok(claim),
            // Someone is joining; or the registry cannot tell, so nothing is deleted.
            _ => Err(SpaceBusy),
        }
    }

    /// Whether a delete of `space` is under way (see [`Gateway::begin_delete`]).
    pub(super) fn is_being_deleted(&self, space: &SpaceId) -> bool {
        lock(&self.deleting).contains(space)
    }

    pub fn is_space_live(&self, space: &SpaceId) -> bool {
        lock(&self.spaces)
            .get(space)
            .is_some_and(|slot| !lock(&slot.space).is_empty())
    }

    /// Like `with_space`, but only if the space is live: media events for a space that
    /// emptied meanwhile must not resurrect it.
    pub(super) fn with_existing_space(
        &self,
        id: &SpaceId,
        f: impl FnOnce(&mut Space, &mut Vec<Output>),
    ) {
        if lock(&self.spaces).contains_key(id) {
            self.with_space(id, f);
        }
    }

    /// Runs `f` on the space's state (created on first use) and delivers its outputs.
    pub(super) fn with_space(&self, id: &SpaceId, f: impl FnOnce(&mut Space, &mut Vec<Output>)) {
        let mut out = Vec::new();
        loop {
            let slot = lock(&self.spaces)
                .entry(id.clone())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        space: Mutex::new(Space::new(id.clone(), self.config.space.clone())),
                        retired: false.into(),
                    })
                })
                .clone();
            let mut space = lock(&slot.space);
            if slot.retired.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            f(&mut space, &mut out);
            // Deliver while still holding the space lock, so every connection sees the
            // space's frames in the order the state machine made them.
            self.deliver(id, std::mem::take(&mut out));
            if space.is_empty() {
                drop(space);
                let mut spaces = lock(&self.spaces);
                let space = lock(&slot.space);
                if space.is_empty() && spaces.get(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    slot.retired
                        .store(true, std::sync::atomic::Ordering::Release);
                    spaces.remove(id);
                    self.release_home(id);
                }
            }
            return;
        }
    }

    /// The space emptied here: in a cluster its home claim goes, so the next join may home
    /// it on whichever node suits then. A join racing with this claims it again.
    fn release_home(&self, id: &SpaceId) {
        let (Some(homes), Ok(rt)) = (self.homes(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (homes, id) = (homes.clone(), id.clone());
        rt.spawn(async move {
            if let Err(e) = homes.release_home(&id).await {
                // The claim dies with this node's lease at the latest.
                tracing::warn!(error = %e, "space home not released");
            }
        });
    }

    fn deliver(&self, space: &SpaceId, out: Vec<Output>) {
        if out.is_empty() {
            return;
        }
        let conns = lock(&self.conns);
        for o in out {
            match o {
                Output::Send { to, frame } => {
                    if let Some(c) = conns.get(&to) {
                        // Queue full: this reader cannot keep up. Cut it off rather than
                        // buffer without bound or slow the space down.
                        c.push_or_close(frame, CLOSE_NO_RECONNECT);
                    }
                }
                // The receiving task lives as long as the runtime; a send error only
                // happens during shutdown, when nothing is left to record.
                Output::Activated { session_id } => {
                    self.activity.push(space, Activity::Active(session_id));
                }
                Output::Idle => self.activity.push(space, Activity::Idle),
                Output::MediaJoin {
                    member,
                    managed_subscriptions,
                    answered_initial_offer,
                } => self.media.send(crate::media::Command::Join {
                    room: space.clone(),
                    member,
                    mode: match managed_subscriptions {
                        0 => spacegate_sfu::SubscriptionMode::Manual,
                        n => spacegate_sfu::SubscriptionMode::Automatic(n),
                    },
                    answered_initial_offer,
                }),
                Output::MediaLeave { member } => {
                    self.media.send(crate::media::Command::Leave { member })
                }
                Output::Media { from, message } => {
                    tracing::trace!(%from, kind = message_kind(&message), "to the media plane");
                    let command = crate::media::Command::Message {
                        member: from.clone(),
                        message,
                    };
                    if !self.media.try_send(command) {
                        // The media queue is full. Dropping the message silently would
                        // leave this client's negotiation hanging; a reconnect resumes
                        // its session with fresh peer connections once the queue drains.
                        tracing::warn!(%from, "media plane saturated; asking the client to reconnect");
                        if let Some(c) = conns.get(&from) {
                            c.close(CLOSE_RESTART);
                        }
                    }
                }
            }
        }
    }
}

/// The space has participants, or someone is joining it.
#[derive(Debug)]
pub struct SpaceBusy;

/// A delete under way; dropping it ends the mark (after the store delete, or on failure).
#[derive(Debug)]
pub struct DeleteClaim<'a> {
    gateway: &'a Gateway,
    space: SpaceId,
}

impl Drop for DeleteClaim<'_> {
    fn drop(&mut self) {
        lock(&self.gateway.deleting).remove(&self.space);
    }
}
