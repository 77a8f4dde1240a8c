//! A native participant with media: the signaling [`Session`] plus webrtc-rs peer
//! connections, negotiating exactly as `@mux/spaces-web` does (`pending_track`s then one
//! `offer` per publish; every `sub_offer` answered with `sub_answer`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use spacegate_proto::signaling::{
    ClientMessage, Envelope, PendingTrack, ServerMessage, SfuDescription, TrackKind,
};

use crate::media::{MediaKind, PubPc, SubPc, vp8_frame};
use crate::signaling::{ClientError, JoinOptions, Session};

/// A track to publish.
#[derive(Debug, Clone)]
pub struct TrackSpec {
    pub tid: String,
    pub kind: MediaKind,
    /// The SDK's source name: "microphone", "camera", "screenshare", …
    pub source: String,
    /// Simulcast layers, lowest first (video only); empty for a single encoding.
    pub rids: Vec<String>,
}

impl TrackSpec {
    pub fn audio(tid: &str) -> Self {
        TrackSpec {
            tid: tid.into(),
            kind: MediaKind::Audio,
            source: "microphone".into(),
            rids: Vec::new(),
        }
    }

    pub fn video(tid: &str) -> Self {
        TrackSpec {
            tid: tid.into(),
            kind: MediaKind::Video,
            source: "camera".into(),
            rids: Vec::new(),
        }
    }
}

/// A joined participant with a subscriber peer connection and, once it publishes, a
/// publisher one.
#[derive(Debug)]
pub struct Participant {
    pub session: Session,
    pub sub: Arc<SubPc>,
    pub publisher: Option<Arc<PubPc>>,
    /// Messages read while waiting for an `answer`, for [`Participant::next`].
    backlog: VecDeque<Envelope<ServerMessage>>,
    sub_offers: u64,
    last_answer: String,
    last_offer: String,
    last_sub_answer: String,
}

impl Participant {
    /// Joins and answers the `sub_sfus` offer, as the SDK does before anything else.
    pub async fn join(base: &str, token: &str, options: &JoinOptions) -> anyhow::Result<Self> {
        let session = Session::join(base, token, options).await?;
        let sub = Arc::new(SubPc::new().await?);
        let sfus = session.joined().sub_sfus.clone();
        let mut p = Participant {
            session,
            sub,
            publisher: None,
            backlog: VecDeque::new(),
            sub_offers: 0,
            last_answer: String::new(),
            last_offer: String::new(),
            last_sub_answer: String::new(),
        };
        for offer in sfus {
            p.answer_sub_offer(&offer).await?;
        }
        Ok(p)
    }

    pub fn connection_id(&self) -> &str {
        &self.session.joined().connection_id
    }

    /// The server's latest `answer` on the publisher PC.
    pub fn last_answer(&self) -> &str {
        &self.last_answer
    }

    /// Our latest `offer` on the publisher PC.
    pub fn last_offer(&self) -> &str {
        &self.last_offer
    }

    /// Our latest answer on the subscriber PC.
    pub fn last_sub_answer(&self) -> &str {
        &self.last_sub_answer
    }

    /// How many `sub_offer`s (after the one in `joined`) were answered.
    pub fn sub_offers(&self) -> u64 {
        self.sub_offers
    }

    async fn answer_sub_offer(&mut self, offer: &SfuDescription) -> anyhow::Result<()> {
        let sdp = self.sub.handle_offer(&offer.sdp).await?;
        self.last_sub_answer.clone_from(&sdp);
        self.session
            .send(
                ClientMessage::SubAnswer(SfuDescription {
                    sfu_id: offer.sfu_id.clone(),
                    sdp,
                }),
                None,
            )
            .await?;
        Ok(())
    }

    /// Answers a `sub_offer` if `m` is one.
    async fn absorb(&mut self, m: &Envelope<ServerMessage>) -> anyhow::Result<()> {
        if let ServerMessage::SubOffer(offer) = &m.message {
            self.sub_offers += 1;
            self.answer_sub_offer(offer).await?;
        }
        Ok(())
    }

