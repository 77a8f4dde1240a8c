//! The client side of the harness: what the Spaces SDK does in a browser, on str0m.
//!
//! A client has up to two peer connections, as the SDK does: a publisher PC that it offers
//! (send-only sections, optionally simulcast) and a subscriber PC that answers the SFU's
//! offers. Each is a full-ICE, controlling str0m `Rtc` with its own fake host address.
//! Every method that gives an `Rtc` input polls it back to its timeout before returning
//! (str0m's contract), leaving datagrams in `outbox` for the network to carry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spacegate_sfu::TrackKind;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, CodecExtra};
use str0m::media::{
    Direction, Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid, Rid, Simulcast,
    SimulcastLayer,
};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use super::frames::{self, Tag};

/// Frame cadence: Opus's usual 20 ms, and 30 fps video (33 ms keeps RTP steps whole).
const AUDIO_PERIOD: Duration = Duration::from_millis(20);
const VIDEO_PERIOD: Duration = Duration::from_millis(33);

/// RTP time bases per simulcast layer, far apart as independent encoders' are, with the
/// higher layers ahead: forwarding a switch without rebasing would jump by seconds.
const LAYER_BASE: u64 = 1_000_000;

/// RFC 6464's quietest level, in -dBov.
const SILENCE: i8 = -127;

/// A track to publish: what `pending_track` announces and the source that feeds it.
#[derive(Debug, Clone)]
pub struct TrackSpec {
    pub(super) tid: String,
    pub(super) kind: TrackKind,
    rids: Vec<String>,
    keyframe_every: Option<u32>,
}

impl TrackSpec {
    /// An audio track, silent until its [`Source::level`] is set.
    pub fn audio(tid: &str) -> Self {
        TrackSpec {
            tid: tid.into(),
            kind: TrackKind::Audio,
            rids: Vec::new(),
            keyframe_every: None,
        }
    }

    /// A video track whose encoder makes keyframes only at its start and when asked (as
    /// a browser's does), unless [`TrackSpec::keyframe_every`] says otherwise.
    pub fn video(tid: &str) -> Self {
        TrackSpec {
            kind: TrackKind::Video,
            ..TrackSpec::audio(tid)
        }
    }

    /// Simulcast layers, lowest first as the SDK orders them.
    pub fn simulcast(mut self, rids: &[&str]) -> Self {
        self.rids = rids.iter().map(|r| r.to_string()).collect();
        self
    }

    /// Also a keyframe every `n` frames of each layer.
    pub fn keyframe_every(mut self, n: u32) -> Self {
        self.keyframe_every = Some(n);
        self
    }
}

/// One frame a publisher wrote.
#[derive(Debug, Clone)]
pub struct Sent {
    pub tag: Tag,
    pub data: Arc<[u8]>,
}

/// One simulcast layer of a source (the only one, `rid: None`, without simulcast).
#[derive(Debug)]
pub struct Layer {
    pub rid: Option<Rid>,
    /// Whether the encoder produces this layer now.
    pub live: bool,
    seq: u32,
    keyframe_wanted: bool,
    pub sent: Vec<Sent>,
}

/// A synthetic encoder feeding one published section.
#[derive(Debug)]
pub struct Source {
    pub tid: String,
    pub mid: Mid,
    pub kind: TrackKind,
    /// Names this source inside its frames.
    pub id: u16,
    pub layers: Vec<Layer>,
    /// RFC 6464 level of the next audio frames, in -dBov (0 loudest, -127 silence).
    pub level: i8,
    keyframe_every: Option<u32>,
    /// Frame periods since publishing: RTP time follows the clock, not the frame count,
    /// so a layer that pauses resumes at the right time.
    tick: u64,
    next_at: Instant,
}

impl Source {
    pub fn layer_mut(&mut self, rid: &str) -> &mut Layer {
        let rid = Rid::from(rid);
        self.layers
            .iter_mut()
            .find(|l| l.rid == Some(rid))
            .expect("a layer of this source")
    }

    /// Stops (or restarts) every layer.
    pub fn set_live(&mut self, live: bool) {
        for l in &mut self.layers {
            l.live = live;
        }
    }

    fn period(&self) -> Duration {
        match self.kind {
            TrackKind::Audio => AUDIO_PERIOD,
            TrackKind::Video => VIDEO_PERIOD,
        }
    }

