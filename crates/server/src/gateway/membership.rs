//! One guard for everything a participant holds on this node: its registry claim, its
//! connection entry, its place in the space (and with it the media plane), and, once it
//! has been in the space, its departure record. The normal end releases them in order
//! ([`Membership::end`]); anything else (a refusal after the claim, a timed-out or
//! cancelled admission, a panic in the connection's task) drops the guard, and the drop
//! releases whatever was taken, so a participant id is never left taken by a join that
//! never happened or a connection that died.

use std::sync::Arc;

use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};

use super::{Gateway, lock};

pub(super) struct Membership {
    gw: Arc<Gateway>,
    space: SpaceId,
    participant: ParticipantId,
    conn: ConnectionId,
    /// In `gw.conns`.
    registered: bool,
    /// In the space's state machine; the credential goes into the departure record.
    joined: Option<String>,
    ended: bool,
}

impl Membership {
    /// Just before the registry claim is asked for.
    pub(super) fn claimed(
        gw: Arc<Gateway>,
        space: SpaceId,
        participant: ParticipantId,
        conn: ConnectionId,
    ) -> Self {
        Membership {
            gw,
            space,
            participant,
            conn,
            registered: false,
            joined: None,
            ended: false,
        }
    }

    pub(super) fn space(&self) -> &SpaceId {
        &self.space
    }

    pub(super) fn conn(&self) -> &ConnectionId {
        &self.conn
    }

    /// The claim is asked for another participant id (a `reconnect_id` that resumed
    /// nothing: a fresh join with a generated id).
    pub(super) fn set_participant(&mut self, participant: ParticipantId) {
        self.participant = participant;
    }

    /// The connection entry exists.
    pub(super) fn registered(&mut self) {
        self.registered = true;
    }

    /// The member is in the space.
    pub(super) fn joined(&mut self, credential: String) {
        self.joined = Some(credential);
    }

    /// The normal end: everything released, the registry last and awaited, so the id is
    /// free when this returns.
    pub(super) async fn end(mut self) {
        self.ended = true;
        // The departure record is written before the claim is released, so a reconnect
        // always finds one or the other.
        if let Some(credential) = self.release_local(false) {
            self.gw
                .record_departure(&self.space, &self.participant, &credential)
                .await;
        }
        if let Err(e) = self
            .gw
            .registry
            .release(&self.space, &self.participant, &self.conn)
            .await
        {
            tracing::error!(error = %e, "registry release failed");
        }
    }

    /// Connection entry and space membership; returns the credential for the departure
    /// record if the member was in the space (the caller writes it to the registry, which
    /// may be across the network). During a panic the space's own state may be what
    /// panicked: its leave runs on a task of its own then, not in the middle of the
    /// unwinding.
    fn release_local(&mut self, deferred: bool) -> Option<String> {
        if self.registered {
            lock(&self.gw.conns).remove(&self.conn);
        }
        let credential = self.joined.take()?;
        let (gw, space, conn) = (self.gw.clone(), self.space.clone(), self.conn.clone());
        let leave = move || gw.with_space(&space, |s, out| s.leave(&conn, out));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if deferred => {
                rt.spawn(async move { leave() });
            }
            _ => leave(),
        }
        Some(credential)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let departed = self.release_local(std::thread::panicking());
        let (gw, space, participant, conn) = (
            self.gw.clone(),
            self.space.clone(),
            self.participant.clone(),
            self.conn.clone(),
        );
        // Drop cannot await; the release is one registry operation. Without a runtime
        // (process exit) there is nothing left to release for.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some(credential) = departed {
                    gw.record_departure(&space, &participant, &credential).await;
                }
                let _ = gw.registry.release(&space, &participant, &conn).await;
            });
        }
    }
}
