use std::sync::Arc;

use spacegate_proto::signaling::{
    ActiveSpeakers, ClientMessage, ConnectionRef, CustomEvent, CustomEventRequest, Envelope,
    ErrorBody, IceServer, Joined, Limits, MAX_CUSTOM_EVENT_PAYLOAD, MAX_DISPLAY_NAME, Participant,
    ParticipantStatus, ParticipantUpdate, PendingTrack, RequestErrorType, ServerMessage,
    SfuDescription, Simulcast, SpeakingTrack, Track, TrackRef, TrackRefEvent,
};
use spacegate_proto::{ConnectionId, ParticipantId, Role, SessionId, SpaceId};

use crate::limiter::TokenBucket;

/// What every participant of a space is told in `joined`.
#[derive(Debug, Clone)]
pub struct SpaceConfig {
    pub limits: Limits,
    pub simulcast: Simulcast,
    pub ice_servers: Vec<IceServer>,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig {
            // The reference's suggested defaults (Mux's real values are not public).
            limits: Limits {
                custom_events_per_second: 10,
                default_track_limit: 1,
                seconds_per_set_display_name: 1,
            },
            simulcast: Simulcast::default(),
            ice_servers: Vec::new(),
        }
    }
}

/// An admitted connection, as the gateway hands it over after auth and the registry.
#[derive(Debug, Clone)]
pub struct Joiner {
    pub connection_id: ConnectionId,
    pub participant_id: ParticipantId,
    pub role: Role,
    pub display_name: String,
    /// `managed_subscriptions` from the URL: 0 manual, 1–20 automatic.
    pub managed_subscriptions: u8,
    /// True when this join replaces a stale connection of the same participant.
    pub reconnected: bool,
    /// The subscriber peer-connection offers for `joined.sub_sfus`, made by the media plane.
    pub sub_sfus: Vec<SfuDescription>,
}

/// What a call produced, in delivery order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// One serialized frame for one connection. Fan-out shares the text.
    Send { to: ConnectionId, frame: Arc<str> },
    /// The space went idle → active with this session id.
    Activated { session_id: SessionId },
    /// The last participant left.
    Idle,
    /// A message for the media plane.
    Media {
        from: ConnectionId,
        message: ClientMessage,
    },
    /// `member` enters the media plane (its room has media). Members of a space where
    /// nobody ever sent a media message are never handed to the media plane, so a node
    /// full of signaling-only participants costs the media plane nothing.
    MediaJoin {
        member: ConnectionId,
        /// `managed_subscriptions` of the join: 0 manual, 1–20 automatic.
        managed_subscriptions: u8,
        /// The client already answered the subscriber offer of its `joined`.
        answered_initial_offer: bool,
    },
    /// `member`, which had entered the media plane, left.
    MediaLeave { member: ConnectionId },
}

#[derive(Debug)]
struct Member {
    connection_id: ConnectionId,
    participant_id: ParticipantId,
    role: Role,
    display_name: String,
    status: ParticipantStatus,
    /// Published tracks, as the others know them.
    tracks: Vec<Track>,
    /// Announced with `pending_track` (mid → track), not yet published by the media plane.
    pending: Vec<(String, Track)>,
    custom_events: TokenBucket,
    last_name_change_ms: Option<u64>,
    managed_subscriptions: u8,
    /// Answered the subscriber offer of its `joined` while the space had no media (the
    /// media plane is told when the space gets media).
    answered_initial_offer: bool,
}

impl Member {
    fn media_join(&self) -> Output {
        Output::MediaJoin {
            member: self.connection_id.clone(),
            managed_subscriptions: self.managed_subscriptions,
            answered_initial_offer: self.answered_initial_offer,
        }
    }

    fn participant(&self) -> Participant {
        Participant {
            connection_id: self.connection_id.to_string(),
            participant_id: self.participant_id.to_string(),
            role: self.role.into(),
            status: self.status,
            display_name: self.display_name.clone(),
            tracks: self.tracks.clone(),
        }
    }
}

