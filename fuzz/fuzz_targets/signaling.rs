//! Client frames as a stranger sends them, through the frame decoder into a space's
//! signaling state machine, with members joining, leaving and rejoining in between.
//!
//! Input: frames separated by `0xFF` (a byte no UTF-8 text contains). The first byte of a
//! frame is a control byte, the rest the frame's text:
//! - `c & 3` in 0..=2: member slot `c & 3` sends the text (decoded with
//!   `Envelope::<ClientMessage>::decode_client`, invalid UTF-8 and refused frames skipped)
//!   after the clock advanced by `(c >> 2) * 25` ms;
//! - `c & 3 == 3`: a space-level event, `(c >> 2) & 7` picks which, `c >> 5` is its argument
//!   (leave, rejoin, media-plane reports, active speakers, a long pause, a frame from a
//!   connection that is not in the space, a rejoin with the text as display name).
//!
//! Checked after every call: no panic; every frame goes to a current member, decodes as a
//! server message and fits in `MAX_FRAME_BYTES`; media-plane outputs name current members;
//! `Activated` only on a join into an empty space, `Idle` only when it is empty again.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use spacegate_proto::signaling::{
    ClientMessage, Envelope, MAX_DISPLAY_NAME, MAX_FRAME_BYTES, SfuDescription, SpeakingTrack,
};
use spacegate_proto::{ConnectionId, ParticipantId, Role, SessionId, SpaceId};
use spacegate_signaling::{Joiner, Output, Space, SpaceConfig};

/// Frames per input; more only makes an input slower, not different.
const MAX_FRAMES: usize = 64;
/// The `sfu_id` the server puts in `joined` (spacegate_server::media::SFU_ID).
const SFU_ID: &str = "sfu-0";

struct Slot {
    participant: ParticipantId,
    role: Role,
    managed: u8,
    /// The current connection, if joined.
    conn: Option<ConnectionId>,
    /// Connections so far, to make each new one distinct.
    generation: u32,
}

struct Harness {
    space: Space,
    slots: Vec<Slot>,
    now_ms: u64,
    sessions: u32,
    /// `pending_track` messages the media plane got: (connection, tid).
    pending: Vec<(ConnectionId, String)>,
    /// Tracks reported published: (connection, tid).
    published: Vec<(ConnectionId, String)>,
}

impl Harness {
    fn new() -> Self {
        let space = Space::new(
            SpaceId::new("fuzz-space").expect("space id"),
            Arc::new(SpaceConfig::default()),
        );
        let slot = |name: &str, role, managed| Slot {
            participant: ParticipantId::new(name).expect("participant id"),
            role,
            managed,
            conn: None,
            generation: 0,
        };
        let mut h = Harness {
            space,
            slots: vec![
                slot("alice", Role::Publisher, 16),
                slot("bob", Role::Publisher, 0),
                slot("carol@example.com", Role::Subscriber, 2),
            ],
            now_ms: 0,
            sessions: 0,
            pending: Vec::new(),
            published: Vec::new(),
        };
        for i in 0..h.slots.len() {
            h.join(i, false, None);
        }
        h
    }

    fn members(&self) -> HashSet<ConnectionId> {
        self.slots.iter().filter_map(|s| s.conn.clone()).collect()
    }

    fn join(&mut self, i: usize, reconnected: bool, display_name: Option<String>) {
        let mut out = Vec::new();
        // A participant that is connected again replaces its old connection, as the
        // gateway does: the old one leaves first.
        if let Some(old) = self.slots[i].conn.take() {
            self.call(|s, out| s.leave(&old, out), &mut out);
        }
        let slot = &mut self.slots[i];
        slot.generation += 1;
        let conn = ConnectionId::new(format!("c{i}-{}", slot.generation)).expect("connection id");
        let joiner = Joiner {
            connection_id: conn.clone(),
            participant_id: slot.participant.clone(),
            role: slot.role,
            display_name: display_name.unwrap_or_else(|| format!("{}-name", slot.participant)),
            managed_subscriptions: slot.managed,
            reconnected,
            sub_sfus: vec![SfuDescription {
                sfu_id: SFU_ID.into(),
                sdp: spacegate_sfu::initial_offer(u64::from(self.sessions)),
            }],
        };
        slot.conn = Some(conn);
        self.sessions += 1;
        let session = SessionId::new(format!("s{}", self.sessions)).expect("session id");
        let now = self.now_ms;
        self.call(|s, out| s.join(joiner, session, now, out), &mut out);
    }

    fn leave(&mut self, i: usize) {
        if let Some(old) = self.slots[i].conn.take() {
            self.call(|s, out| s.leave(&old, out), &mut Vec::new());
        }
    }