    /// Writes this period's frame on every live layer.
    fn produce(&mut self, rtc: &mut Rtc, now: Instant) {
        let (codec, frequency) = match self.kind {
            TrackKind::Audio => (Codec::Opus, Frequency::FORTY_EIGHT_KHZ),
            TrackKind::Video => (Codec::Vp8, Frequency::NINETY_KHZ),
        };
        let step = self.period().as_micros() as u64 * u64::from(frequency.get()) / 1_000_000;
        for (index, layer) in self.layers.iter_mut().enumerate() {
            if !layer.live {
                continue;
            }
            let keyframe = (self.kind == TrackKind::Video).then(|| {
                layer.seq == 0
                    || layer.keyframe_wanted
                    || self.keyframe_every.is_some_and(|n| layer.seq % n == 0)
            });
            let tag = Tag {
                source: self.id,
                layer: index as u8,
                seq: layer.seq,
                keyframe,
            };
            let data: Arc<[u8]> = frames::frame(tag).into();
            let time = MediaTime::new(index as u64 * LAYER_BASE + self.tick * step, frequency);
            let mut writer = rtc.writer(self.mid).expect("a negotiated section");
            let pt = writer
                .payload_params()
                .find(|p| p.spec().codec == codec)
                .map(|p| p.pt())
                .expect("the codec was negotiated");
            if let Some(rid) = layer.rid {
                writer = writer.rid(rid);
            }
            if self.kind == TrackKind::Audio {
                writer = writer.audio_level(self.level, self.level > -50);
            }
            writer
                .write(pt, now, time, data.clone())
                .expect("a frame the section accepts");
            layer.sent.push(Sent { tag, data });
            layer.seq += 1;
            layer.keyframe_wanted = false;
        }
        self.tick += 1;
    }
}

/// A keyframe request as the publisher received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyframeAsk {
    pub at: Duration,
    pub tid: String,
    pub rid: Option<Rid>,
    pub kind: KeyframeRequestKind,
}

/// A section of the subscriber PC, as the SFU's latest offer describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The msid stream id: the publisher's tid, which is what the SDK matches on.
    pub tid: String,
    /// `sendonly` from the SFU; `inactive` once the track stopped being forwarded.
    pub active: bool,
}

/// One frame the subscriber received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Duration,
    /// The track its section carried when it arrived.
    pub tid: String,
    /// RTP time on the subscriber's leg.
    pub time: u64,
    pub keyframe: bool,
    pub data: Arc<[u8]>,
}

impl Received {
    pub fn tag(&self) -> Tag {
        Tag::parse(&self.data).expect("a harness frame")
    }
}

#[derive(Debug)]
struct Pc {
    rtc: Rtc,
    timeout: Instant,
    /// When its timeout was last handled: a timeout not after that is one str0m could
    /// not advance, which must not stall virtual time.
    woken: Option<Instant>,
    connected: bool,
}

impl Pc {
    fn new(addr: SocketAddr, now: Instant) -> Pc {
        let provider = Arc::new(str0m::crypto::from_feature_flags());
        let mut rtc = RtcConfig::new().set_crypto_provider(provider).build(now);
        let host = Candidate::host(addr, "udp").expect("a host candidate");
        rtc.add_local_candidate(host);
        Pc {
            rtc,
            timeout: now,
            woken: None,
            connected: false,
        }
    }

    fn wake_at(&self) -> Instant {
        super::due(self.timeout, self.woken)
    }

    /// Polls to the next timeout: datagrams to `outbox`, events returned.
    fn pump(&mut self, outbox: &mut Vec<Transmit>) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.timeout = t;
                    return events;
                }
                Ok(Output::Transmit(t)) => outbox.push(t),
                Ok(Output::Event(Event::Connected)) => self.connected = true,
                Ok(Output::Event(e)) => events.push(e),
                Err(e) => panic!("a client peer connection failed: {e}"),
            }
        }
    }
}

/// One member as the SDK runs it.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    pub pub_addr: SocketAddr,
    pub sub_addr: SocketAddr,
    publisher: Option<Pc>,
    subscriber: Option<Pc>,
    pub sources: Vec<Source>,
    pub keyframe_requests: Vec<KeyframeAsk>,
    /// Subscriber sections by mid, from the SFU's offers.
    pub sections: BTreeMap<Mid, Section>,
    /// Every offer the SFU made this client's subscriber PC, in order.
    pub offers: Vec<String>,
    pub received: Vec<Received>,
    /// Left: its peer connections are gone, datagrams to it are lost.
    pub gone: bool,
    pub(crate) outbox: Vec<Transmit>,
}

impl Client {
    pub(crate) fn new(name: &str, number: u8) -> Client {
        Client {
            name: name.into(),
            pub_addr: SocketAddr::from(([10, 0, 1, number], 6000)),
            sub_addr: SocketAddr::from(([10, 0, 1, number], 6001)),
            publisher: None,
            subscriber: None,
            sources: Vec::new(),
            keyframe_requests: Vec::new(),
            sections: BTreeMap::new(),
            offers: Vec::new(),
            received: Vec::new(),
            gone: false,
            outbox: Vec::new(),
        }
    }