/// One space's signaling state. See the crate docs for the driving contract.
#[derive(Debug)]
pub struct Space {
    id: SpaceId,
    config: Arc<SpaceConfig>,
    session_id: Option<SessionId>,
    /// In join order, which is the order `joined.participants` lists them.
    members: Vec<Member>,
    next_sequence: u64,
    /// Whether the members are in the media plane: from the first media message of any
    /// member until the space empties.
    media: bool,
    /// `sfu_id` of the subscriber offer in `joined` (the same for every joiner).
    initial_sfu_id: Option<String>,
}

/// A mute change, passed on to the media plane.
fn mute_for_media(from: ConnectionId, tid: &str, muted: bool) -> (ConnectionId, ClientMessage) {
    let tid = tid.to_string();
    let message = if muted {
        ClientMessage::MuteTrack(tid)
    } else {
        ClientMessage::UnmuteTrack(tid)
    };
    (from, message)
}

fn frame(message: ServerMessage, request_id: Option<String>) -> Arc<str> {
    Envelope::with_request_id(message, request_id)
        .to_json()
        .into()
}

impl Space {
    pub fn new(id: SpaceId, config: Arc<SpaceConfig>) -> Self {
        Space {
            id,
            config,
            session_id: None,
            members: Vec::new(),
            next_sequence: 1,
            media: false,
            initial_sfu_id: None,
        }
    }

