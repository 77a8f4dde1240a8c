//! The WebSocket messages of `@mux/spaces-web` 1.2.0, one enum per direction.
//!
//! Wire shape: one JSON object per text frame, `{"<message_name>": <payload>}` plus an
//! optional top-level `request_id`. The enums below are externally tagged, which is exactly
//! that shape; [`Envelope`] adds the `request_id`. Field names and integer enums follow
//! `spaces-wire-protocol.md`; `proto/README.md` is our own description of the protocol.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Largest text frame either side accepts. The biggest legitimate messages are SDPs: about
/// 3 KiB per video m-section with a browser's codec list, and the SDK never reuses a
/// transceiver, so a long meeting's publisher offer grows by one section per publish.
/// 256 KiB is some 80 sections while still bounding per-frame work.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;

/// Longest display name, in UTF-16 code units as the SDK counts them.
pub const MAX_DISPLAY_NAME: usize = 64;

/// Longest custom-event payload, in bytes, as the SDK enforces client-side.
pub const MAX_CUSTOM_EVENT_PAYLOAD: usize = 4096;

// Caps on every other client string or list that is fanned out, stored or echoed, checked
// when a frame is decoded ([`Envelope::decode_client`]): without them one frame just under
// `MAX_FRAME_BYTES` could carry a 256 KiB `id` that a space copies to 99 others, ten times
// a second. Each is far above what the SDK sends (UUIDs, browser mids, a few tracks).

/// Longest `request_id` (the SDK's are UUIDs, 36 bytes), in bytes.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest custom-event `id` (the SDK's are UUIDs), in bytes.
pub const MAX_CUSTOM_EVENT_ID: usize = 128;
/// Longest track id (`pending_track`, `mute_track`, subscriptions), in bytes: it becomes an
/// SDP msid, which allows 64.
pub const MAX_TRACK_ID: usize = 64;
/// Longest track `name` in `pending_track` (sent to everyone in `add_track`), in bytes.
pub const MAX_TRACK_NAME: usize = 256;
/// Longest `mid` (browsers use small integers), in bytes: the SFU's mids hold 16.
pub const MAX_MID: usize = 16;
/// Longest SDP in `offer` and `sub_answer`, in bytes: some 60 m-sections.
pub const MAX_SDP_BYTES: usize = 192 * 1024;
/// Longest ICE candidate line, `sdp_mid`, `username_fragment` or `sfu_id`, in bytes.
pub const MAX_CANDIDATE_BYTES: usize = 1024;
/// Most connections named in one `subscribe_tracks` / `unsubscribe_tracks`.
pub const MAX_SUBSCRIBE_CONNECTIONS: usize = 100;
/// Most track ids per connection in one `subscribe_tracks` / `unsubscribe_tracks`.
pub const MAX_SUBSCRIBE_TRACKS: usize = 16;

// ---------------------------------------------------------------------------------------
// Integer enums

macro_rules! int_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $value:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub enum $name { $($variant = $value),* }

        impl TryFrom<i64> for $name {
            type Error = String;
            fn try_from(v: i64) -> Result<Self, String> {
                match v {
                    $($value => Ok($name::$variant),)*
                    other => Err(format!("{} {other} is not one of {:?}", stringify!($name), [$($value),*])),
                }
            }
        }

        impl From<$name> for i64 {
            fn from(v: $name) -> i64 {
                v as i64
            }
        }
    };
}

int_enum!(
    /// Track kind: 1 audio, 2 video.
    TrackKind { Audio = 1, Video = 2 }
);
int_enum!(
    /// Participant role as the SDK numbers it.
    ParticipantRole { Publisher = 1, Subscriber = 2 }
);
int_enum!(
    /// Participant status: 1 connected, 3 reconnected.
    ParticipantStatus { Connected = 1, Disconnected = 2, Reconnected = 3 }
);
int_enum!(
    /// `candidate.type`: 1 a subscriber peer connection (by `sfu_id`), 2 the publisher one.
    CandidateTarget { Subscriber = 1, Publisher = 2 }
);
int_enum!(
    /// `broadcast_state_update`: 1 started, 2 ended (0 would be falsy and dropped).
    BroadcastState { Started = 1, Ended = 2 }
);

impl From<crate::Role> for ParticipantRole {
    fn from(r: crate::Role) -> Self {
        match r {
            crate::Role::Publisher => ParticipantRole::Publisher,
            crate::Role::Subscriber => ParticipantRole::Subscriber,
        }
    }
}

