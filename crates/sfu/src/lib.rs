//! spacegate's media plane: a selective forwarding unit on str0m.
//!
//! Sans-IO like the rest of the core: the caller owns one UDP socket and the clock. It feeds
//! datagrams ([`Sfu::receive`]), time ([`Sfu::handle_timeout`]) and signaling (offers,
//! answers, subscriptions) in, and drains datagrams ([`Sfu::poll_transmit`]) and events
//! ([`Sfu::poll_event`]) out. It knows nothing of JWTs, WebSockets or the spaces-web message
//! format, so another media server can embed it: members and rooms are opaque strings.
//!
//! Each member has up to two peer connections, as the Spaces SDK expects:
//! - a *publisher* PC that the client offers and we answer (`offer`), receiving its tracks;
//! - a *subscriber* PC that we offer and the client answers (`sub_answer`), carrying the
//!   tracks forwarded to it. Only one offer is outstanding at a time; changes made while
//!   one is out are folded into the next.
//!
//! The subscriber PC's first offer is [`initial_offer`], an SDP without m-lines that
//! the caller puts in the join reply; the real str0m peer is created only when there is
//! something to forward, so idle members cost no DTLS or ICE state.
//!
//! **Cost follows media, not membership.** A member that never publishes or subscribes is a
//! map entry: timers live in an ordered set keyed by deadline (only due peers are touched),
//! the periodic speaker and layer pass visits only members with peer connections, the
//! forwarding index is updated per track, STUN from a new address is routed by its ICE
//! username in O(1), and renegotiation is scoped to the room it concerns. Nothing a command
//! does is proportional to the node's population.
//!
//! Modules, by concern:
//! - `members`: joining and leaving, the room lists;
//! - `peer`: driving one str0m peer connection, the timer set;
//! - `routing`: source-address and ICE-username demultiplexing, the per-peer flood guard;
//! - `publish`: the publisher PC (announced tracks, offers, mute state);
//! - `subscribe`: the subscriber PC (one offer at a time, sections, manual subscriptions);
//! - `policy`: which tracks a subscriber should get (manual, or automatic ranking);
//! - `forward`: the forwarding index, frame forwarding and simulcast layer choice;
//! - `keyframes`: the keyframe-request throttle;
//! - `speakers`: active-speaker detection from audio levels.

mod forward;
mod keyframes;
mod members;
mod peer;
mod policy;
mod publish;
mod routing;
mod speakers;
mod subscribe;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::RtcConfig;
use str0m::config::DtlsCert;
use str0m::media::{MediaKind, Mid, Rid};

pub use speakers::SPEAKING_DBOV;

/// A member (participant connection) or room, named by the embedding server.
pub type Name = Arc<str>;

/// Which kind of media a track carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    Audio,
    Video,
}

impl From<TrackKind> for MediaKind {
    fn from(k: TrackKind) -> MediaKind {
        match k {
            TrackKind::Audio => MediaKind::Audio,
            TrackKind::Video => MediaKind::Video,
        }
    }
}

/// How a member's subscriptions are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionMode {
    /// Only what the member asked for with [`Sfu::subscribe`].
    Manual,
    /// All tracks of at most this many other members, chosen by the SFU: speakers first,
    /// then recent speakers, then members with unmuted tracks, then by join order.
    Automatic(u8),
}

/// Which of a member's two peer connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerKind {
    Publisher,
    Subscriber,
}

#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The address peers send media to: our host candidate. Behind NAT or in a container,
    /// the public address; the socket may be bound elsewhere.
    pub candidate: SocketAddr,
    /// Minimum time between keyframe requests to one publisher layer. Subscribers ask on
    /// every loss; passing each on would make the publisher send nothing but keyframes.
    pub keyframe_interval: Duration,
    /// Datagrams per second one peer may send (twice that as a burst); beyond, dropped
    /// before any decryption, so a flooding publisher cannot starve the others.
    pub packets_per_second: u32,
    /// At most this many tracks in `active_speakers`.
    pub max_speakers: usize,
    /// How often speakers are re-evaluated.
    pub speaker_interval: Duration,
}

impl SfuConfig {
    pub fn new(candidate: SocketAddr) -> Self {
        SfuConfig {
            candidate,
            keyframe_interval: Duration::from_millis(500),
            packets_per_second: 2000,
            max_speakers: 3,
            speaker_interval: Duration::from_millis(200),
        }
    }
}

