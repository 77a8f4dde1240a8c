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

mod speakers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::DtlsCert;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, MediaTime, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

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

/// Which of a member's peer connections a candidate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub keyframe_requests_sent: u64,
    pub dropped_datagrams: u64,
    /// Calls to `handle_timeout`: a busy loop shows here.
    pub timer_wakeups: u64,
}

/// Source addresses one peer connection may use.
const MAX_ROUTES_PER_PEER: usize = 8;

/// STUN checks per second from unknown addresses that may be matched against every peer
/// (each costs a scan); beyond that they are dropped until the budget refills.
const UNKNOWN_STUN_PER_SECOND: f64 = 1000.0;

/// A published track: (publisher slab index, publisher's join number, publisher mid).
/// The join number keeps a slot of a departed member from matching the next member
/// that reuses its index and mids (a reconnect re-publishes on the same mids).
type TrackKey = (usize, u64, Mid);

#[derive(Debug)]
struct Peer {
    rtc: Rtc,
    connected: bool,
    timeout: Instant,
    /// Flood guard: tokens left and when they were last refilled.
    tokens: f64,
    refilled: Instant,
}

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
struct Slot {
    mid: Mid,
    kind: TrackKind,
    /// The forwarded track; `None` while inactive.
    track: Option<TrackKey>,
    /// The track it last carried: only that track may bring it back to life (str0m fixes a
    /// section's stream id, the tid the SDK matches on, at creation), which keeps the SDP
    /// from growing when automatic mode swaps the same publishers in and out.
    last_track: Option<TrackKey>,
    /// Accepted by the client, so writable.
    negotiated: bool,
    /// The simulcast layer being forwarded, and the one to switch to at its next keyframe.
    layer: Option<Rid>,
    want_layer: Option<Rid>,
    /// Output RTP time = input + offset, rebased at layer switches so time never jumps.
    time_offset: i64,
    last_out: Option<(u64, Instant)>,
}

#[derive(Debug)]
enum Negotiation {
    /// The no-m-line offer from `initial_offer` is out.
    Initial,
    Stable,
    Offered(SdpPendingOffer),
}

