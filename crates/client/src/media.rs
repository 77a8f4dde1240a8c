//! The native client's media plane on webrtc-rs 0.21 (the async wrapper over the sans-IO
//! `rtc` core): a publishing peer connection ([`PubPc`], the client offers) and a subscribing
//! one ([`SubPc`], the server offers), as `@mux/spaces-web` uses them.
//!
//! Every PC binds its own UDP socket on `127.0.0.1:0`, so its only host candidate is loopback
//! and it can reach a server that advertises `127.0.0.1:<port>` (ICE-lite or not). Signalling
//! is non-trickle: offers and answers are returned once gathering is complete, with the
//! candidates inline.
//!
//! Things webrtc-rs 0.21 does that shaped this module:
//! - The sender accepts an RTP packet only if its payload type and SSRC are the negotiated
//!   ones. Otherwise it drops the packet after `write` has returned `Ok`, saying so only
//!   through the `log` crate, so the payload type is read back from the sender and every SSRC
//!   is chosen here, before the track exists.
//! - Inbound RTCP never reaches a local track unless an interceptor marks it for the
//!   application; [`PubPc`] installs one that marks PLI and FIR, so it can count them.
//! - Simulcast packets are not tagged by the library: each one gets its `mid` and `rid` header
//!   extensions here, or a receiver cannot tell the layers apart.
//! - An offer with no media sections is rejected (it carries no ICE credentials), so
//!   [`SubPc::handle_offer`] answers it itself.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCOfferOptions;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::marshal::{Marshal, MarshalSize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};
use webrtc::rtp_transceiver::{RtpSender, RtpTransceiver};

/// Opus and VP8 keep the payload types browsers use, so a server that forwards RTP without
/// rewriting payload types still works.
const OPUS_PT: u8 = 111;
const VP8_PT: u8 = 96;
const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
const SDES_MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const SDES_RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
/// Host candidates on loopback are gathered in milliseconds; this only bounds a stuck driver.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);
const AUDIO_FRAME: Duration = Duration::from_millis(20);
const VIDEO_FRAME: Duration = Duration::from_millis(33);
/// How many received payloads [`RecvStats`] keeps for comparison.
const KEPT_PAYLOADS: usize = 64;
/// Past the wire-ward interceptors (the highest named slot is 13 000), so every one of them has
/// acted on an RTCP packet before the keyframe tap narrows it for the application.
const KEYFRAME_TAP_SLOT: usize = 14_000;

/// The two kinds the spaces SDK publishes: Opus 48 kHz stereo and VP8 90 kHz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Audio,
    Video,
}

impl MediaKind {
    fn codec_kind(self) -> RtpCodecKind {
        match self {
            MediaKind::Audio => RtpCodecKind::Audio,
            MediaKind::Video => RtpCodecKind::Video,
        }
    }

    fn codec(self) -> RTCRtpCodec {
        match self {
            MediaKind::Audio => RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                rtcp_feedback: vec![],
            },
            MediaKind::Video => RTCRtpCodec {
                mime_type: MIME_TYPE_VP8.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                // `nack` and `nack pli` come from the default interceptors; FIR is offered so
                // a server may use either keyframe request.
                rtcp_feedback: vec![RTCPFeedback {
                    typ: "ccm".to_owned(),
                    parameter: "fir".to_owned(),
                }],
            },
        }
    }

    fn payload_type(self) -> u8 {
        match self {
            MediaKind::Audio => OPUS_PT,
            MediaKind::Video => VP8_PT,
        }
    }

    fn from_codec_kind(kind: RtpCodecKind) -> Option<MediaKind> {
        match kind {
            RtpCodecKind::Audio => Some(MediaKind::Audio),
            RtpCodecKind::Video => Some(MediaKind::Video),
            _ => None,
        }
    }
}