/// What the SFU asks its embedder to deliver, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SfuEvent {
    /// A new offer for `member`'s subscriber peer connection.
    SubOffer {
        room: Name,
        member: Name,
        sdp: String,
    },
    /// A track announced with `pending_track` is now received; tell the room before any
    /// offer names it (the SFU emits this before such offers).
    TrackPublished {
        room: Name,
        member: Name,
        tid: String,
    },
    /// The publisher stopped the track (inactive in its offer) or left.
    TrackUnpublished {
        room: Name,
        member: Name,
        tid: String,
    },
    /// A peer connection of `member` broke in a way only a new one can fix (a failed
    /// answer, a DTLS/SRTP error). The SDK builds new ones when it reconnects, so the
    /// embedder should close its signaling connection with a "reconnect" code.
    PeerFailed { room: Name, member: Name },
    /// The room's speaking audio tracks changed: `(member, tid)`, loudest first.
    ActiveSpeakers {
        room: Name,
        speakers: Vec<(Name, String)>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SfuError {
    #[error("unknown member")]
    UnknownMember,
    #[error("malformed SDP: {0}")]
    BadSdp(String),
    #[error("the offer could not be accepted: {0}")]
    Rejected(String),
    #[error("no offer is outstanding on this peer connection")]
    NoOfferOutstanding,
    #[error("malformed ICE candidate: {0}")]
    BadCandidate(String),
    #[error("no such peer connection")]
    NoPeer,
}

/// Counters, for tests (leaks) and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SfuStats {
    pub members: usize,
    pub rooms: usize,
    pub peer_connections: usize,
    pub published_tracks: usize,
    /// (publisher track → subscriber) forwarding entries.
    pub forwards: usize,
    pub forwarded_frames: u64,
    /// Payload bytes of the forwarded frames.
    pub forwarded_bytes: u64,
    pub keyframe_requests_sent: u64,
    pub dropped_datagrams: u64,
    /// Calls to `handle_timeout`: a busy loop shows here.
    pub timer_wakeups: u64,
}

/// A published track: (publisher slab index, publisher's join number, publisher mid).
/// The join number keeps a slot of a departed member from matching the next member
/// that reuses its index and mids (a reconnect re-publishes on the same mids).
type TrackKey = (usize, u64, Mid);

#[derive(Debug)]
struct PubTrack {
    tid: String,
    kind: TrackKind,
    active: bool,
    muted: bool,
    /// Simulcast layers as offered, lowest first as the SDK orders them.
    rids: Vec<Rid>,
    /// Layers that sent media recently.
    live_rids: HashMap<Rid, Instant>,
    /// Last keyframe request per layer (None = no rid).
    last_keyframe_request: HashMap<Option<Rid>, Instant>,
    level: speakers::Level,
}

#[derive(Debug)]
struct Member {
    name: Name,
    room: Name,
    joined_seq: u64,
    mode: SubscriptionMode,
    /// Boxed: a str0m `Rtc` is tens of kilobytes, and inline it would make every member
    /// slot that large whether or not it ever has media.
    publisher: Option<Box<peer::Peer>>,
    /// mid → (tid, kind, muted) from `pending_track` (and mute messages before publish).
    announced: HashMap<Mid, (String, TrackKind, bool)>,
    tracks: HashMap<Mid, PubTrack>,
    subscriber: Option<Box<peer::Peer>>,
    negotiation: subscribe::Negotiation,
    slots: Vec<subscribe::Slot>,
    /// Manual subscriptions: (publisher member, tid).
    manual: HashSet<(Name, String)>,
    last_spoke: Option<Instant>,
    /// What `routing` indexed for this member, so leaving removes exactly that.
    routes: routing::MemberRoutes,
}

impl Member {
    fn peer_mut(&mut self, kind: PeerKind) -> Option<&mut peer::Peer> {
        match kind {
            PeerKind::Publisher => self.publisher.as_deref_mut(),
            PeerKind::Subscriber => self.subscriber.as_deref_mut(),
        }
    }

    fn has_active_tracks(&self) -> bool {
        self.tracks.values().any(|t| t.active)
    }
}

#[derive(Debug, Default)]
struct Room {
    members: Vec<usize>,
    speakers: Vec<(usize, Mid)>,
}

/// The media plane of one node. See the crate docs.
#[derive(Debug)]
pub struct Sfu {
    config: SfuConfig,
    rtc_config: RtcConfig,
    members: Vec<Option<Member>>,
    free: Vec<usize>,
    by_name: HashMap<Name, usize>,
    rooms: HashMap<Name, Room>,
    /// Members with at least one peer connection: the only ones the periodic pass visits.
    with_peers: BTreeSet<usize>,
    /// Peer connections open now.
    peers: usize,
    routing: routing::Routing,
    timers: peer::Timers,
    forwards: forward::Index,
    transmits: VecDeque<str0m::net::Transmit>,
    events: VecDeque<SfuEvent>,
    next_join: u64,
    next_speaker_tick: Instant,
    stats: SfuStats,
}