    /// The next server message. `sub_offer`s are answered on the way and still returned,
    /// so tests can watch them.
    pub async fn next(&mut self) -> Result<Envelope<ServerMessage>, ClientError> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        let m = self.session.next().await?;
        self.absorb(&m)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(m)
    }

    /// Reads (answering offers) until `done` holds for a message, or `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&ServerMessage) -> bool,
    ) -> anyhow::Result<ServerMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = tokio::time::timeout(left, self.next())
                .await
                .context("timed out waiting for a message")??;
            if done(&m.message) {
                return Ok(m.message);
            }
        }
    }

    /// Reads (answering offers) until `check(self)` holds, or `timeout`. For conditions
    /// on media that arrive without any message; other messages read meanwhile are
    /// dropped, so wait for those with [`Participant::wait_for`] first.
    pub async fn pump_until(
        &mut self,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !check(self) {
            if tokio::time::Instant::now() >= deadline {
                bail!("condition not met within {timeout:?}");
            }
            if let Ok(Some(m)) = self.session.next_within(Duration::from_millis(50)).await {
                self.absorb(&m).await?;
            }
        }
        Ok(())
    }

    /// Publishes `tracks`: `pending_track` for each, then one `offer`, then waits for the
    /// `answer` (answering `sub_offer`s meanwhile).
    pub async fn publish(&mut self, tracks: &[TrackSpec]) -> anyhow::Result<Arc<PubPc>> {
        let pc = match &self.publisher {
            Some(pc) => pc.clone(),
            None => {
                let pc = Arc::new(PubPc::new().await.context("creating the publisher PC")?);
                self.publisher = Some(pc.clone());
                pc
            }
        };
        for t in tracks {
            if t.rids.is_empty() {
                pc.add_track(&t.tid, t.kind)
                    .await
                    .context("adding a track")?;
            } else {
                let rids: Vec<&str> = t.rids.iter().map(String::as_str).collect();
                pc.add_simulcast_video(&t.tid, &rids)
                    .await
                    .context("adding a simulcast track")?;
            }
        }
        let offer = pc.create_offer(false).await.context("creating the offer")?;
        for t in tracks {
            let mid = pc
                .mid_of(&t.tid)
                .context("track has no mid after the offer")?;
            let (kind, width, height) = match t.kind {
                MediaKind::Audio => (TrackKind::Audio, 0, 0),
                MediaKind::Video => (TrackKind::Video, 640, 480),
            };
            self.session
                .send(
                    ClientMessage::PendingTrack(PendingTrack {
                        tid: t.tid.clone(),
                        kind,
                        name: t.tid.clone(),
                        muted: false,
                        source: t.source.clone(),
                        height,
                        width,
                        mid,
                    }),
                    None,
                )
                .await?;
        }
        self.negotiate(&pc, offer).await?;
        Ok(pc)
    }

    /// Unpublishes `tid`: as the SDK, only an offer with the section inactive.
    pub async fn unpublish(&mut self, tid: &str) -> anyhow::Result<()> {
        let pc = self.publisher.clone().context("nothing published")?;
        pc.remove_track(tid).await?;
        let offer = pc.create_offer(false).await?;
        self.negotiate(&pc, offer).await
    }

    /// Restarts ICE on the publisher PC (new credentials), as the SDK does when its pub
    /// PC's ICE fails: an `offer` with no `pending_track`. Returns the server's answer.
    pub async fn restart_ice(&mut self) -> anyhow::Result<String> {
        let pc = self.publisher.clone().context("nothing published")?;
        let offer = pc.create_offer(true).await?;
        self.negotiate(&pc, offer).await?;
        Ok(self.last_answer.clone())
    }

    async fn negotiate(&mut self, pc: &PubPc, offer: String) -> anyhow::Result<()> {
        self.last_offer.clone_from(&offer);
        self.session.send(ClientMessage::Offer(offer), None).await?;
        loop {
            let m = self
                .session
                .next()
                .await
                .context("waiting for the answer")?;
            self.absorb(&m).await.context("answering a sub_offer")?;
            match m.message {
                ServerMessage::Answer(sdp) => {
                    pc.set_answer(&sdp).await.context("applying the answer")?;
                    self.last_answer = sdp;
                    return Ok(());
                }
                ServerMessage::Error(e) => bail!("offer refused: {}", e.message),
                _ => self.backlog.push_back(m),
            }
        }
    }

    pub async fn close(self) {
        if let Some(p) = &self.publisher {
            p.close().await;
        }
        self.sub.close().await;
        self.session.leave().await;
    }
}

