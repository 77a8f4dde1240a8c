//! Joining and leaving. Both cost what the member and its room hold, never what the node
//! holds: a member without media leaves behind nothing to scan.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::subscribe::Negotiation;
use crate::{Member, Name, Sfu, SfuEvent, SubscriptionMode};

impl Sfu {
    /// Adds a member to `room`. A name already present is replaced (its peers closed).
    /// Its client is expected to answer [`crate::initial_offer`] first.
    pub fn join(&mut self, room: &str, member: &str, mode: SubscriptionMode, now: Instant) {
        self.add_member(room, member, mode, Negotiation::Initial, now);
    }

    /// Like [`Sfu::join`], for a client whose subscriber connection already answered the
    /// initial offer (and has nothing else): used to rebuild a media plane after a restart
    /// without asking clients that had no media to reconnect.
    pub fn join_stable(&mut self, room: &str, member: &str, mode: SubscriptionMode, now: Instant) {
        self.add_member(room, member, mode, Negotiation::Stable, now);
    }

    fn add_member(
        &mut self,
        room: &str,
        member: &str,
        mode: SubscriptionMode,
        negotiation: Negotiation,
        now: Instant,
    ) {
        if self.by_name.contains_key(member) {
            self.leave(member, now);
        }
        let name: Name = member.into();
        let room: Name = room.into();
        let m = Member {
            name: name.clone(),
            room: room.clone(),
            joined_seq: self.next_join,
            mode,
            publisher: None,
            announced: HashMap::new(),
            tracks: HashMap::new(),
            subscriber: None,
            negotiation,
            slots: Vec::new(),
            manual: HashSet::new(),
            last_spoke: None,
            routes: Default::default(),
        };
        self.next_join += 1;
        let i = match self.free.pop() {
            Some(i) => {
                self.members[i] = Some(m);
                i
            }
            None => {
                self.members.push(Some(m));
                self.members.len() - 1
            }
        };
        self.by_name.insert(name, i);
        self.rooms.entry(room).or_default().members.push(i);
        // Newcomers in automatic mode get the room's tracks once their first answer is in.
        self.renegotiate(i, now);
    }

    /// Removes a member: its tracks are unpublished everywhere, its peers closed, and
    /// every subscriber that received them renegotiated.
    pub fn leave(&mut self, member: &str, now: Instant) {
        let Some(i) = self.by_name.remove(member) else {
            return;
        };
        self.close_peers(i);
        let Some(mut m) = self.members[i].take() else {
            return;
        };
        self.free.push(i);
        self.routing.remove_member(&mut m.routes);
        for (n, slot) in m.slots.iter().enumerate() {
            if let (Some(key), true) = (slot.track, slot.negotiated) {
                self.forwards.remove(key, (i, n));
            }
        }
        let room_name = m.room.clone();
        let had_tracks = !m.tracks.is_empty();
        for (mid, t) in &m.tracks {
            self.forwards.remove_track((i, m.joined_seq, *mid));
            if t.active {
                self.events.push_back(SfuEvent::TrackUnpublished {
                    room: room_name.clone(),
                    member: m.name.clone(),
                    tid: t.tid.clone(),
                });
            }
        }
        let others = match self.rooms.get_mut(&room_name) {
            Some(room) => {
                room.members.retain(|x| *x != i);
                let had_speaker = room.speakers.iter().any(|(p, _)| *p == i);
                room.speakers.retain(|(p, _)| *p != i);
                if had_speaker {
                    self.emit_speakers(&room_name);
                }
                self.rooms[&room_name].members.clone()
            }
            None => Vec::new(),
        };
        if others.is_empty() {
            self.rooms.remove(&room_name);
        }
        for o in others {
            let om = self.member_mut(o);
            om.manual.retain(|(p, _)| p != &m.name);
            // Only a member that published changes what the others should receive; a
            // signaling-only member's leave renegotiates nobody.
            if had_tracks {
                self.renegotiate(o, now);
            }
        }
    }
}