    pub fn id(&self) -> &SpaceId {
        &self.id
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn index(&self, connection: &ConnectionId) -> Option<usize> {
        self.members
            .iter()
            .position(|m| &m.connection_id == connection)
    }

    /// Whether the members are in the media plane (see [`Output::MediaJoin`]).
    pub fn has_media(&self) -> bool {
        self.media
    }

    /// A message for the media plane. The space's first one puts every member into the
    /// media plane first, in join order, so the media plane sees membership in the order
    /// it happened.
    fn send_to_media(
        &mut self,
        from: &ConnectionId,
        message: ClientMessage,
        out: &mut Vec<Output>,
    ) {
        if !self.media {
            self.media = true;
            for m in &self.members {
                out.push(m.media_join());
            }
        }
        out.push(Output::Media {
            from: from.clone(),
            message,
        });
    }

    fn to_others(&self, author: &ConnectionId, f: &Arc<str>, out: &mut Vec<Output>) {
        for m in self.members.iter().filter(|m| &m.connection_id != author) {
            out.push(Output::Send {
                to: m.connection_id.clone(),
                frame: f.clone(),
            });
        }
    }

    fn reply(
        to: &ConnectionId,
        message: ServerMessage,
        request_id: Option<String>,
        out: &mut Vec<Output>,
    ) {
        out.push(Output::Send {
            to: to.clone(),
            frame: frame(message, request_id),
        });
    }

    fn request_error(
        to: &ConnectionId,
        kind: RequestErrorType,
        message: &str,
        correlator: Option<String>,
        out: &mut Vec<Output>,
    ) {
        Self::reply(
            to,
            ServerMessage::Error(ErrorBody::request(kind, message, correlator)),
            None,
            out,
        );
    }

    /// Admits `joiner`: `joined` to it, then `participant_connected` to everyone else.
    /// `new_session` becomes the space's session id if this join activates the space.
    pub fn join(
        &mut self,
        joiner: Joiner,
        new_session: SessionId,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        if self.members.is_empty() {
            self.session_id = Some(new_session.clone());
            out.push(Output::Activated {
                session_id: new_session,
            });
        }
        let session_id = self
            .session_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let member = Member {
            connection_id: joiner.connection_id.clone(),
            participant_id: joiner.participant_id.clone(),
            role: joiner.role,
            display_name: joiner.display_name.clone(),
            status: if joiner.reconnected {
                ParticipantStatus::Reconnected
            } else {
                ParticipantStatus::Connected
            },
            tracks: Vec::new(),
            pending: Vec::new(),
            custom_events: TokenBucket::new(
                self.config.limits.custom_events_per_second,
                self.config.limits.custom_events_per_second,
                now_ms,
            ),
            last_name_change_ms: None,
            managed_subscriptions: joiner.managed_subscriptions,
            answered_initial_offer: false,
        };
        if self.initial_sfu_id.is_none() {
            self.initial_sfu_id = joiner.sub_sfus.first().map(|d| d.sfu_id.clone());
        }
        let joined = Joined {
            session_id,
            connection_id: joiner.connection_id.to_string(),
            participant_id: joiner.participant_id.to_string(),
            display_name: joiner.display_name,
            broadcasting: false,
            sub_sfus: joiner.sub_sfus,
            participants: self.members.iter().map(Member::participant).collect(),
            simulcast: self.config.simulcast.clone(),
            ice_servers: self.config.ice_servers.clone(),
            limits: self.config.limits.clone(),
            watchrtc_token: String::new(),
        };
        Self::reply(
            &joiner.connection_id,
            ServerMessage::Joined(Box::new(joined)),
            None,
            out,
        );
        let announce = frame(
            ServerMessage::ParticipantConnected(member.participant()),
            None,
        );
        self.to_others(&joiner.connection_id, &announce, out);
        // After `joined`: the media plane may offer tracks only to a client that knows them.
        if self.media {
            out.push(member.media_join());
        }
        self.members.push(member);
    }

    /// Removes a connection (socket closed, evicted, replaced). Unknown connections are
    /// ignored, so a double leave is harmless.
    pub fn leave(&mut self, connection: &ConnectionId, out: &mut Vec<Output>) {
        let Some(i) = self.index(connection) else {
            return;
        };
        let gone = self.members.remove(i);
        let f = frame(
            ServerMessage::ParticipantDisconnected(ConnectionRef {
                connection_id: gone.connection_id.to_string(),
            }),
            None,
        );
        self.to_others(&gone.connection_id, &f, out);
        if self.media {
            out.push(Output::MediaLeave {
                member: gone.connection_id,
            });
        }
        if self.members.is_empty() {
            self.session_id = None;
            self.media = false;
            out.push(Output::Idle);
        }
    }

    /// Handles one decoded message from `from`.
    pub fn handle(
        &mut self,
        from: &ConnectionId,
        envelope: Envelope<ClientMessage>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(i) = self.index(from) else {
            return;
        };
        let request_id = envelope.request_id;
        match envelope.message {
            ClientMessage::SetDisplayName(name) => {
                self.set_display_name(i, name, request_id, now_ms, out)
            }
            ClientMessage::CustomEvent(event) => {
                self.custom_event(i, event, request_id, now_ms, out)
            }
            ClientMessage::MuteTrack(tid) => self.set_muted(i, &tid, true, out),
            ClientMessage::UnmuteTrack(tid) => self.set_muted(i, &tid, false, out),
            ClientMessage::PendingTrack(track) => self.pending_track(i, track, out),
            ClientMessage::Offer(_) if self.members[i].role == Role::Subscriber => {
                Self::request_error(
                    from,
                    RequestErrorType::PendingTrackError,
                    "subscribers cannot publish",
                    None,
                    out,
                );
            }
            // The answer to the offer in `joined`, while nothing in the space has media:
            // noted, not passed on. The media plane would only record it (that offer has
            // no m-lines), and a real SDK sends one with every join, which would otherwise
            // put every space into the media plane.
            ClientMessage::SubAnswer(d)
                if !self.media
                    && !self.members[i].answered_initial_offer
                    && self.initial_sfu_id.as_deref() == Some(d.sfu_id.as_str()) =>
            {
                self.members[i].answered_initial_offer = true;
            }
            message => self.send_to_media(from, message, out),
        }
    }

    fn set_display_name(
        &mut self,
        i: usize,
        name: String,
        request_id: Option<String>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let limit_ms = u64::from(self.config.limits.seconds_per_set_display_name) * 1000;
        let m = &mut self.members[i];
        let units = name.encode_utf16().count();
        // An empty name would come back falsy and the SDK would never resolve the request.
        if units == 0 || units > MAX_DISPLAY_NAME || name.chars().any(char::is_control) {
            let msg = format!(
                "display name must be 1 to {MAX_DISPLAY_NAME} characters, without control characters"
            );
            return Self::request_error(
                &m.connection_id,
                RequestErrorType::SetDisplayNameError,
                &msg,
                request_id,
                out,
            );
        }
        if m.last_name_change_ms
            .is_some_and(|last| now_ms < last.saturating_add(limit_ms))
        {
            return Self::request_error(
                &m.connection_id,
                RequestErrorType::SetDisplayNameRateLimited,
                "display name changes rate limited",
                request_id,
                out,
            );
        }
        m.last_name_change_ms = Some(now_ms);
        m.display_name = name.clone();
        let update = ParticipantUpdate {
            connection_id: m.connection_id.to_string(),
            display_name: name,
        };
        let author = m.connection_id.clone();
        self.to_others(
            &author,
            &frame(ServerMessage::ParticipantUpdate(update.clone()), None),
            out,
        );
        Self::reply(
            &author,
            ServerMessage::ParticipantUpdate(update),
            request_id,
            out,
        );
    }

    fn custom_event(
        &mut self,
        i: usize,
        event: CustomEventRequest,
        request_id: Option<String>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let m = &mut self.members[i];
        // The SDK correlates by request_id, which it sets to the event id.
        let correlator = request_id.clone().or_else(|| Some(event.id.clone()));
        if m.role == Role::Subscriber {
            return Self::request_error(
                &m.connection_id,
                RequestErrorType::CustomEventError,
                "only publishers can send custom events",
                correlator,
                out,
            );
        }
        if event.payload.len() > MAX_CUSTOM_EVENT_PAYLOAD {
            let msg =
                format!("custom event payload is larger than {MAX_CUSTOM_EVENT_PAYLOAD} bytes");
            return Self::request_error(
                &m.connection_id,
                RequestErrorType::CustomEventError,
                &msg,
                correlator,
                out,
            );
        }
        if !m.custom_events.try_take(now_ms) {
            return Self::request_error(
                &m.connection_id,
                RequestErrorType::CustomEventRateLimited,
                "custom events rate limited",
                correlator,
                out,
            );
        }
        let author = m.connection_id.clone();
        let sequence_num = self.next_sequence;
        self.next_sequence += 1;
        let event = CustomEvent {
            id: event.id,
            payload: event.payload,
            // The SDK only knows scope 1 (session); echo it as the author sent it.
            scope: event.scope,
            connection_id: author.to_string(),
            sequence_num,
        };
        self.to_others(
            &author,
            &frame(ServerMessage::CustomEvent(event.clone()), None),
            out,
        );
        Self::reply(&author, ServerMessage::CustomEvent(event), request_id, out);
    }

    fn set_muted(&mut self, i: usize, tid: &str, muted: bool, out: &mut Vec<Output>) {
        let m = &mut self.members[i];
        let author = m.connection_id.clone();
        if let Some((_, pending)) = m.pending.iter_mut().find(|(_, t)| t.tid == tid) {
            // Muted while still negotiating: remembered for when the track is published,
            // by us and by the media plane's ranking.
            pending.muted = muted;
            let (from, message) = mute_for_media(author, tid, muted);
            return self.send_to_media(&from, message, out);
        }
        let Some(track) = m.tracks.iter_mut().find(|t| t.tid == tid) else {
            return Self::request_error(
                &author,
                RequestErrorType::TrackMuteError,
                "unknown track",
                None,
                out,
            );
        };
        if track.muted == muted {
            return;
        }
        track.muted = muted;
        let event = TrackRefEvent {
            connection_id: author.to_string(),
            track: TrackRef {
                tid: tid.to_string(),
            },
        };
        // Never to the author: the SDK throws on its own connection's mute events.
        let message = if muted {
            ServerMessage::TrackMuted(event)
        } else {
            ServerMessage::TrackUnmuted(event)
        };
        self.to_others(&author, &frame(message, None), out);
        // The media plane ranks unmuted publishers first in automatic subscriptions.
        let (from, message) = mute_for_media(author, tid, muted);
        self.send_to_media(&from, message, out);
    }

    /// The media plane's speaker list, to everyone (the SDK also accepts its own
    /// connection, which makes the local participant emit speaking events).
    pub fn active_speakers(&mut self, tracks: Vec<SpeakingTrack>, out: &mut Vec<Output>) {
        // Entries of members that left between detection and now would be noise.
        let tracks = tracks
            .into_iter()
            .filter(|t| {
                self.members
                    .iter()
                    .any(|m| m.connection_id.as_str() == t.connection_id)
            })
            .collect();
        let f = frame(
            ServerMessage::ActiveSpeakers(ActiveSpeakers { tracks }),
            None,
        );
        for m in &self.members {
            out.push(Output::Send {
                to: m.connection_id.clone(),
                frame: f.clone(),
            });
        }
    }

    fn pending_track(&mut self, i: usize, p: PendingTrack, out: &mut Vec<Output>) {
        let track_limit = self.config.limits.default_track_limit as usize;
        let m = &mut self.members[i];
        let author = m.connection_id.clone();
        if m.role == Role::Subscriber {
            return Self::request_error(
                &author,
                RequestErrorType::PendingTrackError,
                "subscribers cannot publish",
                None,
                out,
            );
        }
        const SOURCES: &[&str] = &[
            "camera",
            "microphone",
            "screenshare",
            "screenshareaudio",
            "other",
        ];
        if !SOURCES.contains(&p.source.as_str()) {
            return Self::request_error(
                &author,
                RequestErrorType::PendingTrackError,
                "unknown track source",
                None,
                out,
            );
        }
        // The tid becomes the msid stream id in every subscriber's SDP, which allows only
        // token characters and 64 of them; anything else would reach subscribers altered
        // and the SDK would not recognise the track. SDK tids are UUIDs or track ids.
        let token = |c: char| c.is_ascii_alphanumeric() || "-_.{}".contains(c);
        if p.tid.is_empty() || p.tid.len() > 64 || !p.tid.chars().all(token) {
            return Self::request_error(
                &author,
                RequestErrorType::PendingTrackError,
                "track id must be 1 to 64 letters, digits or -_.{}",
                None,
                out,
            );
        }
        let same_source = m
            .tracks
            .iter()
            .chain(m.pending.iter().map(|(_, t)| t))
            .filter(|t| t.source == p.source && t.tid != p.tid)
            .count();
        if same_source >= track_limit {
            return Self::request_error(
                &author,
                RequestErrorType::PendingTrackError,
                "track limit per source reached",
                None,
                out,
            );
        }
        let track = Track {
            tid: p.tid,
            kind: p.kind,
            name: p.name,
            muted: p.muted,
            source: p.source,
            width: p.width,
            height: p.height,
        };
        // A re-sent pending_track (reconnect, renegotiation) replaces the earlier one.
        m.pending
            .retain(|(mid, t)| mid != &p.mid && t.tid != track.tid);
        m.pending.push((p.mid.clone(), track.clone()));
        let message = ClientMessage::PendingTrack(PendingTrack {
            tid: track.tid,
            kind: track.kind,
            name: track.name,
            muted: track.muted,
            source: track.source,
            height: track.height,
            width: track.width,
            mid: p.mid,
        });
        self.send_to_media(&author, message, out);
    }

    /// The media plane's report that a pending track is flowing: it becomes published and
    /// everyone else learns of it (`add_track`), before any offer could name it.
    pub fn track_published(&mut self, connection: &ConnectionId, tid: &str, out: &mut Vec<Output>) {
        let Some(i) = self.index(connection) else {
            return;
        };
        let m = &mut self.members[i];
        let Some(pos) = m.pending.iter().position(|(_, t)| t.tid == tid) else {
            return;
        };
        let (_, track) = m.pending.remove(pos);
        m.tracks.push(track.clone());
        let f = frame(
            ServerMessage::AddTrack(spacegate_proto::signaling::TrackEvent {
                connection_id: connection.to_string(),
                track,
            }),
            None,
        );
        self.to_others(connection, &f, out);
    }

    /// The media plane's report that a track stopped (unpublished in an offer).
    pub fn track_unpublished(
        &mut self,
        connection: &ConnectionId,
        tid: &str,
        out: &mut Vec<Output>,
    ) {
        let Some(i) = self.index(connection) else {
            return;
        };
        let m = &mut self.members[i];
        m.pending.retain(|(_, t)| t.tid != tid);
        let Some(pos) = m.tracks.iter().position(|t| t.tid == tid) else {
            return;
        };
        m.tracks.remove(pos);
        let f = frame(
            ServerMessage::RemoveTrack(TrackRefEvent {
                connection_id: connection.to_string(),
                track: TrackRef {
                    tid: tid.to_string(),
                },
            }),
            None,
        );
        self.to_others(connection, &f, out);
    }
}