fn media_engine() -> anyhow::Result<MediaEngine> {
    let mut engine = MediaEngine::default();
    for kind in [MediaKind::Audio, MediaKind::Video] {
        engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: kind.codec(),
                payload_type: kind.payload_type(),
            },
            kind.codec_kind(),
        )?;
    }
    engine.register_header_extension(
        RTCRtpHeaderExtensionCapability {
            uri: AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    Ok(engine)
}

/// State both kinds of PC report through their event handler.
struct PcEvents {
    connected: AtomicBool,
    gathering: watch::Sender<RTCIceGatheringState>,
    /// Only a subscribing PC has remote tracks to record.
    sub: Option<Arc<SubShared>>,
}

impl PcEvents {
    fn new(sub: Option<Arc<SubShared>>) -> Arc<PcEvents> {
        Arc::new(PcEvents {
            connected: AtomicBool::new(false),
            gathering: watch::Sender::new(RTCIceGatheringState::New),
            sub,
        })
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PcEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        self.gathering.send_replace(state);
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.connected.store(
            state == RTCPeerConnectionState::Connected,
            Ordering::Release,
        );
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(sub) = &self.sub {
            SubShared::attach(sub, track).await;
        }
    }
}

async fn build_pc(
    events: Arc<PcEvents>,
    tap_keyframe_requests: bool,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let mut engine = media_engine()?;
    let mut registry = register_default_interceptors(Registry::new(), &mut engine)?;
    if tap_keyframe_requests {
        registry = registry.with(Slot::from(KEYFRAME_TAP_SLOT), KeyframeRequestTap::default());
    }
    // mDNS would bind the shared port 5353 per PC and the server never sends `.local`
    // candidates, so it buys nothing here.
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(engine)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(events)
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await
        .context("building the peer connection")?;
    Ok(Arc::new(pc))
}

/// Applies `desc` locally and returns it once gathering is done, so the SDP carries its
/// candidates (the server takes no trickled ones).
async fn set_local_and_gather(
    pc: &Arc<dyn PeerConnection>,
    events: &PcEvents,
    desc: RTCSessionDescription,
) -> anyhow::Result<String> {
    let mut gathering = events.gathering.subscribe();
    pc.set_local_description(desc).await?;
    // On a renegotiation the state is already `Complete` and the retained candidates are
    // what the new description carries, so this returns at once.
    tokio::time::timeout(
        GATHER_TIMEOUT,
        gathering.wait_for(|state| *state == RTCIceGatheringState::Complete),
    )
    .await
    .map_err(|_| anyhow!("ICE gathering did not complete in {GATHER_TIMEOUT:?}"))?
    .map_err(|_| anyhow!("peer connection closed while gathering"))?;
    let local = pc
        .local_description()
        .await
        .ok_or_else(|| anyhow!("no local description after setting one"))?;
    Ok(local.sdp)
}

/// Marks inbound RTCP that asks for a keyframe (PLI or FIR) for the application. Everything
/// passes through untouched otherwise: packets may carry attributes meant for `rtc` itself,
/// and unmarked RTCP ends in the chain anyway.
#[derive(Default)]
struct KeyframeRequestTap {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet
            && packets
                .iter()
                .any(|packet| is_keyframe_request(packet.as_ref()))
        {
            // The whole compound packet goes up; the reader picks the requests out of it.
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.writes.pop_front()
    }
}

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// An SDES item (mid or rid) as a header-extension value.
struct SdesValue(Bytes);

impl MarshalSize for SdesValue {
    fn marshal_size(&self) -> usize {
        self.0.len()
    }
}

impl Marshal for SdesValue {
    fn marshal_to(&self, buf: &mut [u8]) -> rtc::shared::error::Result<usize> {
        let out = buf
            .get_mut(..self.0.len())
            .ok_or(rtc::shared::error::Error::ErrBufferTooSmall)?;
        out.copy_from_slice(&self.0);
        Ok(self.0.len())
    }
}

fn sdes_extension(uri: &'static str, value: &str) -> HeaderExtension {
    HeaderExtension::Custom {
        uri: Cow::Borrowed(uri),
        extension: Box::new(SdesValue(Bytes::copy_from_slice(value.as_bytes()))),
    }
}

/// SSRCs and track ids only need to be unlikely to collide within a session; the standard
/// library's per-instance hasher keys are random enough and save a dependency.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    match hasher.finish() as u32 {
        0 => 1,
        n => n,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No critical section here can leave its data half-updated, so a poisoned lock is safe to
    // keep using rather than a reason to panic in every later call.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One encoding of a published track: the single stream, or one simulcast layer.
#[derive(Debug)]
struct Layer {
    rid: Option<String>,
    ssrc: u32,
    /// When the previous frame was written, for the next video timestamp.
    last_write: Mutex<Option<Instant>>,
}

struct PubTrack {
    kind: MediaKind,
    local: Arc<TrackLocalStaticSample>,
    sender: Arc<dyn RtpSender>,
    transceiver: Arc<dyn RtpTransceiver>,
    payload_type: u8,
    layers: Vec<Layer>,
    /// Known after the first offer; simulcast packets must carry it.
    mid: Mutex<Option<String>>,
    rtcp_reader: JoinHandle<()>,
}

/// The publishing peer connection: the client offers, the server answers, and every
/// transceiver is sendonly.
pub struct PubPc {
    pc: Arc<dyn PeerConnection>,
    events: Arc<PcEvents>,
    tracks: Mutex<HashMap<String, Arc<PubTrack>>>,
    /// Kept after a track is removed, so its (now inactive) section can still be found.
    mids: Mutex<HashMap<String, String>>,
    keyframe_requests: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl fmt::Debug for PubPc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut tracks: Vec<String> = lock(&self.tracks).keys().cloned().collect();
        tracks.sort();
        f.debug_struct("PubPc")
            .field("tracks", &tracks)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl PubPc {
    pub async fn new() -> anyhow::Result<PubPc> {
        let events = PcEvents::new(None);
        let pc = build_pc(Arc::clone(&events), true).await?;
        Ok(PubPc {
            pc,
            events,
            tracks: Mutex::new(HashMap::new()),
            mids: Mutex::new(HashMap::new()),
            keyframe_requests: Mutex::new(HashMap::new()),
        })
    }

    /// Adds a sendonly track whose stream id (the first `msid` token) is `tid`. Its mid is
    /// known after the next [`create_offer`](Self::create_offer): see [`mid_of`](Self::mid_of).
    pub async fn add_track(&self, tid: &str, kind: MediaKind) -> anyhow::Result<()> {
        self.add(tid, kind, &[]).await
    }

    /// Adds a video track sent as simulcast layers `rids`, offered with `a=rid:<rid> send` and
    /// `a=simulcast:send <rids joined by ;>` in the order given.
    pub async fn add_simulcast_video(&self, tid: &str, rids: &[&str]) -> anyhow::Result<()> {
        if rids.len() < 2 {
            bail!("simulcast needs at least two rids, got {rids:?}");
        }
        for (i, rid) in rids.iter().enumerate() {
            // RFC 8851's rid-id syntax, and short enough for a one-byte header extension.
            let valid = !rid.is_empty()
                && rid.len() <= 16
                && rid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid || rids[..i].contains(rid) {
                bail!("invalid or repeated rid {rid:?}");
            }
        }
        self.add(tid, MediaKind::Video, rids).await
    }

    async fn add(&self, tid: &str, kind: MediaKind, rids: &[&str]) -> anyhow::Result<()> {
        if tid.is_empty() || tid.chars().any(char::is_whitespace) {
            bail!("track id {tid:?} cannot be an msid token");
        }
        if lock(&self.tracks).contains_key(tid) {
            bail!("track {tid} is already published");
        }
        let rids: Vec<Option<String>> = if rids.is_empty() {
            vec![None]
        } else {
            rids.iter().map(|rid| Some((*rid).to_owned())).collect()
        };
        let layers: Vec<Layer> = rids
            .into_iter()
            .map(|rid| Layer {
                rid,
                ssrc: random_u32(),
                last_write: Mutex::new(None),
            })
            .collect();
        let encodings: Vec<RTCRtpEncodingParameters> = layers
            .iter()
            .map(|layer| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    rid: layer.rid.clone().unwrap_or_default(),
                    ssrc: Some(layer.ssrc),
                    ..Default::default()
                },
                active: true,
                codec: kind.codec(),
                ..Default::default()
            })
            .collect();
        // The track id only has to be unique in this PC; a suffix keeps a re-published tid
        // from meeting its predecessor's leftovers.
        let track_id = format!("{tid}-{:08x}", random_u32());
        let stream_track = MediaStreamTrack::new(
            tid.to_owned(),
            track_id.clone(),
            track_id,
            kind.codec_kind(),
            encodings.clone(),
        );
        let local = Arc::new(TrackLocalStaticSample::new(Instant::now(), stream_track)?);
        let transceiver = self
            .pc
            .add_transceiver_from_track(
                Arc::clone(&local) as Arc<dyn TrackLocal>,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Sendonly,
                    streams: vec![],
                    send_encodings: encodings,
                }),
            )
            .await?;
        let sender = transceiver
            .sender()
            .await?
            .ok_or_else(|| anyhow!("transceiver for {tid} has no sender"))?;
        // The sender only takes packets with a payload type it negotiated; this is the one it
        // checks against.
        let payload_type = sender
            .get_parameters()
            .await?
            .rtp_parameters
            .codecs
            .first()
            .map(|codec| codec.payload_type)
            .ok_or_else(|| anyhow!("no codec for {kind:?}"))?;

        let counter = Arc::clone(
            lock(&self.keyframe_requests)
                .entry(tid.to_owned())
                .or_default(),
        );
        let rtcp_reader = tokio::spawn(count_keyframe_requests(Arc::clone(&local), counter));
        let track = Arc::new(PubTrack {
            kind,
            local,
            sender,
            transceiver,
            payload_type,
            layers,
            mid: Mutex::new(None),
            rtcp_reader,
        });
        lock(&self.tracks).insert(tid.to_owned(), track);
        Ok(())
    }

    /// Creates an offer, applies it, waits (bounded) for gathering and returns the SDP with
    /// its candidates. `ice_restart` makes fresh ICE credentials.
    pub async fn create_offer(&self, ice_restart: bool) -> anyhow::Result<String> {
        let offer = self
            .pc
            .create_offer(Some(RTCOfferOptions { ice_restart }))
            .await?;
        let sdp = set_local_and_gather(&self.pc, &self.events, offer).await?;
        let tracks: Vec<(String, Arc<PubTrack>)> = lock(&self.tracks)
            .iter()
            .map(|(tid, track)| (tid.clone(), Arc::clone(track)))
            .collect();
        for (tid, track) in tracks {
            if let Some(mid) = track.transceiver.mid().await? {
                *lock(&track.mid) = Some(mid.clone());
                lock(&self.mids).insert(tid, mid);
            }
        }
        Ok(sdp)
    }

    /// The mid of `tid`'s transceiver, once an offer has assigned one. Still answers after
    /// [`remove_track`](Self::remove_track), for the section that is now inactive.
    pub fn mid_of(&self, tid: &str) -> Option<String> {
        lock(&self.mids).get(tid).cloned()
    }

    pub async fn set_answer(&self, sdp: &str) -> anyhow::Result<()> {
        let answer = RTCSessionDescription::answer(sdp.to_owned()).context("parsing the answer")?;
        self.pc
            .set_remote_description(answer)
            .await
            .context("applying the answer")?;
        Ok(())
    }

    /// Stops sending `tid`: its sender is removed, so the next offer has the section inactive.
    pub async fn remove_track(&self, tid: &str) -> anyhow::Result<()> {
        let track = lock(&self.tracks)
            .remove(tid)
            .ok_or_else(|| anyhow!("track {tid} is not published"))?;
        self.pc.remove_track(&track.sender).await?;
        track.rtcp_reader.abort();
        Ok(())
    }

    /// Writes one frame: for audio one Opus packet's worth (20 ms), for video one VP8 frame
    /// (split into packets as needed). `rid` picks the simulcast layer of a simulcast track
    /// and must be `None` otherwise. Frames written before the PC is connected are dropped,
    /// as a browser's encoder output would be.
    pub async fn write(&self, tid: &str, rid: Option<&str>, payload: Bytes) -> anyhow::Result<()> {
        self.write_frame(tid, rid, payload, None).await
    }

    /// Writes one audio frame carrying an RFC 6464 audio level (0 loudest, 127 silence) in the
    /// `ssrc-audio-level` header extension, with the voice bit set for anything but silence.
    pub async fn write_audio_with_level(
        &self,
        tid: &str,
        payload: Bytes,
        level: u8,
    ) -> anyhow::Result<()> {
        let level = level.min(127);
        let extension = AudioLevelExtension {
            level,
            voice: level < 127,
        };
        self.write_frame(tid, None, payload, Some(extension)).await
    }

    async fn write_frame(
        &self,
        tid: &str,
        rid: Option<&str>,
        payload: Bytes,
        audio_level: Option<AudioLevelExtension>,
    ) -> anyhow::Result<()> {
        let track = lock(&self.tracks)
            .get(tid)
            .cloned()
            .ok_or_else(|| anyhow!("track {tid} is not published"))?;
        if audio_level.is_some() && track.kind != MediaKind::Audio {
            bail!("track {tid} is not audio");
        }
        let simulcast = track.layers.len() > 1;
        let layer = match rid {
            Some(rid) => track
                .layers
                .iter()
                .find(|layer| layer.rid.as_deref() == Some(rid))
                .ok_or_else(|| anyhow!("track {tid} has no layer {rid:?}"))?,
            None if simulcast => bail!("track {tid} is simulcast: name a rid"),
            None => &track.layers[0],
        };
        let now = Instant::now();
        // The packetizer stamps this frame and then advances the timestamp by `duration`, so
        // the interval since the previous write stands in for the next one: video timestamps
        // follow whatever frame rate the caller writes at.
        let duration = match track.kind {
            MediaKind::Audio => AUDIO_FRAME,
            MediaKind::Video => {
                let previous = lock(&layer.last_write).replace(now);
                previous.map_or(VIDEO_FRAME, |previous| {
                    (now - previous).clamp(Duration::from_millis(1), Duration::from_secs(1))
                })
            }
        };
        if !self.is_connected() {
            return Ok(());
        }
        let mut writer = track.local.sample_writer(layer.ssrc, track.payload_type);
        if let Some(extension) = audio_level {
            writer = writer.with_audio_level(extension);
        }
        if let Some(rid) = &layer.rid {
            // The receiver learns a layer's SSRC from these two, not from the SDP.
            let mid = lock(&track.mid)
                .clone()
                .ok_or_else(|| anyhow!("track {tid} has no mid yet"))?;
            writer = writer
                .with_extension(sdes_extension(SDES_MID_URI, &mid))
                .with_extension(sdes_extension(SDES_RID_URI, rid));
        }
        writer
            .write_sample(&Sample {
                data: payload,
                duration,
                ..Sample::new(now)
            })
            .await
            .with_context(|| format!("writing to {tid}"))?;
        Ok(())
    }

    /// PLI and FIR packets received for `tid` so far (across all its layers).
    pub fn keyframe_requests(&self, tid: &str) -> u64 {
        lock(&self.keyframe_requests)
            .get(tid)
            .map_or(0, |count| count.load(Ordering::Acquire))
    }

    /// Whether ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.events.connected.load(Ordering::Acquire)
    }

    pub async fn close(&self) {
        for track in lock(&self.tracks).values() {
            track.rtcp_reader.abort();
        }
        // Closing twice, or after the driver stopped, is harmless; there is nothing to report.
        let _ = self.pc.close().await;
        self.events.connected.store(false, Ordering::Release);
    }
}