/// Synthetic media for a publisher: 50 audio packets/s (each carrying `level` as its RFC
/// 6464 audio level) and 30 video frames/s, a keyframe whenever one is requested and
/// every 2 s. Runs until the returned handle is aborted.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// -dBov: 0 loudest, 127 silence.
    pub level: Arc<AtomicU8>,
    /// Frames written so far, per kind.
    pub audio_frames: Arc<AtomicU64>,
    pub video_frames: Arc<AtomicU64>,
    /// Which simulcast layers are sent: bit i for `rids[i]` (all by default), so a test
    /// can stop a layer the way a congested browser does.
    pub layers: Arc<AtomicU8>,
}

impl Synthetic {
    pub fn start(
        pc: Arc<PubPc>,
        audio: Option<String>,
        video: Option<(String, Vec<String>)>,
        level: u8,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let s = Synthetic {
            level: Arc::new(AtomicU8::new(level)),
            audio_frames: Arc::default(),
            video_frames: Arc::default(),
            layers: Arc::new(AtomicU8::new(u8::MAX)),
        };
        let me = s.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n: u64 = 0;
            let mut seen_requests = 0;
            loop {
                tick.tick().await;
                n += 1;
                if n % 2 == 0
                    && let Some(tid) = &audio
                {
                    let seq = me.audio_frames.fetch_add(1, Ordering::Relaxed);
                    let payload = audio_payload(seq);
                    let level = me.level.load(Ordering::Relaxed);
                    // A write error means this track was unpublished (or the peer closed):
                    // the other track keeps going, as a browser's would.
                    let _ = pc.write_audio_with_level(tid, payload, level).await;
                }
                if n % 3 == 0
                    && let Some((tid, rids)) = &video
                {
                    let seq = me.video_frames.fetch_add(1, Ordering::Relaxed);
                    let requests = pc.keyframe_requests(tid);
                    let keyframe = seq % 60 == 0 || requests != seen_requests;
                    seen_requests = requests;
                    let frame = vp8_frame(seq as u32, keyframe, FRAME_LEN);
                    if rids.is_empty() {
                        let _ = pc.write(tid, None, frame).await;
                    } else {
                        let mask = me.layers.load(Ordering::Relaxed);
                        for (i, rid) in rids.iter().enumerate() {
                            if mask & (1 << i) == 0 {
                                continue;
                            }
                            // Layers differ in size, so a receiver can tell which one it
                            // is being sent.
                            let frame = vp8_frame(seq as u32, keyframe, layer_frame_len(i));
                            let _ = pc.write(tid, Some(rid), frame).await;
                        }
                    }
                }
            }
        });
        (s, task)
    }
}

/// Synthetic video frame size (one RTP packet).
pub const FRAME_LEN: usize = 200;

/// Synthetic frame size of simulcast layer `i`: 120, 200, 280, … bytes.
pub fn layer_frame_len(i: usize) -> usize {
    120 + 80 * i
}

/// A recognisable audio payload: its sequence number, then a pattern.
pub fn audio_payload(seq: u64) -> Bytes {
    let mut v = Vec::with_capacity(80);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend((0..72u8).map(|i| i.wrapping_mul(7).wrapping_add(seq as u8)));
    Bytes::from(v)
}