#[derive(Debug)]
struct Member {
    name: Name,
    room: Name,
    joined_seq: u64,
    mode: SubscriptionMode,
    publisher: Option<Peer>,
    /// mid → (tid, kind, muted) from `pending_track` (and mute messages before publish).
    announced: HashMap<Mid, (String, TrackKind, bool)>,
    tracks: HashMap<Mid, PubTrack>,
    subscriber: Option<Peer>,
    negotiation: Negotiation,
    slots: Vec<Slot>,
    /// Manual subscriptions: (publisher member, tid).
    manual: HashSet<(Name, String)>,
    last_spoke: Option<Instant>,
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
    /// Source address → (member, peer kind), learned from the first STUN check.
    routes: HashMap<SocketAddr, (usize, PeerKind)>,
    /// Track → (subscriber, slot index), rebuilt when negotiations change.
    /// Shared, so the per-frame path takes a reference count, not a copy, and the list
    /// stays valid if forwarding re-enters (a keyframe request drains the publisher).
    forwards: HashMap<TrackKey, Arc<[(usize, usize)]>>,
    transmits: VecDeque<str0m::net::Transmit>,
    events: VecDeque<SfuEvent>,
    next_join: u64,
    next_speaker_tick: Instant,
    stats: SfuStats,
    /// Token bucket for unknown-source STUN: tokens and when last refilled.
    scan_tokens: f64,
    scan_refilled: Instant,
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
            routes: HashMap::new(),
            forwards: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_join: 0,
            next_speaker_tick: now,
            stats: SfuStats::default(),
            scan_tokens: UNKNOWN_STUN_PER_SECOND,
            scan_refilled: now,
        }
    }

    pub fn stats(&self) -> SfuStats {
        let live = self.members.iter().flatten();
        SfuStats {
            members: self.by_name.len(),
            rooms: self.rooms.len(),
            peer_connections: live
                .clone()
                .map(|m| usize::from(m.publisher.is_some()) + usize::from(m.subscriber.is_some()))
                .sum(),
            published_tracks: live
                .clone()
                .map(|m| m.tracks.values().filter(|t| t.active).count())
                .sum(),
            forwards: self.forwards.values().map(|v| v.len()).sum(),
            ..self.stats
        }
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

    /// Adds a member to `room`. A name already present is replaced (its peers closed).
    pub fn join(&mut self, room: &str, member: &str, mode: SubscriptionMode, now: Instant) {
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
            negotiation: Negotiation::Initial,
            slots: Vec::new(),
            manual: HashSet::new(),
            last_spoke: None,
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
        self.rooms.entry(room.clone()).or_default().members.push(i);
        // Newcomers in automatic mode get the room's tracks once their first answer is in.
        self.renegotiate(i, now);
    }

    /// Removes a member: its tracks are unpublished everywhere, its peers closed, and
    /// every subscriber that received them renegotiated.
    pub fn leave(&mut self, member: &str, now: Instant) {
        let Some(i) = self.by_name.remove(member) else {
            return;
        };
        let Some(mut m) = self.members[i].take() else {
            return;
        };
        self.free.push(i);
        self.routes.retain(|_, (mi, _)| *mi != i);
        for peer in [m.publisher.as_mut(), m.subscriber.as_mut()]
            .into_iter()
            .flatten()
        {
            // A graceful close sends RTCP BYE and DTLS close_notify, so a client that is
            // still there (an evicted ghost) learns at once instead of timing out.
            if peer.rtc.close().is_ok() {
                for _ in 0..64 {
                    match peer.rtc.poll_output() {
                        Ok(Output::Transmit(t)) => self.transmits.push_back(t),
                        Ok(Output::Event(_)) => {}
                        Ok(Output::Timeout(_)) | Err(_) => break,
                    }
                }
            }
            peer.rtc.disconnect();
        }
        let room_name = m.room.clone();
        for t in m.tracks.values().filter(|t| t.active) {
            self.events.push_back(SfuEvent::TrackUnpublished {
                room: room_name.clone(),
                member: m.name.clone(),
                tid: t.tid.clone(),
            });
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
        // Slots of others that carried this member's tracks go inactive.
        for o in others {
            let om = self.member_mut(o);
            om.manual.retain(|(p, _)| p != &m.name);
            self.renegotiate(o, now);
        }
        self.reindex();
    }

    /// Records `pending_track`: the section `mid` of the member's next offer is `tid`.
    pub fn pending_track(
        &mut self,
        member: &str,
        mid: &str,
        tid: &str,
        kind: TrackKind,
        muted: bool,
    ) {
        let Ok(i) = self.idx(member) else { return };
        let m = self.member_mut(i);
        let mid = Mid::from(mid);
        // A tid re-announced on another mid (reconnect re-publish) moves there.
        m.announced.retain(|_, (t, _, _)| t != tid);
        m.announced.insert(mid, (tid.to_string(), kind, muted));
    }

    /// Mute state of a published track: automatic mode prefers unmuted publishers.
    pub fn set_muted(&mut self, member: &str, tid: &str, muted: bool, now: Instant) {
        let Ok(i) = self.idx(member) else { return };
        let m = self.member_mut(i);
        for (t, _, pending_muted) in m.announced.values_mut() {
            if t == tid {
                *pending_muted = muted;
            }
        }
        let mut changed = false;
        for t in m.tracks.values_mut().filter(|t| t.tid == tid) {
            changed |= t.muted != muted;
            t.muted = muted;
        }
        if changed {
            let room = m.room.clone();
            self.renegotiate_automatic(&room, now);
        }
    }

    /// The publisher's offer; returns our answer. Tracks whose sections became receiving
    /// are published, sections no longer sending are unpublished, and the room's
    /// subscribers are renegotiated.
    pub fn offer(&mut self, member: &str, sdp: &str, now: Instant) -> Result<String, SfuError> {
        let i = self.idx(member)?;
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let candidate = self.config.candidate;
        let rtc_config = self.rtc_config.clone();
        let packets = f64::from(self.config.packets_per_second);
        let m = self.member_mut(i);
        let peer = m
            .publisher
            .get_or_insert_with(|| new_peer(rtc_config, candidate, packets, now));
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::Rejected(e.to_string()))?;
        // Which announced sections now receive media.
        let mut published = Vec::new();
        let mut unpublished = Vec::new();
        let mut stopped = Vec::new();
        let announced: Vec<(Mid, String, TrackKind, bool)> = m
            .announced
            .iter()
            .map(|(mid, (tid, k, muted))| (*mid, tid.clone(), *k, *muted))
            .collect();
        for (mid, tid, kind, muted) in announced {
            let Some(media) = peer.rtc.media(mid) else {
                continue;
            };
            let receiving = matches!(media.direction(), Direction::RecvOnly | Direction::SendRecv)
                && MediaKind::from(kind) == media.kind();
            let rids: Vec<Rid> = match media.rids_rx() {
                str0m::media::Rids::Specific(r) => r.clone(),
                _ => Vec::new(),
            };
            let entry = m.tracks.entry(mid).or_insert_with(|| PubTrack {
                tid: tid.clone(),
                kind,
                active: false,
                muted: false,
                rids: Vec::new(),
                live_rids: HashMap::new(),
                last_keyframe_request: HashMap::new(),
                level: speakers::Level::new(now),
            });
            entry.rids = rids;
            if receiving && (!entry.active || entry.tid != tid) {
                if entry.active {
                    unpublished.push(entry.tid.clone());
                }
                entry.tid = tid.clone();
                entry.active = true;
                entry.muted = muted;
                published.push(tid);
            } else if !receiving && entry.active {
                entry.active = false;
                unpublished.push(entry.tid.clone());
                // Publishing again takes a new `pending_track`, as the SDK always sends
                // (it never reuses a transceiver); a bare re-activation stays unforwarded.
                stopped.push(mid);
            }
        }
        for mid in stopped {
            m.announced.remove(&mid);
        }
        // Sections the client did not announce stay unforwarded (the reference: answer
        // the offer, leave the section alone).
        let room = m.room.clone();
        let name = m.name.clone();
        for tid in unpublished {
            self.events.push_back(SfuEvent::TrackUnpublished {
                room: room.clone(),
                member: name.clone(),
                tid,
            });
        }
        for tid in published {
            self.events.push_back(SfuEvent::TrackPublished {
                room: room.clone(),
                member: name.clone(),
                tid,
            });
        }
        self.drive(i, PeerKind::Publisher, now);
        self.renegotiate_room(&room, now);
        Ok(answer.to_sdp_string())
    }

    /// The member's answer to our latest subscriber offer.
    pub fn sub_answer(&mut self, member: &str, sdp: &str, now: Instant) -> Result<(), SfuError> {
        let i = self.idx(member)?;
        let m = self.member_mut(i);
        match std::mem::replace(&mut m.negotiation, Negotiation::Stable) {
            Negotiation::Initial => {}
            Negotiation::Stable => return Err(SfuError::NoOfferOutstanding),
            Negotiation::Offered(pending) => {
                let answer = match SdpAnswer::from_sdp_string(sdp) {
                    Ok(a) => a,
                    Err(e) => {
                        m.negotiation = Negotiation::Offered(pending);
                        return Err(SfuError::BadSdp(e.to_string()));
                    }
                };
                let Some(peer) = m.subscriber.as_mut() else {
                    return Err(SfuError::NoPeer);
                };
                if let Err(e) = peer.rtc.sdp_api().accept_answer(pending, answer) {
                    // str0m has consumed the offer and applied part of it: what the client
                    // and we hold no longer agree, and nothing short of a new peer
                    // connection (the SDK reconnects) can fix that.
                    let (room, name) = (m.room.clone(), m.name.clone());
                    self.events
                        .push_back(SfuEvent::PeerFailed { room, member: name });
                    return Err(SfuError::Rejected(e.to_string()));
                }
                let mut fresh = Vec::new();
                for (n, s) in m.slots.iter_mut().enumerate() {
                    if s.track.is_some() && !s.negotiated {
                        s.negotiated = true;
                        fresh.push(n);
                    }
                }
                self.reindex();
                self.drive(i, PeerKind::Subscriber, now);
                // Newly writable sections need a keyframe to start; the others have one.
                self.request_keyframes_for(i, &fresh, now);
            }
        }
        self.renegotiate(i, now);
        Ok(())
    }

    /// A trickled client candidate. We are ICE-lite: the client's own checks reveal its
    /// address, so candidates are validated and dropped. Passing them to str0m would let a
    /// client grow our ICE state without bound, and mDNS (`*.local`) ones, which browsers
    /// send when they hide their addresses, cannot be used anyway.
    pub fn candidate(&mut self, member: &str, candidate: &str) -> Result<(), SfuError> {
        self.idx(member)?;
        let text = candidate.strip_prefix("a=").unwrap_or(candidate);
        let fields = text.split_whitespace().count();
        if !text.starts_with("candidate:") || fields < 8 || text.len() > 1024 {
            return Err(SfuError::BadCandidate(
                "expected \"candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> …\"".into(),
            ));
        }
        Ok(())
    }

    /// Manual mode: subscribe `member` to these tracks of `publisher`. Returns false (the
    /// protocol's failure list) when the publisher is unknown, in another room, or has
    /// not published one of the tids.
    pub fn subscribe(
        &mut self,
        member: &str,
        publisher: &str,
        tids: &[String],
        now: Instant,
    ) -> bool {
        let (Ok(i), Ok(p)) = (self.idx(member), self.idx(publisher)) else {
            return false;
        };
        if i == p || self.member(i).room != self.member(p).room {
            return false;
        }
        let pm = self.member(p);
        let all_known = tids
            .iter()
            .all(|tid| pm.tracks.values().any(|t| t.active && &t.tid == tid));
        if !all_known {
            return false;
        }
        let pname = pm.name.clone();
        let m = self.member_mut(i);
        for tid in tids {
            m.manual.insert((pname.clone(), tid.clone()));
        }
        self.renegotiate(i, now);
        true
    }

    /// Manual mode: stop forwarding these tracks. Unknown ones are simply not forwarded.
    pub fn unsubscribe(
        &mut self,
        member: &str,
        publisher: &str,
        tids: &[String],
        now: Instant,
    ) -> bool {
        let Ok(i) = self.idx(member) else {
            return false;
        };
        let m = self.member_mut(i);
        for tid in tids {
            m.manual.remove(&(Arc::from(publisher), tid.clone()));
        }
        self.renegotiate(i, now);
        true
    }

    /// One datagram from the socket. Unknown senders are accepted only with a STUN
    /// check naming one of our peers.
    pub fn receive(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        let Ok(contents) = data.try_into() else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.config.candidate,
                contents,
            },
        );
        let route = match self.routes.get(&source).copied() {
            Some(r) => Some(r),
            // RFC 7983: only STUN (first byte 0..=3) can open a new route; anything else
            // from an unknown address is dropped without a scan over every peer.
            None if data.first().is_some_and(|b| *b <= 3) && self.take_scan_token(now) => {
                let found = self.members.iter().enumerate().find_map(|(i, m)| {
                    let m = m.as_ref()?;
                    if m.publisher.as_ref().is_some_and(|p| p.rtc.accepts(&input)) {
                        Some((i, PeerKind::Publisher))
                    } else if m.subscriber.as_ref().is_some_and(|p| p.rtc.accepts(&input)) {
                        Some((i, PeerKind::Subscriber))
                    } else {
                        None
                    }
                });
                // A peer has a handful of addresses at most (IPv4, IPv6, a NAT rebinding);
                // more is a client spraying checks to grow our state.
                let found = found.filter(|r| {
                    self.routes.values().filter(|x| *x == r).count() < MAX_ROUTES_PER_PEER
                });
                if let Some(r) = found {
                    self.routes.insert(source, r);
                }
                found
            }
            None => None,
        };
        let Some((i, kind)) = route else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let rate = f64::from(self.config.packets_per_second);
        let Some(peer) = self.peer_mut(i, kind) else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let elapsed = now.saturating_duration_since(peer.refilled).as_secs_f64();
        peer.tokens = (peer.tokens + elapsed * rate).min(rate * 2.0);
        peer.refilled = now;
        if peer.tokens < 1.0 {
            self.stats.dropped_datagrams += 1;
            return;
        }
        peer.tokens -= 1.0;
        if let Err(e) = peer.rtc.handle_input(input) {
            tracing::debug!(error = %e, "datagram rejected");
        }
        self.drive(i, kind, now);
    }

    fn take_scan_token(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.scan_refilled)
            .as_secs_f64();
        self.scan_tokens =
            (self.scan_tokens + elapsed * UNKNOWN_STUN_PER_SECOND).min(UNKNOWN_STUN_PER_SECOND);
        self.scan_refilled = now;
        if self.scan_tokens < 1.0 {
            return false;
        }
        self.scan_tokens -= 1.0;
        true
    }

    /// When [`Sfu::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Instant {
        let peers = self.members.iter().flatten().flat_map(|m| {
            [m.publisher.as_ref(), m.subscriber.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.timeout)
        });
        peers
            .chain(std::iter::once(self.next_speaker_tick))
            .min()
            .unwrap_or(self.next_speaker_tick)
    }

    /// Advances every peer whose timer is due, and the speaker detector.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.stats.timer_wakeups += 1;
        for i in 0..self.members.len() {
            for kind in [PeerKind::Publisher, PeerKind::Subscriber] {
                let due = self.peer_mut(i, kind).is_some_and(|p| p.timeout <= now);
                if due {
                    if let Some(p) = self.peer_mut(i, kind) {
                        let _ = p.rtc.handle_input(Input::Timeout(now));
                    }
                    self.drive(i, kind, now);
                }
            }
        }
        if now >= self.next_speaker_tick {
            self.next_speaker_tick = now + self.config.speaker_interval;
            self.update_speakers(now);
            self.update_layers(now);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<str0m::net::Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }

    fn peer_mut(&mut self, i: usize, kind: PeerKind) -> Option<&mut Peer> {
        let m = self.members.get_mut(i)?.as_mut()?;
        match kind {
            PeerKind::Publisher => m.publisher.as_mut(),
            PeerKind::Subscriber => m.subscriber.as_mut(),
        }
    }

    /// Drains one peer's output: datagrams queued, events acted on, until it only has a
    /// timeout left.
    fn drive(&mut self, i: usize, kind: PeerKind, now: Instant) {
        loop {
            let Some(peer) = self.peer_mut(i, kind) else {
                return;
            };
            let out = match peer.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(error = %e, "peer connection failed");
                    peer.rtc.disconnect();
                    peer.connected = false;
                    peer.timeout = now + Duration::from_secs(3600);
                    if let Some(m) = self.members.get(i).and_then(Option::as_ref) {
                        self.events.push_back(SfuEvent::PeerFailed {
                            room: m.room.clone(),
                            member: m.name.clone(),
                        });
                    }
                    return;
                }
            };
            match out {
                Output::Timeout(t) => {
                    peer.timeout = t;
                    return;
                }
                Output::Transmit(t) => self.transmits.push_back(t),
                Output::Event(e) => self.on_event(i, kind, e, now),
            }
        }
    }

    fn on_event(&mut self, i: usize, kind: PeerKind, e: Event, now: Instant) {
        match (kind, e) {
            (_, Event::Connected) => {
                if let Some(p) = self.peer_mut(i, kind) {
                    p.connected = true;
                }
                if kind == PeerKind::Subscriber {
                    // Late joiners see nothing until the next keyframe: ask now.
                    let all: Vec<usize> = (0..self.member(i).slots.len()).collect();
                    self.request_keyframes_for(i, &all, now);
                }
            }
            (PeerKind::Publisher, Event::MediaData(data)) => self.forward(i, data, now),
            (PeerKind::Subscriber, Event::KeyframeRequest(req)) => {
                let m = self.member(i);
                let Some(slot) = m.slots.iter().find(|s| s.mid == req.mid) else {
                    return;
                };
                if let Some(track) = slot.track {
                    // While a layer switch is pending, the keyframe that helps is the new
                    // layer's (the old one may have stopped).
                    let layer = slot.want_layer.or(slot.layer);
                    self.request_keyframe(track, layer, req.kind, now);
                }
            }
            _ => {}
        }
    }

    /// Asks the publisher of `track` for a keyframe on `rid`, at most once per interval.
    fn request_keyframe(
        &mut self,
        (p, generation, mid): TrackKey,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
        now: Instant,
    ) {
        let interval = self.config.keyframe_interval;
        let Some(Some(pm)) = self.members.get_mut(p) else {
            return;
        };
        if pm.joined_seq != generation {
            return;
        }
        let Some(track) = pm.tracks.get_mut(&mid) else {
            return;
        };
        if track.kind != TrackKind::Video {
            return;
        }
        if track
            .last_keyframe_request
            .get(&rid)
            .is_some_and(|t| now.saturating_duration_since(*t) < interval)
        {
            return;
        }
        let Some(peer) = pm.publisher.as_mut() else {
            return;
        };
        let Some(mut writer) = peer.rtc.writer(mid) else {
            return;
        };
        // Only a request that went out starts the throttle window: one refused because
        // the layer has not sent yet must not hold back the next attempt.
        if writer.request_keyframe(rid, kind).is_ok() {
            track.last_keyframe_request.insert(rid, now);
            self.stats.keyframe_requests_sent += 1;
        }
        self.drive(p, PeerKind::Publisher, now);
    }

    /// Asks for keyframes for member `i`'s video slots `which` (all when `None`).
    fn request_keyframes_for(&mut self, i: usize, which: &[usize], now: Instant) {
        let wanted: Vec<(TrackKey, Option<Rid>)> = self
            .member(i)
            .slots
            .iter()
            .enumerate()
            .filter(|(n, s)| s.kind == TrackKind::Video && s.negotiated && which.contains(n))
            .filter_map(|(_, s)| Some((s.track?, s.want_layer.or(s.layer))))
            .collect();
        for (track, rid) in wanted {
            self.request_keyframe(track, rid, KeyframeRequestKind::Pli, now);
        }
    }

    /// One received frame from a publisher, written to every subscriber of its track.
    fn forward(&mut self, p: usize, data: MediaData, now: Instant) {
        let key = (p, self.member(p).joined_seq, data.mid);
        let (kind, keyframe) = {
            let pm = self.member_mut(p);
            let Some(track) = pm.tracks.get_mut(&data.mid) else {
                return;
            };
            if !track.active {
                return;
            }
            if let Some(level) = data.ext_vals.audio_level {
                track.level.sample(level, now);
            }
            if let Some(rid) = data.rid {
                track.live_rids.insert(rid, now);
            }
            (track.kind, is_keyframe(&data))
        };
        if !data.contiguous && kind == TrackKind::Video {
            // Loss the publisher's stream could not repair: everyone downstream needs a
            // fresh keyframe to decode again.
            self.request_keyframe(key, data.rid, KeyframeRequestKind::Fir, now);
        }
        let Some(targets) = self.forwards.get(&key).cloned() else {
            return;
        };
        for &(s, slot_i) in targets.iter() {
            let Some(Some(sm)) = self.members.get_mut(s) else {
                continue;
            };
            if !sm.subscriber.as_ref().is_some_and(|p| p.connected) {
                // Nothing is sent before DTLS is up, so a keyframe must not be spent on
                // a layer switch that nobody sees.
                continue;
            }
            let Some(slot) = sm.slots.get_mut(slot_i) else {
                continue;
            };
            if data.rid.is_some() || slot.layer.is_some() || slot.want_layer.is_some() {
                // Simulcast: switch to the wanted layer only at one of its keyframes.
                if slot.want_layer != slot.layer && data.rid == slot.want_layer && keyframe {
                    let incoming = data.time.numer() as i64;
                    let next = slot
                        .last_out
                        .map(|(t, at)| {
                            let gap = now.saturating_duration_since(at).as_micros() as i64;
                            t as i64 + (gap * i64::from(data.time.denom()) / 1_000_000).max(1)
                        })
                        .unwrap_or(incoming);
                    slot.time_offset = next - incoming;
                    slot.layer = slot.want_layer;
                }
                if data.rid != slot.layer {
                    continue;
                }
            }
            let Some(peer) = sm.subscriber.as_mut() else {
                continue;
            };
            let out_time = (data.time.numer() as i64 + slot.time_offset).max(0) as u64;
            let Some(writer) = peer.rtc.writer(slot.mid) else {
                continue;
            };
            let Some(pt) = writer.match_params(data.params) else {
                continue;
            };
            let mut w = writer;
            if let Some(level) = data.ext_vals.audio_level {
                w = w.audio_level(level, data.ext_vals.voice_activity.unwrap_or(false));
            }
            let time = MediaTime::new(out_time, data.time.frequency());
            if w.write(pt, data.network_time, time, data.data.clone())
                .is_ok()
            {
                slot.last_out = Some((out_time, now));
                self.stats.forwarded_frames += 1;
            }
            self.drive(s, PeerKind::Subscriber, now);
        }
    }

    /// Re-evaluates speakers in every room; emits changes and re-ranks automatic mode.
    fn update_speakers(&mut self, now: Instant) {
        let silence = Duration::from_millis(600);
        let room_names: Vec<Name> = self.rooms.keys().cloned().collect();
        for room in room_names {
            let members = self.rooms[&room].members.clone();
            let mut speaking = Vec::new();
            for &i in &members {
                let m = self.member(i);
                for (mid, t) in &m.tracks {
                    if t.active && t.kind == TrackKind::Audio {
                        if let Some(level) = t.level.speaking(now, silence) {
                            speaking.push(((i, *mid), level));
                        }
                    }
                }
            }
            let ranked = speakers::rank(speaking, self.config.max_speakers);
            for (i, _) in &ranked {
                self.member_mut(*i).last_spoke = Some(now);
            }
            let r = self.rooms.get_mut(&room).expect("room listed above");
            if r.speakers != ranked {
                let leader_changed = r.speakers.first() != ranked.first();
                r.speakers = ranked;
                self.emit_speakers(&room);
                if leader_changed {
                    self.renegotiate_automatic(&room, now);
                }
            }
        }
    }

    fn emit_speakers(&mut self, room: &Name) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let speakers = r
            .speakers
            .iter()
            .filter_map(|(i, mid)| {
                let m = self.members.get(*i)?.as_ref()?;
                Some((m.name.clone(), m.tracks.get(mid)?.tid.clone()))
            })
            .collect();
        self.events.push_back(SfuEvent::ActiveSpeakers {
            room: room.clone(),
            speakers,
        });
    }

    /// The tracks `i` should receive now.
    fn desired(&self, i: usize) -> Vec<(TrackKey, TrackKind, String)> {
        let m = self.member(i);
        let Some(room) = self.rooms.get(&m.room) else {
            return Vec::new();
        };
        let tracks_of = |p: usize| {
            let pm = self.member(p);
            let mut v: Vec<_> = pm
                .tracks
                .iter()
                .filter(|(_, t)| t.active)
                .map(|(mid, t)| ((p, pm.joined_seq, *mid), t.kind, t.tid.clone()))
                .collect();
            v.sort_by(|a, b| a.2.cmp(&b.2));
            v
        };
        match m.mode {
            SubscriptionMode::Manual => room
                .members
                .iter()
                .filter(|p| **p != i)
                .flat_map(|p| tracks_of(*p))
                .filter(|(key, _, tid)| {
                    m.manual
                        .contains(&(self.member(key.0).name.clone(), tid.clone()))
                })
                .collect(),
            SubscriptionMode::Automatic(n) => {
                let speaking: Vec<usize> = room.speakers.iter().map(|(p, _)| *p).collect();
                let mut candidates: Vec<usize> = room
                    .members
                    .iter()
                    .copied()
                    .filter(|p| *p != i && self.member(*p).tracks.values().any(|t| t.active))
                    .collect();
                // Current speakers (loudest first), then recent speakers, then members
                // with unmuted tracks, then whoever joined first.
                candidates.sort_by_key(|p| {
                    let pm = self.member(*p);
                    let speak_rank = speaking.iter().position(|s| s == p).unwrap_or(usize::MAX);
                    let recent = std::cmp::Reverse(pm.last_spoke);
                    let muted = !pm.tracks.values().any(|t| t.active && !t.muted);
                    (speak_rank, recent, muted, pm.joined_seq)
                });
                candidates
                    .into_iter()
                    .take(usize::from(n))
                    .flat_map(tracks_of)
                    .collect()
            }
        }
    }

    fn renegotiate_room(&mut self, room: &Name, now: Instant) {
        self.renegotiate_where(room, now, |_| true);
    }

    fn renegotiate_automatic(&mut self, room: &Name, now: Instant) {
        self.renegotiate_where(room, now, |m| {
            matches!(m.mode, SubscriptionMode::Automatic(_))
        });
    }

    fn renegotiate_where(&mut self, room: &Name, now: Instant, which: impl Fn(&Member) -> bool) {
        let members = self
            .rooms
            .get(room)
            .map(|r| r.members.clone())
            .unwrap_or_default();
        for i in members {
            if which(self.member(i)) {
                self.renegotiate(i, now);
            }
        }
    }

    /// Brings member `i`'s subscriber PC toward `desired`: one offer at a time.
    fn renegotiate(&mut self, i: usize, now: Instant) {
        let desired = self.desired(i);
        let layers: Vec<Option<Rid>> = desired
            .iter()
            .map(|(key, _, _)| self.best_layer(*key, now))
            .collect();
        let candidate = self.config.candidate;
        let rtc_config = self.rtc_config.clone();
        let packets = f64::from(self.config.packets_per_second);
        let m = self.member_mut(i);
        // Layer preferences change without any SDP.
        for ((key, _, _), layer) in desired.iter().zip(&layers) {
            if let Some(slot) = m.slots.iter_mut().find(|s| s.track == Some(*key)) {
                slot.want_layer = *layer;
            }
        }
        let stale: Vec<usize> = m
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.track.is_some_and(|k| !desired.iter().any(|d| d.0 == k)))
            .map(|(n, _)| n)
            .collect();
        let missing: Vec<_> = desired
            .iter()
            .zip(layers)
            .filter(|((key, _, _), _)| !m.slots.iter().any(|s| s.track == Some(*key)))
            .collect();
        if stale.is_empty() && missing.is_empty() {
            return;
        }
        if !matches!(m.negotiation, Negotiation::Stable) {
            // Folded into the next offer, made when this one is answered.
            return;
        }
        let peer = m
            .subscriber
            .get_or_insert_with(|| new_peer(rtc_config, candidate, packets, now));
        let mut api = peer.rtc.sdp_api();
        for n in &stale {
            api.set_direction(m.slots[*n].mid, Direction::Inactive);
        }
        let mut added = Vec::new();
        let mut revived = Vec::new();
        for ((key, kind, tid), layer) in missing {
            let dormant = m
                .slots
                .iter()
                .position(|s| s.track.is_none() && s.last_track == Some(*key));
            if let Some(n) = dormant {
                api.set_direction(m.slots[n].mid, Direction::SendOnly);
                revived.push((n, *key, layer));
                continue;
            }
            // The stream id is what the SDK matches on: it must be the publisher's tid. The
            // track id must be unique in the session: a re-published tid (reconnect) gets a
            // new section next to its old inactive one, and Chrome refuses an offer whose
            // msid repeats.
            let track_id = format!("{tid}-{}", m.slots.len() + added.len());
            let mid = api.add_media(
                (*kind).into(),
                Direction::SendOnly,
                Some(tid.clone()),
                Some(track_id),
                None,
            );
            added.push(Slot {
                mid,
                kind: *kind,
                track: Some(*key),
                last_track: Some(*key),
                negotiated: false,
                layer: None,
                want_layer: layer,
                time_offset: 0,
                last_out: None,
            });
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        for n in stale {
            let slot = &mut m.slots[n];
            slot.track = None;
            slot.negotiated = false;
        }
        for (n, key, layer) in revived {
            let slot = &mut m.slots[n];
            slot.track = Some(key);
            slot.negotiated = false;
            slot.layer = None;
            slot.want_layer = layer;
            slot.time_offset = 0;
        }
        m.slots.extend(added);
        m.negotiation = Negotiation::Offered(pending);
        let event = SfuEvent::SubOffer {
            room: m.room.clone(),
            member: m.name.clone(),
            sdp: offer.to_sdp_string(),
        };
        self.events.push_back(event);
        self.reindex();
        self.drive(i, PeerKind::Subscriber, now);
    }

    /// The simulcast layer to forward of `track`: the highest one that sent media lately,
    /// so a publisher that drops a layer (congestion, CPU) keeps its viewers on another.
    fn best_layer(&self, (p, generation, mid): TrackKey, now: Instant) -> Option<Rid> {
        let pm = self.members.get(p)?.as_ref()?;
        if pm.joined_seq != generation {
            return None;
        }
        let t = pm.tracks.get(&mid)?;
        let fresh = |r: &Rid| {
            t.live_rids
                .get(r)
                .is_some_and(|at| now.saturating_duration_since(*at) < Duration::from_millis(1500))
        };
        t.rids
            .iter()
            .rev()
            .find(|r| fresh(r))
            .or(t.rids.last())
            .copied()
    }

    /// Rebuilds track → subscribers from the negotiated slots.
    fn reindex(&mut self) {
        let mut index: HashMap<TrackKey, Vec<(usize, usize)>> = HashMap::new();
        for (s, m) in self.members.iter().enumerate() {
            let Some(m) = m else { continue };
            for (n, slot) in m.slots.iter().enumerate() {
                if let (Some(key), true) = (slot.track, slot.negotiated) {
                    index.entry(key).or_default().push((s, n));
                }
            }
        }
        self.forwards = index.into_iter().map(|(k, v)| (k, v.into())).collect();
    }

    /// Re-evaluates which simulcast layer each subscriber should get, and keeps asking
    /// for a keyframe (within the throttle) for every video slot that waits for one: a
    /// pending layer switch, or a section that has not forwarded anything yet. A single
    /// request can be lost or refused; video that never starts is worse than a few PLIs.
    fn update_layers(&mut self, now: Instant) {
        for i in 0..self.members.len() {
            if self.members[i].is_none() {
                continue;
            }
            let wants: Vec<(usize, Option<Rid>)> = self
                .member(i)
                .slots
                .iter()
                .enumerate()
                .filter_map(|(n, s)| Some((n, self.best_layer(s.track?, now))))
                .collect();
            let connected = self
                .member(i)
                .subscriber
                .as_ref()
                .is_some_and(|p| p.connected);
            let mut ask = Vec::new();
            let m = self.member_mut(i);
            for (n, want) in wants {
                let slot = &mut m.slots[n];
                slot.want_layer = want;
                let waiting = slot.layer != slot.want_layer || slot.last_out.is_none();
                if let (Some(track), true, true, TrackKind::Video) =
                    (slot.track, slot.negotiated && connected, waiting, slot.kind)
                {
                    ask.push((track, want));
                }
            }
            for (track, rid) in ask {
                self.request_keyframe(track, rid, KeyframeRequestKind::Pli, now);
            }
        }
    }
}

fn new_peer(config: RtcConfig, candidate: SocketAddr, packets: f64, now: Instant) -> Peer {
    let mut rtc = config.build(now);
    if let Ok(c) = Candidate::host(candidate, "udp") {
        rtc.add_local_candidate(c);
    }
    Peer {
        rtc,
        connected: false,
        timeout: now,
        tokens: packets * 2.0,
        refilled: now,
    }
}

fn is_keyframe(data: &MediaData) -> bool {
    use str0m::format::CodecExtra;
    match data.codec_extra {
        CodecExtra::Vp8(e) => e.is_keyframe,
        CodecExtra::H264(e) => e.is_keyframe,
        CodecExtra::Vp9(e) => e.is_keyframe,
        CodecExtra::Av1(e) => e.is_keyframe,
        _ => false,
    }
}