    pub fn source_mut(&mut self, tid: &str) -> &mut Source {
        self.sources
            .iter_mut()
            .find(|s| s.tid == tid)
            .expect("a published tid")
    }

    /// Frames received on `tid`, in arrival order.
    pub fn frames<'a>(&'a self, tid: &'a str) -> impl Iterator<Item = &'a Received> + 'a {
        self.received.iter().filter(move |r| r.tid == tid)
    }

    /// Tids of the sections the SFU currently sends, sorted.
    pub fn active_tids(&self) -> Vec<&str> {
        let mut tids: Vec<&str> = self
            .sections
            .values()
            .filter(|s| s.active)
            .map(|s| s.tid.as_str())
            .collect();
        tids.sort_unstable();
        tids
    }

    /// The earliest moment this client needs the clock: a peer timeout or a frame due.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        if self.gone {
            return None;
        }
        let pcs = [&self.publisher, &self.subscriber]
            .into_iter()
            .flatten()
            .map(Pc::wake_at);
        let frames = self.sources.iter().map(|s| s.next_at);
        pcs.chain(frames).min()
    }

    /// Offers new send-only sections for `specs`; returns the offer, the sections to
    /// announce with `pending_track`, and what `accept_answer` needs.
    pub(crate) fn publish_offer(
        &mut self,
        specs: &[TrackSpec],
        now: Instant,
    ) -> (String, Vec<(Mid, TrackSpec)>, SdpPendingOffer) {
        let pc = self
            .publisher
            .get_or_insert_with(|| Pc::new(self.pub_addr, now));
        let mut api = pc.rtc.sdp_api();
        let mut added = Vec::new();
        for spec in specs {
            let simulcast = (!spec.rids.is_empty()).then(|| {
                let mut s = Simulcast::new();
                for rid in &spec.rids {
                    s.add_send_layer(SimulcastLayer::new(rid));
                }
                s
            });
            let kind = match spec.kind {
                TrackKind::Audio => MediaKind::Audio,
                TrackKind::Video => MediaKind::Video,
            };
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(spec.tid.clone()),
                Some(spec.tid.clone()),
                simulcast,
            );
            added.push((mid, spec.clone()));
        }
        let (offer, pending) = api.apply().expect("new sections make an offer");
        (offer.to_sdp_string(), added, pending)
    }

    /// Applies the SFU's answer and starts a source per published section.
    pub(crate) fn publish_answer(
        &mut self,
        pending: SdpPendingOffer,
        answer: &str,
        added: Vec<(Mid, TrackSpec)>,
        first_source: u16,
        now: Instant,
        at: Duration,
    ) {
        let pc = self.publisher.as_mut().expect("publish_offer made it");
        let answer = SdpAnswer::from_sdp_string(answer).expect("the SFU's answer parses");
        pc.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("the SFU's answer is acceptable");
        for (n, (mid, spec)) in added.into_iter().enumerate() {
            let rids: Vec<Option<Rid>> = if spec.rids.is_empty() {
                vec![None]
            } else {
                spec.rids
                    .iter()
                    .map(|r| Some(Rid::from(r.as_str())))
                    .collect()
            };
            self.sources.push(Source {
                tid: spec.tid,
                mid,
                kind: spec.kind,
                id: first_source + n as u16,
                layers: rids
                    .into_iter()
                    .map(|rid| Layer {
                        rid,
                        live: true,
                        seq: 0,
                        keyframe_wanted: false,
                        sent: Vec::new(),
                    })
                    .collect(),
                level: SILENCE,
                keyframe_every: spec.keyframe_every,
                tick: 0,
                next_at: now,
            });
        }
        self.pump_publisher(at);
    }

    /// Answers an offer for the subscriber PC. The PC is made at the first offer with
    /// m-lines: str0m refuses the m-line-less `initial_offer` a browser accepts, and the
    /// SFU ignores the content of that first answer anyway.
    pub(crate) fn answer_sub_offer(&mut self, sdp: &str, now: Instant, at: Duration) -> String {
        let pc = self
            .subscriber
            .get_or_insert_with(|| Pc::new(self.sub_addr, now));
        let offer = SdpOffer::from_sdp_string(sdp).expect("the SFU's offer parses");
        let answer = pc
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .expect("the SFU's offer is acceptable");
        self.offers.push(sdp.to_string());
        for (mid, section) in sections(sdp) {
            self.sections.insert(mid, section);
        }
        self.pump_subscriber(at);
        answer.to_sdp_string()
    }

    /// Sends a PLI on the subscriber section that carries `tid`, as a decoder that lost
    /// its picture does.
    pub(crate) fn request_keyframe(&mut self, tid: &str, at: Duration) {
        let mid = self
            .sections
            .iter()
            .find(|(_, s)| s.tid == tid && s.active)
            .map(|(mid, _)| *mid)
            .expect("an active section for the tid");
        let pc = self.subscriber.as_mut().expect("a subscriber PC");
        pc.rtc
            .writer(mid)
            .expect("a negotiated section")
            .request_keyframe(None, KeyframeRequestKind::Pli)
            .expect("a stream to ask on");
        self.pump_subscriber(at);
    }

    /// One datagram for this client. Returns false when nothing here takes it.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        at: Duration,
        from: SocketAddr,
        to: SocketAddr,
        contents: &[u8],
    ) -> bool {
        let publisher = to == self.pub_addr;
        let pc = if publisher {
            self.publisher.as_mut()
        } else {
            self.subscriber.as_mut()
        };
        let (Some(pc), Ok(contents)) = (pc, contents.try_into()) else {
            return false;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source: from,
                destination: to,
                contents,
            },
        );
        pc.rtc
            .handle_input(input)
            .expect("the client accepts the SFU's datagram");
        if publisher {
            self.pump_publisher(at);
        } else {
            self.pump_subscriber(at);
        }
        true
    }

    /// Timers and frames due at `now`.
    pub(crate) fn on_time(&mut self, now: Instant, at: Duration) {
        if self.gone {
            return;
        }
        if let Some(pc) = self.publisher.as_mut().filter(|p| p.wake_at() <= now) {
            pc.woken = Some(now);
            pc.rtc
                .handle_input(Input::Timeout(now))
                .expect("a timeout is always accepted");
        }
        if let Some(pc) = self.subscriber.as_mut().filter(|p| p.wake_at() <= now) {
            pc.woken = Some(now);
            pc.rtc
                .handle_input(Input::Timeout(now))
                .expect("a timeout is always accepted");
        }
        let connected = self.publisher.as_ref().is_some_and(|p| p.connected);
        for source in &mut self.sources {
            if source.next_at > now {
                continue;
            }
            source.next_at += source.period();
            // str0m drops frames written before the connection is up; a real encoder's
            // output before then is lost too, so nothing is recorded as sent.
            if let (true, Some(pc)) = (connected, self.publisher.as_mut()) {
                source.produce(&mut pc.rtc, now);
            }
        }
        self.pump_publisher(at);
        self.pump_subscriber(at);
    }

    fn pump_publisher(&mut self, at: Duration) {
        let Some(pc) = self.publisher.as_mut() else {
            return;
        };
        for e in pc.pump(&mut self.outbox) {
            let Event::KeyframeRequest(req) = e else {
                continue;
            };
            let Some(source) = self.sources.iter_mut().find(|s| s.mid == req.mid) else {
                continue;
            };
            self.keyframe_requests.push(KeyframeAsk {
                at,
                tid: source.tid.clone(),
                rid: req.rid,
                kind: req.kind,
            });
            // The encoder answers with a keyframe on that layer at its next frame.
            for layer in source.layers.iter_mut().filter(|l| l.rid == req.rid) {
                layer.keyframe_wanted = true;
            }
        }
    }

    fn pump_subscriber(&mut self, at: Duration) {
        let Some(pc) = self.subscriber.as_mut() else {
            return;
        };
        for e in pc.pump(&mut self.outbox) {
            let Event::MediaData(data) = e else {
                continue;
            };
            let keyframe = match data.codec_extra {
                CodecExtra::Vp8(e) => e.is_keyframe,
                _ => false,
            };
            self.received.push(Received {
                at,
                tid: self
                    .sections
                    .get(&data.mid)
                    .map(|s| s.tid.clone())
                    .unwrap_or_default(),
                time: data.time.numer(),
                keyframe,
                data: data.data,
            });
        }
    }

    /// Drops both peer connections: the client is gone, as a closed browser tab.
    pub(crate) fn vanish(&mut self) {
        self.gone = true;
        self.publisher = None;
        self.subscriber = None;
        self.outbox.clear();
    }
}

/// The m-sections of an SDP: mid → (msid stream id, whether the SFU sends on it).
fn sections(sdp: &str) -> Vec<(Mid, Section)> {
    sdp.split("\r\nm=")
        .skip(1)
        .filter_map(|block| {
            let attr = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            let mid = attr("a=mid:")?;
            let tid = attr("a=msid:")?.split_whitespace().next()?.to_string();
            let active = block.lines().any(|l| l.trim() == "a=sendonly");
            Some((Mid::from(mid), Section { tid, active }))
        })
        .collect()
}