/// The subscriber peer connection's first offer: a session without m-lines, which
/// browsers accept. Put it in the join reply; its answer goes to [`Sfu::sub_answer`], and
/// the real str0m peer is made only when there is something to send.
pub fn initial_offer(session_id: u64) -> String {
    format!("v=0\r\no=- {session_id} 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
}

fn rtc_config(cert: Option<DtlsCert>) -> RtcConfig {
    let provider = Arc::new(str0m::crypto::from_feature_flags());
    let mut c = RtcConfig::new()
        .set_crypto_provider(provider)
        // ICE-lite: we only answer checks, on one public host candidate; clients (browsers
        // behind NAT included) always initiate, which is what makes one UDP port enough.
        .set_ice_lite(true)
        .set_stats_interval(None);
    if let Some(cert) = cert {
        c = c.set_dtls_cert(cert);
    }
    c
}

impl Sfu {
    pub fn new(config: SfuConfig, now: Instant) -> Self {
        // One certificate for every peer: generating an ECDSA key per peer connection
        // would be the most expensive step of a join, and the fingerprint only has to
        // identify this server.
        let provider = str0m::crypto::from_feature_flags();
        let cert = provider.dtls_provider.generate_certificate();
        Sfu {
            config,
            rtc_config: rtc_config(cert),
            members: Vec::new(),
            free: Vec::new(),
            by_name: HashMap::new(),
            rooms: HashMap::new(),
            with_peers: BTreeSet::new(),
            peers: 0,
            routing: routing::Routing::default(),
            timers: peer::Timers::default(),
            forwards: forward::Index::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_join: 0,
            next_speaker_tick: now,
            stats: SfuStats::default(),
        }
    }

    /// Counters. Visits only members with peer connections, so it is cheap to scrape.
    pub fn stats(&self) -> SfuStats {
        let live = self
            .with_peers
            .iter()
            .filter_map(|i| self.members.get(*i)?.as_ref());
        SfuStats {
            published_tracks: live
                .map(|m| m.tracks.values().filter(|t| t.active).count())
                .sum(),
            ..self.counters()
        }
    }

    /// The counters of [`Sfu::stats`] that cost O(1) to read (members, rooms, peer
    /// connections, forwards and the running totals), for a driver that reads them after
    /// every turn of its loop.
    pub fn counters(&self) -> SfuStats {
        SfuStats {
            members: self.by_name.len(),
            rooms: self.rooms.len(),
            peer_connections: self.peers,
            forwards: self.forwards.len(),
            ..self.stats
        }
    }

    /// Whether `member` has a peer connection: a member that has none can be recreated in
    /// a fresh `Sfu` without the client noticing (see [`Sfu::join_stable`]).
    pub fn has_peers(&self, member: &str) -> bool {
        self.idx(member).is_ok_and(|i| self.with_peers.contains(&i))
    }

    /// Whether `member`'s client has answered the join's [`initial_offer`] already.
    pub fn answered_initial_offer(&self, member: &str) -> bool {
        self.idx(member)
            .is_ok_and(|i| !matches!(self.member(i).negotiation, subscribe::Negotiation::Initial))
    }

    /// Every member: (room, member, mode).
    pub fn members(&self) -> impl Iterator<Item = (&Name, &Name, SubscriptionMode)> {
        self.members
            .iter()
            .flatten()
            .map(|m| (&m.room, &m.name, m.mode))
    }

    fn idx(&self, member: &str) -> Result<usize, SfuError> {
        self.by_name
            .get(member)
            .copied()
            .ok_or(SfuError::UnknownMember)
    }

    fn member(&self, i: usize) -> &Member {
        self.members[i].as_ref().expect("live member index")
    }

    fn member_mut(&mut self, i: usize) -> &mut Member {
        self.members[i].as_mut().expect("live member index")
    }

    pub fn poll_transmit(&mut self) -> Option<str0m::net::Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_without_media_is_small() {
        // Every joined connection holds one member slot; a str0m `Rtc` inline (tens of
        // kilobytes, twice) made that the largest cost of an idle participant.
        let size = std::mem::size_of::<Option<Member>>();
        assert!(size <= 1024, "a member slot is {size} bytes");
    }
}