/// `error.type` before `joined`: the SDK's internal enum. Only 3, 6 and 7 keep their
/// message in the error the app sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinErrorType {
    Unknown = 0,
    Disconnected = 1,
    HitTimeLimit = 2,
    DuplicateParticipantRejected = 3,
    PeerConnectionClosed = 4,
    InvalidPendingTrack = 5,
    InvalidJwt = 6,
    ParticipantLimitReached = 7,
}

/// `error.type` for a request after `joined`: the SDK's request enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestErrorType {
    Unknown = 0,
    PendingTrackError = 1,
    TrackMuteError = 2,
    SubscribeTracksError = 3,
    UnsubscribeTracksError = 4,
    CustomEventError = 5,
    CustomEventRateLimited = 6,
    SetDisplayNameError = 7,
    SetDisplayNameRateLimited = 8,
    InvalidProtocolVersion = 9,
}

// ---------------------------------------------------------------------------------------
// Shared shapes

/// Widths and heights arrive as JSON numbers that may be fractional; we keep whole pixels.
fn lenient_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 0.0 {
        Ok(v.min(f64::from(u32::MAX)) as u32)
    } else {
        Err(serde::de::Error::custom("expected a non-negative number"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    pub tid: String,
    #[serde(rename = "type")]
    pub kind: TrackKind,
    pub name: String,
    pub muted: bool,
    pub source: String,
    #[serde(deserialize_with = "lenient_u32")]
    pub width: u32,
    #[serde(deserialize_with = "lenient_u32")]
    pub height: u32,
}

/// Only `tid` is read in `remove_track`, `track_muted` and `track_unmuted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackRef {
    pub tid: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    pub connection_id: String,
    pub participant_id: String,
    pub role: ParticipantRole,
    pub status: ParticipantStatus,
    pub display_name: String,
    /// Must always be present, `[]` when empty: the SDK drops a participant without it.
    pub tracks: Vec<Track>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfuDescription {
    pub sfu_id: String,
    pub sdp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalEncoding {
    pub rid: String,
    pub max_bitrate: f64,
    pub scale_resolution_down_by: f64,
    pub max_framerate: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Simulcast {
    pub camera_encodings: Vec<SignalEncoding>,
    pub screenshare_encodings: Vec<SignalEncoding>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub custom_events_per_second: u32,
    /// Most tracks a participant may publish per source.
    pub default_track_limit: u32,
    pub seconds_per_set_display_name: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigCandidate {
    pub candidate: String,
    #[serde(default)]
    pub sdp_mline_index: Option<u32>,
    #[serde(default)]
    pub sdp_mid: Option<String>,
    #[serde(default)]
    pub username_fragment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateMessage {
    pub candidate: SigCandidate,
    #[serde(rename = "type")]
    pub target: CandidateTarget,
    pub sfu_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionTracks {
    pub connection_id: String,
    pub track_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestError {
    /// Comma-separated `request_id`s the error answers.
    pub correlator: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: u8,
    pub message: String,
    pub visibility: u8,
    pub fatal: bool,
    pub retry: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_error: Option<RequestError>,
}

impl ErrorBody {
    /// A refusal before `joined`: fatal, not retryable (the SDK would otherwise loop).
    pub fn join(kind: JoinErrorType, message: impl Into<String>) -> Self {
        ErrorBody {
            kind: kind as u8,
            message: message.into(),
            visibility: 1,
            fatal: true,
            retry: false,
            request_error: None,
        }
    }

    /// A refused request after `joined`: not fatal; `correlator` names the request.
    pub fn request(
        kind: RequestErrorType,
        message: impl Into<String>,
        correlator: Option<String>,
    ) -> Self {
        ErrorBody {
            kind: kind as u8,
            message: message.into(),
            visibility: 1,
            fatal: false,
            retry: false,
            request_error: correlator.map(|correlator| RequestError { correlator }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server → client

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    pub session_id: String,
    pub connection_id: String,
    pub participant_id: String,
    pub display_name: String,
    pub broadcasting: bool,
    /// Publishers need at least one: their publisher peer connection takes its `sfu_id`.
    pub sub_sfus: Vec<SfuDescription>,
    /// Everyone else in the space, never the recipient.
    pub participants: Vec<Participant>,
    pub simulcast: Simulcast,
    pub ice_servers: Vec<IceServer>,
    pub limits: Limits,
    /// Always empty: a non-empty value makes the SDK report to a third-party cloud.
    pub watchrtc_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRef {
    pub connection_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackEvent {
    pub connection_id: String,
    pub track: Track,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackRefEvent {
    pub connection_id: String,
    pub track: TrackRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeakingTrack {
    pub connection_id: String,
    pub track_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSpeakers {
    pub tracks: Vec<SpeakingTrack>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomEvent {
    pub id: String,
    pub payload: String,
    pub scope: u8,
    pub connection_id: String,
    pub sequence_num: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantUpdate {
    pub connection_id: String,
    pub display_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionReply {
    pub successes: Vec<ConnectionTracks>,
    pub failures: Vec<ConnectionTracks>,
}

/// Every message the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    Joined(Box<Joined>),
    ParticipantConnected(Participant),
    ParticipantDisconnected(ConnectionRef),
    AddTrack(TrackEvent),
    RemoveTrack(TrackRefEvent),
    SubOffer(SfuDescription),
    Candidate(CandidateMessage),
    Answer(String),
    TrackMuted(TrackRefEvent),
    TrackUnmuted(TrackRefEvent),
    PendingTrackAck(Value),
    ActiveSpeakers(ActiveSpeakers),
    CustomEvent(CustomEvent),
    ParticipantUpdate(ParticipantUpdate),
    BroadcastStateUpdate(BroadcastState),
    SubscribeTracks(SubscriptionReply),
    UnsubscribeTracks(SubscriptionReply),
    Error(ErrorBody),
}

// ---------------------------------------------------------------------------------------
// Client → server

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingTrack {
    pub tid: String,
    #[serde(rename = "type")]
    pub kind: TrackKind,
    pub name: String,
    pub muted: bool,
    pub source: String,
    #[serde(deserialize_with = "lenient_u32")]
    pub height: u32,
    #[serde(deserialize_with = "lenient_u32")]
    pub width: u32,
    pub mid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsRequest {
    pub connections: Vec<ConnectionTracks>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomEventRequest {
    pub id: String,
    pub payload: String,
    pub scope: u8,
}

/// Every message the client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    Offer(String),
    SubAnswer(SfuDescription),
    Candidate(CandidateMessage),
    PendingTrack(PendingTrack),
    MuteTrack(String),
    UnmuteTrack(String),
    SubscribeTracks(ConnectionsRequest),
    UnsubscribeTracks(ConnectionsRequest),
    SetDisplayName(String),
    CustomEvent(CustomEventRequest),
}

// ---------------------------------------------------------------------------------------
// Envelope

/// A message plus the optional top-level `request_id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope<M> {
    #[serde(flatten)]
    pub message: M,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is larger than {MAX_FRAME_BYTES} bytes")]
    TooLarge,
    #[error("frame is not a JSON object: {0}")]
    NotJson(String),
    #[error("request_id must be a string")]
    BadRequestId,
    #[error("a message has exactly one payload key besides request_id, found {0}")]
    KeyCount(usize),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("invalid {kind} payload: {reason}")]
    BadPayload { kind: String, reason: String },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} has more than {max} entries")]
    TooMany { what: &'static str, max: usize },
}

fn cap(what: &'static str, value: &str, max: usize) -> Result<(), DecodeError> {
    if value.len() > max {
        return Err(DecodeError::TooLong { what, max });
    }
    Ok(())
}

impl ClientMessage {
    /// Checks every client-controlled string and list against its cap (the `MAX_*`
    /// constants), so nothing oversized is stored or fanned out.
    pub fn check_caps(&self) -> Result<(), DecodeError> {
        match self {
            ClientMessage::Offer(sdp) => cap("offer SDP", sdp, MAX_SDP_BYTES),
            ClientMessage::SubAnswer(d) => {
                cap("sfu_id", &d.sfu_id, MAX_CANDIDATE_BYTES)?;
                cap("sub_answer SDP", &d.sdp, MAX_SDP_BYTES)
            }
            ClientMessage::Candidate(c) => {
                cap("candidate", &c.candidate.candidate, MAX_CANDIDATE_BYTES)?;
                cap("sfu_id", &c.sfu_id, MAX_CANDIDATE_BYTES)?;
                for v in [&c.candidate.sdp_mid, &c.candidate.username_fragment]
                    .into_iter()
                    .flatten()
                {
                    cap("candidate field", v, MAX_CANDIDATE_BYTES)?;
                }
                Ok(())
            }
            ClientMessage::PendingTrack(p) => {
                cap("track id", &p.tid, MAX_TRACK_ID)?;
                cap("track name", &p.name, MAX_TRACK_NAME)?;
                cap("track source", &p.source, MAX_TRACK_NAME)?;
                cap("mid", &p.mid, MAX_MID)
            }
            ClientMessage::MuteTrack(tid) | ClientMessage::UnmuteTrack(tid) => {
                cap("track id", tid, MAX_TRACK_ID)
            }
            ClientMessage::SubscribeTracks(r) | ClientMessage::UnsubscribeTracks(r) => {
                if r.connections.len() > MAX_SUBSCRIBE_CONNECTIONS {
                    return Err(DecodeError::TooMany {
                        what: "connections",
                        max: MAX_SUBSCRIBE_CONNECTIONS,
                    });
                }
                for c in &r.connections {
                    cap("connection_id", &c.connection_id, crate::ids::MAX_ID_LEN)?;
                    if c.track_ids.len() > MAX_SUBSCRIBE_TRACKS {
                        return Err(DecodeError::TooMany {
                            what: "track_ids",
                            max: MAX_SUBSCRIBE_TRACKS,
                        });
                    }
                    for t in &c.track_ids {
                        cap("track id", t, MAX_TRACK_ID)?;
                    }
                }
                Ok(())
            }
            // Counted in UTF-16 units by the space, which answers with the SDK's own
            // error type; this only stops what could never pass.
            ClientMessage::SetDisplayName(n) => cap("display name", n, MAX_DISPLAY_NAME * 4),
            ClientMessage::CustomEvent(e) => {
                cap("custom event id", &e.id, MAX_CUSTOM_EVENT_ID)?;
                // The space answers an oversized payload with the SDK's custom-event error.
                Ok(())
            }
        }
    }
}

impl<M: Serialize> Envelope<M> {
    pub fn new(message: M) -> Self {
        Envelope {
            message,
            request_id: None,
        }
    }

    pub fn with_request_id(message: M, request_id: Option<String>) -> Self {
        Envelope {
            message,
            request_id,
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys, no floats
        // that JSON cannot hold (all f64 fields come from JSON or our config).
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl<M: serde::de::DeserializeOwned> Envelope<M> {
    /// Parses one text frame, with errors precise enough to send back to the client.
    pub fn decode(text: &str, known: &[&str]) -> Result<Self, DecodeError> {
        if text.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge);
        }
        let mut map: serde_json::Map<String, Value> =
            serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let request_id = match map.remove("request_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(DecodeError::BadRequestId),
        };
        if map.len() != 1 {
            return Err(DecodeError::KeyCount(map.len()));
        }
        let kind = map.keys().next().cloned().unwrap_or_default();
        if !known.contains(&kind.as_str()) {
            return Err(DecodeError::UnknownType(kind));
        }
        let message =
            serde_json::from_value(Value::Object(map)).map_err(|e| DecodeError::BadPayload {
                kind: kind.clone(),
                reason: e.to_string(),
            })?;
        Ok(Envelope {
            message,
            request_id,
        })
    }
}

/// Wire names of the client messages, for [`Envelope::decode`].
pub const CLIENT_MESSAGE_TYPES: &[&str] = &[
    "offer",
    "sub_answer",
    "candidate",
    "pending_track",
    "mute_track",
    "unmute_track",
    "subscribe_tracks",
    "unsubscribe_tracks",
    "set_display_name",
    "custom_event",
];

/// Wire names of the server messages, for [`Envelope::decode`].
pub const SERVER_MESSAGE_TYPES: &[&str] = &[
    "joined",
    "participant_connected",
    "participant_disconnected",
    "add_track",
    "remove_track",
    "sub_offer",
    "candidate",
    "answer",
    "track_muted",
    "track_unmuted",
    "pending_track_ack",
    "active_speakers",
    "custom_event",
    "participant_update",
    "broadcast_state_update",
    "subscribe_tracks",
    "unsubscribe_tracks",
    "error",
];

impl Envelope<ClientMessage> {
    /// Decodes a client frame and checks its caps (`request_id` and
    /// [`ClientMessage::check_caps`]).
    pub fn decode_client(text: &str) -> Result<Self, DecodeError> {
        let envelope = Self::decode(text, CLIENT_MESSAGE_TYPES)?;
        if let Some(r) = &envelope.request_id {
            cap("request_id", r, MAX_REQUEST_ID)?;
        }
        envelope.message.check_caps()?;
        Ok(envelope)
    }
}

impl Envelope<ServerMessage> {
    pub fn decode_server(text: &str) -> Result<Self, DecodeError> {
        Self::decode(text, SERVER_MESSAGE_TYPES)
    }
}