async fn count_keyframe_requests(track: Arc<TrackLocalStaticSample>, counter: Arc<AtomicU64>) {
    // Ends when the track is unbound (removed) or the PC closes.
    while let Some(event) = track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else {
            continue;
        };
        let requests = packets
            .iter()
            .filter(|packet| is_keyframe_request(packet.as_ref()))
            .count() as u64;
        counter.fetch_add(requests, Ordering::AcqRel);
    }
}

/// What a [`SubPc`] received on one track.
#[derive(Debug, Clone, Default)]
pub struct RecvStats {
    pub packets: u64,
    pub payload_bytes: u64,
    /// The first 64 RTP payloads, as received (VP8 still has its payload descriptor).
    pub first_payloads: Vec<Bytes>,
    /// The latest payload.
    pub last_payload: Bytes,
    /// The SSRC of the latest packet.
    pub ssrc: u32,
    /// Packets that start a VP8 key frame.
    pub keyframes: u64,
    /// The `ssrc-audio-level` value of the latest audio packet that carried one.
    pub last_audio_level: Option<u8>,
    /// Packets per simulcast layer; empty for a plain track.
    pub packets_by_rid: BTreeMap<String, u64>,
}

struct SubShared {
    tracks: Mutex<HashMap<String, Arc<dyn TrackRemote>>>,
    stats: Mutex<HashMap<String, RecvStats>>,
    /// The negotiated id of the audio-level extension (0: none). BUNDLE requires one id per
    /// URI across the whole session, so one value serves every track.
    audio_level_id: AtomicU8,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl SubShared {
    async fn attach(this: &Arc<SubShared>, track: Arc<dyn TrackRemote>) {
        let tid = track.stream_id().await;
        let Some(kind) = MediaKind::from_codec_kind(track.kind().await) else {
            return;
        };
        lock(&this.tracks).insert(tid.clone(), Arc::clone(&track));
        let reader = tokio::spawn(read_track(Arc::clone(this), tid, kind, track));
        let mut readers = lock(&this.readers);
        readers.retain(|reader| !reader.is_finished());
        readers.push(reader);
    }

    fn record(&self, tid: &str, kind: MediaKind, packet: &rtc::rtp::Packet, rid: Option<&String>) {
        let audio_level_id = self.audio_level_id.load(Ordering::Acquire);
        let mut stats = lock(&self.stats);
        let entry = stats.entry(tid.to_owned()).or_default();
        entry.packets += 1;
        entry.payload_bytes += packet.payload.len() as u64;
        entry.ssrc = packet.header.ssrc;
        if entry.first_payloads.len() < KEPT_PAYLOADS {
            entry.first_payloads.push(packet.payload.clone());
        }
        entry.last_payload = packet.payload.clone();
        if let Some(rid) = rid {
            *entry.packets_by_rid.entry(rid.clone()).or_default() += 1;
        }
        match kind {
            MediaKind::Video => {
                if starts_vp8_keyframe(&packet.payload) {
                    entry.keyframes += 1;
                }
            }
            MediaKind::Audio => {
                if audio_level_id != 0
                    && let Some(value) = packet.header.get_extension(audio_level_id)
                    && let Some(byte) = value.first()
                {
                    entry.last_audio_level = Some(byte & 0x7f);
                }
            }
        }
    }
}

async fn read_track(
    shared: Arc<SubShared>,
    tid: String,
    kind: MediaKind,
    track: Arc<dyn TrackRemote>,
) {
    let mut rids: HashMap<u32, String> = HashMap::new();
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnOpen(init) => {
                if let Some(rid) = init.rid {
                    rids.insert(init.ssrc, rid);
                }
            }
            TrackRemoteEvent::OnRtpPacket(packet) => {
                shared.record(&tid, kind, &packet, rids.get(&packet.header.ssrc));
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
}

/// The subscribing peer connection: the server offers, the client answers.
pub struct SubPc {
    pc: Arc<dyn PeerConnection>,
    events: Arc<PcEvents>,
    shared: Arc<SubShared>,
    last_offer: Mutex<Option<String>>,
    /// Whether a description with media has been applied to the PC yet.
    negotiated: AtomicBool,
    /// For the answers this module writes itself (to offers without media).
    session_id: u64,
    session_version: AtomicU64,
}

impl fmt::Debug for SubPc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubPc")
            .field("active_streams", &self.active_streams())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl SubPc {
    pub async fn new() -> anyhow::Result<SubPc> {
        let shared = Arc::new(SubShared {
            tracks: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            audio_level_id: AtomicU8::new(0),
            readers: Mutex::new(Vec::new()),
        });
        let events = PcEvents::new(Some(Arc::clone(&shared)));
        let pc = build_pc(Arc::clone(&events), false).await?;
        Ok(SubPc {
            pc,
            events,
            shared,
            last_offer: Mutex::new(None),
            negotiated: AtomicBool::new(false),
            // RFC 4566 asks for a session id that fits 63 bits.
            session_id: (u64::from(random_u32()) << 31) ^ u64::from(random_u32()),
            session_version: AtomicU64::new(1),
        })
    }

    /// Applies a server offer and returns the answer (with candidates, gathered bounded).
    ///
    /// webrtc-rs rejects an offer without media sections (no ICE credentials to extract), and
    /// only after it has taken the offer as its remote description, which wedges the PC. So
    /// until media has been negotiated such an offer is answered here, with a bare
    /// `v=/o=/s=/t=` answer like a browser's, and the PC is left untouched.
    pub async fn handle_offer(&self, sdp: &str) -> anyhow::Result<String> {
        let offer = RTCSessionDescription::offer(sdp.to_owned()).context("parsing the offer")?;
        let has_media = sdp_sections(sdp)
            .iter()
            .any(|section| section.media.is_some());
        if !has_media {
            if self.negotiated.load(Ordering::Acquire) {
                bail!("offer without media sections after media was negotiated");
            }
            *lock(&self.last_offer) = Some(sdp.to_owned());
            return Ok(self.bare_answer());
        }
        self.pc
            .set_remote_description(offer)
            .await
            .context("applying the offer")?;
        self.negotiated.store(true, Ordering::Release);
        *lock(&self.last_offer) = Some(sdp.to_owned());
        self.shared.audio_level_id.store(
            extmap_id(sdp, AUDIO_LEVEL_URI).unwrap_or(0),
            Ordering::Release,
        );
        let answer = self.pc.create_answer(None).await?;
        set_local_and_gather(&self.pc, &self.events, answer).await
    }

    fn bare_answer(&self) -> String {
        let version = self.session_version.fetch_add(1, Ordering::AcqRel);
        format!(
            "v=0\r\no=- {} {version} IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n",
            self.session_id
        )
    }

    /// The last offer applied (for tests that look at the SDP itself).
    pub fn last_offer(&self) -> Option<String> {
        lock(&self.last_offer).clone()
    }

    /// Stream ids (first `msid` token) the last applied offer sends: sections that are
    /// `sendonly` or `sendrecv`, not rejected, and carry an msid.
    pub fn active_streams(&self) -> Vec<String> {
        let Some(offer) = lock(&self.last_offer).clone() else {
            return Vec::new();
        };
        let mut streams: Vec<String> = Vec::new();
        for section in sdp_sections(&offer) {
            let Some(media) = section.media else { continue };
            if media.port == Some(0) || !section.sends {
                continue;
            }
            if let Some(stream) = section.msid_stream
                && !streams.contains(&stream)
            {
                streams.push(stream);
            }
        }
        streams
    }

    /// What arrived on `tid` so far; `None` before its first packet.
    pub fn stats(&self, tid: &str) -> Option<RecvStats> {
        lock(&self.shared.stats).get(tid).cloned()
    }

    /// Sends an RTCP PLI for every SSRC seen on `tid`.
    pub async fn send_pli(&self, tid: &str) -> anyhow::Result<()> {
        let track = lock(&self.shared.tracks)
            .get(tid)
            .cloned()
            .ok_or_else(|| anyhow!("no remote track {tid}"))?;
        let mut ssrcs = track.ssrcs().await;
        if let Some(stats) = self.stats(tid)
            && !ssrcs.contains(&stats.ssrc)
        {
            ssrcs.push(stats.ssrc);
        }
        ssrcs.retain(|ssrc| *ssrc != 0);
        if ssrcs.is_empty() {
            bail!("no SSRC known for {tid} yet");
        }
        let plis: Vec<Box<dyn rtc::rtcp::Packet>> = ssrcs
            .into_iter()
            .map(|media_ssrc| {
                Box::new(PictureLossIndication {
                    sender_ssrc: 0,
                    media_ssrc,
                }) as Box<dyn rtc::rtcp::Packet>
            })
            .collect();
        track.write_rtcp(plis).await?;
        Ok(())
    }

    /// Whether ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.events.connected.load(Ordering::Acquire)
    }

    pub async fn close(&self) {
        for reader in lock(&self.shared.readers).drain(..) {
            reader.abort();
        }
        // Closing twice, or after the driver stopped, is harmless; there is nothing to report.
        let _ = self.pc.close().await;
        self.events.connected.store(false, Ordering::Release);
    }
}

/// The parts of one SDP section (`m=` and what follows) this module reads.
#[derive(Debug, Default)]
struct SdpSection {
    /// `None` for the session part before the first `m=`.
    media: Option<SdpMedia>,
    sends: bool,
    msid_stream: Option<String>,
}

#[derive(Debug)]
struct SdpMedia {
    /// `None` when the port does not parse.
    port: Option<u16>,
}

/// Splits SDP text into sections without judging it; anything unrecognised is skipped.
fn sdp_sections(sdp: &str) -> Vec<SdpSection> {
    let mut sections = vec![SdpSection::default()];
    for line in sdp.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("m=") {
            sections.push(SdpSection {
                media: Some(SdpMedia {
                    port: rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|port| port.split('/').next().and_then(|port| port.parse().ok())),
                }),
                // RFC 4566: without a direction attribute a section is sendrecv.
                sends: true,
                msid_stream: None,
            });
            continue;
        }
        let Some(section) = sections.last_mut() else {
            continue;
        };
        let Some(attribute) = line.strip_prefix("a=") else {
            continue;
        };
        match attribute {
            "sendonly" | "sendrecv" => section.sends = true,
            "recvonly" | "inactive" => section.sends = false,
            _ => {}
        }
        if let Some(msid) = attribute.strip_prefix("msid:") {
            if section.msid_stream.is_none() {
                section.msid_stream = msid.split_whitespace().next().map(str::to_owned);
            }
        } else if let Some(ssrc_attr) = attribute.strip_prefix("ssrc:") {
            // Plan-B style `a=ssrc:<n> msid:<stream> <track>`, for offers without `a=msid`.
            let mut parts = ssrc_attr.split_whitespace();
            let _ssrc = parts.next();
            if let Some(msid) = parts.next().and_then(|part| part.strip_prefix("msid:"))
                && section.msid_stream.is_none()
                && !msid.is_empty()
            {
                section.msid_stream = Some(msid.to_owned());
            }
        }
    }
    sections
}