    /// Runs one call on the space and checks its outputs against the membership after it.
    fn call(&mut self, f: impl FnOnce(&mut Space, &mut Vec<Output>), out: &mut Vec<Output>) {
        let was_empty = self.space.is_empty();
        let start = out.len();
        f(&mut self.space, out);
        let members = self.members();
        assert_eq!(
            self.space.is_empty(),
            members.is_empty(),
            "the space and the harness disagree on who is in it"
        );
        if self.space.is_empty() {
            assert!(!self.space.has_media(), "an empty space still has media");
        }
        for o in &out[start..] {
            match o {
                Output::Send { to, frame } => {
                    assert!(members.contains(to), "frame to non-member {to}: {frame}");
                    assert!(
                        frame.len() <= MAX_FRAME_BYTES,
                        "frame of {} bytes exceeds MAX_FRAME_BYTES",
                        frame.len()
                    );
                    if let Err(e) = Envelope::decode_server(frame) {
                        panic!("server frame does not decode ({e}): {frame}");
                    }
                }
                Output::Activated { .. } => {
                    assert!(was_empty, "Activated while the space had members")
                }
                Output::Idle => assert!(self.space.is_empty(), "Idle while members remain"),
                Output::Media { from, message } => {
                    assert!(
                        members.contains(from),
                        "media message from non-member {from}"
                    );
                    if let ClientMessage::PendingTrack(p) = message {
                        self.pending.push((from.clone(), p.tid.clone()));
                    }
                }
                Output::MediaJoin { member, .. } => {
                    assert!(members.contains(member), "MediaJoin of non-member {member}")
                }
                Output::MediaLeave { member } => {
                    assert!(!members.contains(member), "MediaLeave of a member {member}")
                }
            }
        }
    }

    fn frame(&mut self, from: ConnectionId, text: &[u8]) {
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        let Ok(envelope) = Envelope::<ClientMessage>::decode_client(text) else {
            return;
        };
        let now = self.now_ms;
        self.call(
            |s, out| s.handle(&from, envelope, now, out),
            &mut Vec::new(),
        );
    }

    fn step(&mut self, control: u8, text: &[u8]) {
        let who = usize::from(control & 3);
        if who < 3 {
            self.now_ms += u64::from(control >> 2) * 25;
            // Not joined: the frame comes from its last connection, which the space must
            // ignore (a frame racing its connection's leave).
            let slot = &self.slots[who];
            let from = slot.conn.clone().unwrap_or_else(|| {
                ConnectionId::new(format!("c{who}-{}", slot.generation.max(1)))
                    .expect("connection id")
            });
            return self.frame(from, text);
        }
        let arg = usize::from(control >> 5);
        let text_str = std::str::from_utf8(text).ok();
        match (control >> 2) & 7 {
            0 => self.leave(arg % 3),
            1 => self.join(arg % 3, arg >= 3, None),
            2 => {
                // The media plane reports a track flowing.
                let pick = match text_str.filter(|t| !t.is_empty()) {
                    Some(tid) => self.slots[arg % 3]
                        .conn
                        .clone()
                        .map(|c| (c, tid.to_string())),
                    None if self.pending.is_empty() => None,
                    None => Some(self.pending[arg % self.pending.len()].clone()),
                };
                if let Some((conn, tid)) = pick {
                    self.published.push((conn.clone(), tid.clone()));
                    self.call(
                        |s, out| s.track_published(&conn, &tid, out),
                        &mut Vec::new(),
                    );
                }
            }
            3 => {
                let pick = match text_str.filter(|t| !t.is_empty()) {
                    Some(tid) => self.slots[arg % 3]
                        .conn
                        .clone()
                        .map(|c| (c, tid.to_string())),
                    None if self.published.is_empty() => None,
                    None => Some(self.published[arg % self.published.len()].clone()),
                };
                if let Some((conn, tid)) = pick {
                    self.call(
                        |s, out| s.track_unpublished(&conn, &tid, out),
                        &mut Vec::new(),
                    );
                }
            }
            4 => {
                // Speakers: what was published (some of it by members who left since),
                // plus whatever the text names.
                let mut tracks: Vec<SpeakingTrack> = self
                    .published
                    .iter()
                    .skip(arg)
                    .map(|(c, tid)| SpeakingTrack {
                        connection_id: c.to_string(),
                        track_id: tid.clone(),
                    })
                    .collect();
                if let Some(t) = text_str.filter(|t| !t.is_empty()) {
                    tracks.push(SpeakingTrack {
                        connection_id: t.to_string(),
                        track_id: t.to_string(),
                    });
                }
                self.call(|s, out| s.active_speakers(tracks, out), &mut Vec::new());
            }
            5 => self.now_ms += (arg as u64 + 1) * 10_000,
            6 => {
                let ghost = ConnectionId::new("ghost").expect("connection id");
                self.frame(ghost, text);
            }
            _ => {
                // A rejoin with a display name from the text, as the gateway admits one
                // (at most MAX_DISPLAY_NAME UTF-16 units, no control characters).
                if let Some(name) = text_str.filter(|n| {
                    !n.is_empty()
                        && n.encode_utf16().count() <= MAX_DISPLAY_NAME
                        && !n.chars().any(char::is_control)
                }) {
                    self.join(arg % 3, true, Some(name.to_string()));
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new();
    for frame in data.split(|&b| b == 0xFF).take(MAX_FRAMES) {
        let Some((&control, text)) = frame.split_first() else {
            continue;
        };
        h.step(control, text);
    }
    // Everyone leaves: the space must end empty and idle.
    for i in 0..3 {
        h.leave(i);
    }
    assert!(h.space.is_empty());
    assert!(!h.space.has_media());
});