/// The id an `a=extmap` line gives `uri`, if any (one-byte ids only, which is all webrtc-rs
/// offers and what this module reads back).
fn extmap_id(sdp: &str, uri: &str) -> Option<u8> {
    sdp.lines().map(str::trim).find_map(|line| {
        let rest = line.strip_prefix("a=extmap:")?;
        let mut parts = rest.split_whitespace();
        let id = parts.next()?.split('/').next()?.parse::<u8>().ok()?;
        (parts.next()? == uri && (1..=14).contains(&id)).then_some(id)
    })
}

/// A synthetic VP8 frame: byte 0 carries the key-frame bit as VP8 defines it (bit 0 clear for
/// a key frame), key frames have the start code `9d 01 2a` and a 320x240 size at bytes 3..10,
/// and the rest repeats a pattern derived from `seq` (whose big-endian bytes come first), so
/// frames are recognisable and distinct. The result is exactly `len` bytes, truncating the
/// header if `len` is smaller.
pub fn vp8_frame(seq: u32, keyframe: bool, len: usize) -> Bytes {
    let header_len = if keyframe { 10 } else { 3 };
    // The first partition size is a 19-bit field; anything plausible will do.
    let first_partition = (len.saturating_sub(header_len) as u32).min(0x7_ffff);
    let tag = u32::from(!keyframe) | (1 << 4) | (first_partition << 5);
    let mut frame = Vec::with_capacity(len.max(header_len));
    frame.extend_from_slice(&tag.to_le_bytes()[..3]);
    if keyframe {
        frame.extend_from_slice(&[0x9d, 0x01, 0x2a]);
        frame.extend_from_slice(&320u16.to_le_bytes());
        frame.extend_from_slice(&240u16.to_le_bytes());
    }
    frame.extend_from_slice(&seq.to_be_bytes());
    let mut i: u32 = 0;
    while frame.len() < len {
        frame.push((seq.wrapping_mul(31).wrapping_add(i) & 0xff) as u8);
        i += 1;
    }
    frame.truncate(len);
    Bytes::from(frame)
}

/// Skips the VP8 payload descriptor (RFC 7741 §4.2) of one RTP payload and returns what
/// follows: the whole frame when it fit in one packet. `None` if the descriptor is truncated.
pub fn vp8_payload_frame(rtp_payload: &[u8]) -> Option<&[u8]> {
    let first = *rtp_payload.first()?;
    let mut at = 1;
    if first & 0x80 != 0 {
        let extension = *rtp_payload.get(at)?;
        at += 1;
        if extension & 0x80 != 0 {
            // I: picture id, 7 bits or (with M) 15 bits.
            let picture_id = *rtp_payload.get(at)?;
            at += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if extension & 0x40 != 0 {
            // L: TL0PICIDX.
            at += 1;
        }
        if extension & 0x30 != 0 {
            // T or K: the TID/Y/KEYIDX byte.
            at += 1;
        }
    }
    rtp_payload.get(at..)
}

/// Whether an RTP payload starts a VP8 key frame: the first packet of partition 0 (S set,
/// PID 0) whose frame tag has the inverse key-frame bit clear.
fn starts_vp8_keyframe(rtp_payload: &[u8]) -> bool {
    let Some(&descriptor) = rtp_payload.first() else {
        return false;
    };
    let starts_partition_zero = descriptor & 0x10 != 0 && descriptor & 0x07 == 0;
    starts_partition_zero
        && vp8_payload_frame(rtp_payload)
            .and_then(|frame| frame.first())
            .is_some_and(|tag| tag & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_frame_marks_keyframes() {
        let key = vp8_frame(7, true, 100);
        assert_eq!(key.len(), 100);
        assert_eq!(key[0] & 1, 0);
        assert_eq!(&key[3..6], &[0x9d, 0x01, 0x2a]);
        assert_eq!(&key[10..14], &7u32.to_be_bytes());
        let delta = vp8_frame(8, false, 50);
        assert_eq!(delta[0] & 1, 1);
        assert_eq!(&delta[3..7], &8u32.to_be_bytes());
        assert_eq!(vp8_frame(1, true, 2).len(), 2);
        assert_ne!(vp8_frame(1, false, 64), vp8_frame(2, false, 64));
    }

    #[test]
    fn vp8_descriptor_is_stripped() {
        let frame = [0xaa, 0xbb];
        // Minimal descriptor.
        assert_eq!(vp8_payload_frame(&[0x10, 0xaa, 0xbb]), Some(&frame[..]));
        // X, I with a 15-bit picture id.
        assert_eq!(
            vp8_payload_frame(&[0x90, 0x80, 0x81, 0x23, 0xaa, 0xbb]),
            Some(&frame[..])
        );
        // X, I with a 7-bit picture id, L, T.
        assert_eq!(
            vp8_payload_frame(&[0x90, 0xe0, 0x05, 0x01, 0x40, 0xaa, 0xbb]),
            Some(&frame[..])
        );
        // X, K only.
        assert_eq!(
            vp8_payload_frame(&[0x80, 0x10, 0x1f, 0xaa, 0xbb]),
            Some(&frame[..])
        );
        assert_eq!(vp8_payload_frame(&[]), None);
        assert_eq!(vp8_payload_frame(&[0x90]), None);
        assert_eq!(vp8_payload_frame(&[0x90, 0x80, 0x81]), None);
    }

    #[test]
    fn keyframe_start_detection() {
        let key = vp8_frame(1, true, 20);
        let mut payload = vec![0x10];
        payload.extend_from_slice(&key);
        assert!(starts_vp8_keyframe(&payload));
        payload[0] = 0x00; // continuation packet
        assert!(!starts_vp8_keyframe(&payload));
        let mut delta = vec![0x10];
        delta.extend_from_slice(&vp8_frame(2, false, 20));
        assert!(!starts_vp8_keyframe(&delta));
    }

    #[test]
    fn sdp_sections_find_active_streams() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=msid:alice a1\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=inactive\r\na=msid:bob v1\r\n\
            m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\na=msid:carol v\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:3\r\na=ssrc:5 msid:dave a\r\n\
            m=video 9\r\na=sendonly\r\n";
        let active: Vec<String> = sdp_sections(sdp)
            .into_iter()
            .filter(|s| s.media.as_ref().is_some_and(|m| m.port != Some(0)) && s.sends)
            .filter_map(|s| s.msid_stream)
            .collect();
        assert_eq!(active, vec!["alice".to_owned(), "dave".to_owned()]);
        let junk = sdp_sections("garbage\n\0\u{7f}\nm=\nm=audio x\na=msid:\n");
        assert_eq!(junk.len(), 3);
        assert!(junk.iter().all(|s| s.msid_stream.is_none()));
        assert!(junk[2].media.as_ref().is_some_and(|m| m.port.is_none()));
    }

    #[test]
    fn extmap_ids_are_read() {
        let sdp = "a=extmap:3 http://x\r\na=extmap:5/sendrecv urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n";
        assert_eq!(extmap_id(sdp, AUDIO_LEVEL_URI), Some(5));
        assert_eq!(extmap_id("a=extmap:99 x", "x"), None);
        assert_eq!(extmap_id("a=extmap:", AUDIO_LEVEL_URI), None);
    }
}
