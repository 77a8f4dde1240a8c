//! Media end to end: native webrtc-rs participants against the server's str0m SFU over
//! loopback, negotiating through the real gateway exactly as the browser SDK does.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Fx;
use spacegate_client::JoinOptions;
use spacegate_client::media::{PubPc, vp8_frame, vp8_payload_frame};
use spacegate_client::participant::{Participant, Synthetic, TrackSpec, audio_payload};
use spacegate_proto::Role;
use spacegate_proto::signaling::{
    CandidateMessage, CandidateTarget, ClientMessage, ConnectionTracks, ConnectionsRequest,
    ServerMessage, SfuDescription, SigCandidate,
};
use spacegate_server::gateway::GatewayConfig;
use spacegate_sfu::SfuStats;

const WAIT: Duration = Duration::from_secs(15);

impl Fx {
    async fn join_with(&self, participant: &str, managed: u8) -> Participant {
        let options = JoinOptions {
            managed_subscriptions: managed,
            ..JoinOptions::default()
        };
        Participant::join(
            &self.s.ws_base(),
            &self.token(Some(participant), Role::Publisher),
            &options,
        )
        .await
        .expect("join")
    }

    async fn join(&self, participant: &str) -> Participant {
        self.join_with(participant, 16).await
    }

    async fn stats(&self) -> SfuStats {
        self.s
            .state
            .gateway
            .media
            .stats()
            .await
            .expect("media task")
    }

    /// Waits (bounded) for the SFU's counters to satisfy `check`.
    async fn wait_stats(&self, check: impl Fn(&SfuStats) -> bool) -> SfuStats {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.stats().await;
            if check(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "SFU stats never matched: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A publisher of `<name>-a` and `<name>-v`, with synthetic media running (silent audio:
/// speaker ranking is tested on the SFU's in-memory harness).
async fn publisher(fx: &Fx, name: &str) -> (Participant, Synthetic) {
    let mut p = fx.join(name).await;
    let (a, v) = (format!("{name}-a"), format!("{name}-v"));
    let pc = p
        .publish(&[TrackSpec::audio(&a), TrackSpec::video(&v)])
        .await
        .expect("publish");
    let (synthetic, _task) = Synthetic::start(pc, Some(a), Some((v, Vec::new())), 127);
    (p, synthetic)
}

fn packets(p: &Participant, tid: &str) -> u64 {
    p.sub.stats(tid).map_or(0, |s| s.packets)
}

fn assert_audio_intact(p: &Participant, tid: &str) {
    let s = p.sub.stats(tid).expect("audio stats");
    assert!(!s.first_payloads.is_empty());
    for payload in &s.first_payloads {
        let seq = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
        assert_eq!(payload, &audio_payload(seq), "audio payload {seq} changed");
    }
}

fn assert_video_intact(p: &Participant, tid: &str) {
    let s = p.sub.stats(tid).expect("video stats");
    assert!(!s.first_payloads.is_empty());
    for payload in &s.first_payloads {
        let frame = vp8_payload_frame(payload).expect("VP8 descriptor");
        let keyframe = frame[0] & 1 == 0;
        let at = if keyframe { 10 } else { 3 };
        let seq = u32::from_be_bytes(frame[at..at + 4].try_into().expect("seq"));
        assert_eq!(
            frame,
            &vp8_frame(seq, keyframe, frame.len())[..],
            "frame {seq}"
        );
        assert_eq!(frame.len(), 200, "frame {seq} truncated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_audio_and_video_reach_two_subscribers_intact() {
    let fx = Fx::new().await;
    let (_alice, _media) = publisher(&fx, "alice").await;
    let mut bob = fx.join("bob").await;
    let mut carol = fx.join("carol").await;
    for p in [&mut bob, &mut carol] {
        p.pump_until(WAIT, |p| {
            packets(p, "alice-a") >= 50 && packets(p, "alice-v") >= 30
        })
        .await
        .expect("media reaches the subscriber");
        assert_audio_intact(p, "alice-a");
        assert_video_intact(p, "alice-v");
        let mut streams = p.sub.active_streams();
        streams.sort();
        assert_eq!(streams, ["alice-a", "alice-v"]);
    }
    let s = fx.stats().await;
    assert_eq!(s.published_tracks, 2);
    assert_eq!(s.forwards, 4, "2 tracks × 2 subscribers");
    // What operators see moves with it.
    let metrics = spacegate_server::metrics::render(&fx.s.state.gateway);
    assert!(
        metric(&metrics, "spacegate_forwarded_frames_total") >= 160.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "spacegate_forwarded_bytes_total") > 0.0);
    assert_eq!(metric(&metrics, "spacegate_sfu_members"), 3.0);
    assert!(metric(&metrics, "spacegate_sfu_peer_connections") >= 3.0);
    assert!(metric(&metrics, "spacegate_media_queue_wait_seconds_count") >= 3.0);
}

/// The value of an unlabelled sample in a metrics text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_plane_panic_restarts_it_and_reconnects_only_clients_with_media() {
    let fx = Fx::new().await;
    let (mut alice, _media) = publisher(&fx, "alice").await;
    // Manual mode, nothing subscribed: bob has no peer connection.
    let mut bob = fx.join_with("bob", 0).await;
    fx.wait_stats(|s| s.members == 2 && s.peer_connections >= 1)
        .await;

    fx.s.state.gateway.crash_media_plane_for_tests().await;

    // Alice's peer connections died with the SFU: she is told to reconnect (1012).
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match alice.next().await {
                Ok(_) => continue,
                Err(spacegate_client::ClientError::Closed { code }) => break code,
                Err(e) => panic!("unexpected: {e}"),
            }
        }
    })
    .await
    .expect("alice is closed");
    assert_eq!(code, Some(1012));
    // Bob noticed nothing, and the new SFU knows him: he can publish at once.
    bob.publish(&[TrackSpec::audio("bob-a")])
        .await
        .expect("bob publishes after the restart");
    let s = fx
        .wait_stats(|s| s.members == 1 && s.published_tracks == 1)
        .await;
    assert_eq!(s.peer_connections, 1);
    let metrics = spacegate_server::metrics::render(&fx.s.state.gateway);
    assert_eq!(metric(&metrics, "spacegate_media_restarts_total"), 1.0);
    let ready =
        fx.s.http
            .get(fx.s.url("/readyz"))
            .send()
            .await
            .expect("readyz");
    assert_eq!(
        ready.status(),
        200,
        "ready again once the media plane is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribers_pli_reaches_the_publisher() {
    // No keyframe-request throttle: its window (500 ms by default) is the SFU harness's
    // to test, in virtual time; here a PLI must simply make it through.
    let fx = Fx::with(GatewayConfig {
        media: spacegate_server::media::MediaConfig {
            keyframe_interval: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let (alice, _media) = publisher(&fx, "alice").await;
    let pc = alice.publisher.clone().expect("pc");
    let mut bob = fx.join("bob").await;
    bob.pump_until(WAIT, |p| packets(p, "alice-v") >= 10)
        .await
        .expect("video flows");
    let before = pc.keyframe_requests("alice-v");
    bob.sub.send_pli("alice-v").await.expect("pli");
    let deadline = tokio::time::Instant::now() + WAIT;
    while pc.keyframe_requests("alice-v") <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "PLI never reached alice"
        );
        bob.sub.send_pli("alice-v").await.expect("pli");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_and_unmute_reach_others_and_unpublish_removes_the_track() {
    let fx = Fx::new().await;
    let (mut alice, _media) = publisher(&fx, "alice").await;
    let mut bob = fx.join("bob").await;
    bob.pump_until(WAIT, |p| packets(p, "alice-v") >= 5)
        .await
        .expect("video flows");

    alice
        .session
        .send(ClientMessage::MuteTrack("alice-v".into()), None)
        .await
        .expect("send");
    let m = bob
        .wait_for(WAIT, |m| matches!(m, ServerMessage::TrackMuted(_)))
        .await
        .expect("track_muted");
    let ServerMessage::TrackMuted(e) = m else {
        unreachable!()
    };
    assert_eq!(
        (e.connection_id.as_str(), e.track.tid.as_str()),
        (alice.connection_id(), "alice-v")
    );
    alice
        .session
        .send(ClientMessage::UnmuteTrack("alice-v".into()), None)
        .await
        .expect("send");
    bob.wait_for(
        WAIT,
        |m| matches!(m, ServerMessage::TrackUnmuted(e) if e.track.tid == "alice-v"),
    )
    .await
    .expect("track_unmuted");

    // Unpublish is only an offer with the section inactive, as the SDK sends it.
    alice.unpublish("alice-v").await.expect("unpublish");
    bob.wait_for(
        WAIT,
        |m| matches!(m, ServerMessage::RemoveTrack(e) if e.track.tid == "alice-v"),
    )
    .await
    .expect("remove_track");
    bob.pump_until(WAIT, |p| p.sub.active_streams() == ["alice-a".to_string()])
        .await
        .unwrap_or_else(|e| panic!("{e}: streams {:?}", bob.sub.active_streams()));
    fx.wait_stats(|s| s.published_tracks == 1 && s.forwards == 1)
        .await;
    // Audio still flows.
    let audio = packets(&bob, "alice-a");
    bob.pump_until(WAIT, |p| packets(p, "alice-a") > audio + 20)
        .await
        .expect("audio continues");

    // A later track (a screen share) is a renegotiation on a new mid; it reaches bob.
    let mut share = TrackSpec::video("alice-s");
    share.source = "screenshare".into();
    let pc = alice.publish(&[share]).await.expect("publish later");
    let (_share_media, _task) =
        Synthetic::start(pc, None, Some(("alice-s".into(), Vec::new())), 127);
    bob.wait_for(
        WAIT,
        |m| matches!(m, ServerMessage::AddTrack(e) if e.track.tid == "alice-s"),
    )
    .await
    .expect("add_track for the later track");
    bob.pump_until(WAIT, |p| packets(p, "alice-s") >= 10)
        .await
        .expect("the later track flows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_subscriptions_deliver_only_what_was_asked_for() {
    let fx = Fx::new().await;
    let (alice, _media) = publisher(&fx, "alice").await;
    let mut viewer = fx.join_with("viewer", 0).await;
    let alice_conn = alice.connection_id().to_string();
    // Nothing is forwarded before a subscription.
    fx.wait_stats(|s| s.published_tracks == 2).await;
    assert_eq!(fx.stats().await.forwards, 0);

    let request = |tids: &[&str], conn: &str| ConnectionsRequest {
        connections: vec![ConnectionTracks {
            connection_id: conn.to_string(),
            track_ids: tids.iter().map(|t| t.to_string()).collect(),
        }],
    };
    // Unknown participant and unknown track: failures, nothing forwarded.
    for (conn, tid) in [("nobody", "alice-v"), (alice_conn.as_str(), "nope")] {
        viewer
            .session
            .send(ClientMessage::SubscribeTracks(request(&[tid], conn)), None)
            .await
            .expect("send");
        let reply = viewer
            .wait_for(WAIT, |m| matches!(m, ServerMessage::SubscribeTracks(_)))
            .await
            .expect("reply");
        let ServerMessage::SubscribeTracks(r) = reply else {
            unreachable!()
        };
        assert!(r.successes.is_empty());
        assert_eq!(r.failures[0].connection_id, conn);
    }

    viewer
        .session
        .send(
            ClientMessage::SubscribeTracks(request(&["alice-v"], &alice_conn)),
            None,
        )
        .await
        .expect("send");
    let reply = viewer
        .wait_for(WAIT, |m| matches!(m, ServerMessage::SubscribeTracks(_)))
        .await
        .expect("reply");
    let ServerMessage::SubscribeTracks(r) = reply else {
        unreachable!()
    };
    assert_eq!(r.successes[0].connection_id, alice_conn);
    assert!(r.failures.is_empty());
    viewer
        .pump_until(WAIT, |p| packets(p, "alice-v") >= 10)
        .await
        .expect("the subscribed track flows");
    assert_eq!(viewer.sub.active_streams(), ["alice-v".to_string()]);
    assert_eq!(packets(&viewer, "alice-a"), 0, "audio was not asked for");

    viewer
        .session
        .send(
            ClientMessage::UnsubscribeTracks(request(&["alice-v"], &alice_conn)),
            None,
        )
        .await
        .expect("send");
    viewer
        .wait_for(
            WAIT,
            |m| matches!(m, ServerMessage::UnsubscribeTracks(r) if r.successes.len() == 1),
        )
        .await
        .expect("unsubscribe reply");
    viewer
        .pump_until(WAIT, |p| p.sub.active_streams().is_empty())
        .await
        .expect("the section goes inactive");
    fx.wait_stats(|s| s.forwards == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_mid_stream_cleans_up_every_peer_connection_and_forward() {
    let fx = Fx::new().await;
    let (alice, media) = publisher(&fx, "alice").await;
    let mut bob = fx.join("bob").await;
    let mut carol = fx.join("carol").await;
    for p in [&mut bob, &mut carol] {
        p.pump_until(WAIT, |p| packets(p, "alice-v") >= 5)
            .await
            .expect("media flows");
    }
    let s = fx.stats().await;
    assert_eq!((s.members, s.forwards, s.peer_connections), (3, 4, 3));
    assert!(media.video_frames.load(Ordering::Relaxed) > 0);

    // Alice vanishes mid-stream (socket closed, no unpublish offer, as the SDK's leave).
    alice.close().await;
    for p in [&mut bob, &mut carol] {
        p.wait_for(WAIT, |m| {
            matches!(m, ServerMessage::ParticipantDisconnected(_))
        })
        .await
        .expect("participant_disconnected");
    }
    fx.wait_stats(|s| s.members == 2 && s.published_tracks == 0 && s.forwards == 0)
        .await;
    for p in [&mut bob, &mut carol] {
        p.pump_until(WAIT, |p| p.sub.active_streams().is_empty())
            .await
            .expect("alice's sections go inactive");
    }
    bob.close().await;
    carol.close().await;
    let s = fx
        .wait_stats(|s| s.members == 0 && s.peer_connections == 0)
        .await;
    assert_eq!(
        (s.rooms, s.forwards, s.published_tracks),
        (0, 0, 0),
        "nothing left behind: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_media_input_gets_errors_and_harms_nobody() {
    let fx = Fx::new().await;
    let (_alice, _media) = publisher(&fx, "alice").await;
    let mut bob = fx.join("bob").await;
    bob.pump_until(WAIT, |p| packets(p, "alice-a") >= 10)
        .await
        .expect("media flows");
    let mut mallory = fx.join("mallory").await;

    let error_for = |m: &ServerMessage| matches!(m, ServerMessage::Error(_));
    let cases: Vec<(ClientMessage, &str)> = vec![
        (
            ClientMessage::Offer("this is not sdp".into()),
            "offer refused",
        ),
        (
            ClientMessage::SubAnswer(SfuDescription {
                sfu_id: "sfu-9".into(),
                sdp: "v=0\r\n".into(),
            }),
            "unknown sfu_id",
        ),
        (
            // The join's offer was answered already: nothing is outstanding.
            ClientMessage::SubAnswer(SfuDescription {
                sfu_id: "sfu-0".into(),
                sdp: "v=0\r\n".into(),
            }),
            "sub_answer refused",
        ),
        (
            ClientMessage::Candidate(CandidateMessage {
                candidate: SigCandidate {
                    candidate: "candidate:1 1 udp 1 127.0.0.1 9 typ host".into(),
                    sdp_mline_index: Some(0),
                    sdp_mid: Some("0".into()),
                    username_fragment: None,
                },
                target: CandidateTarget::Subscriber,
                sfu_id: "sfu-7".into(),
            }),
            "unknown sfu_id",
        ),
        (
            ClientMessage::Candidate(CandidateMessage {
                candidate: SigCandidate {
                    candidate: "candidate:garbage".into(),
                    sdp_mline_index: Some(0),
                    sdp_mid: None,
                    username_fragment: None,
                },
                target: CandidateTarget::Publisher,
                sfu_id: "sfu-0".into(),
            }),
            "candidate refused",
        ),
    ];
    for (message, expected) in cases {
        mallory.session.send(message, None).await.expect("send");
        let ServerMessage::Error(e) = mallory.wait_for(WAIT, error_for).await.expect("error")
        else {
            unreachable!()
        };
        assert!(e.message.contains(expected), "{} ∌ {expected}", e.message);
        assert!(!e.fatal);
    }

    // An offer with only a codec we do not support is answered (section rejected), so the
    // client's negotiation queue never stalls.
    let pc = PubPc::new().await.expect("pc");
    pc.add_track("m-a", spacegate_client::media::MediaKind::Audio)
        .await
        .expect("track");
    let offer = pc.create_offer(false).await.expect("offer");
    let exotic: String = offer
        .lines()
        .map(|l| {
            if l.starts_with("a=rtpmap:111 ") {
                "a=rtpmap:111 x-unknown/8000".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
        + "\r\n";
    mallory
        .session
        .send(ClientMessage::Offer(exotic), None)
        .await
        .expect("send");
    mallory
        .wait_for(WAIT, |m| {
            matches!(m, ServerMessage::Answer(_) | ServerMessage::Error(_))
        })
        .await
        .expect("answered or refused, never ignored");

    // A datagram flood at the media port from a stranger is dropped without a lookup,
    // and alice's media keeps reaching bob.
    let flood = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let target = fx.s.state.gateway.media.candidate;
    let junk_stun = [0u8; 120];
    let junk_rtp = [0x80u8; 1200];
    for i in 0..20_000 {
        let _ = flood.send_to(if i % 2 == 0 { &junk_stun } else { &junk_rtp }, target);
    }
    let seen = packets(&bob, "alice-a");
    bob.pump_until(WAIT, |p| packets(p, "alice-a") > seen + 50)
        .await
        .expect("media continues through a flood");
    let dropped = fx.stats().await.dropped_datagrams;
    assert!(dropped > 0);

    // A participant's own publisher PC flooding RTP: beyond its budget the datagrams are
    // dropped before decryption, and alice's media still reaches bob.
    let mut flooder = fx.join("flooder").await;
    let pc = flooder
        .publish(&[TrackSpec::video("flood-v")])
        .await
        .expect("publish");
    let flood_task = tokio::spawn(async move {
        let frame = vp8_frame(1, false, 1000);
        loop {
            for _ in 0..200 {
                let _ = pc.write("flood-v", None, frame.clone()).await;
            }
            tokio::task::yield_now().await;
        }
    });
    fx.wait_stats(|s| s.dropped_datagrams > dropped + 1000)
        .await;
    let seen = packets(&bob, "alice-a");
    bob.pump_until(WAIT, |p| packets(p, "alice-a") > seen + 50)
        .await
        .expect("media continues through a publisher's flood");
    flood_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ice_restart_on_the_publisher_gets_new_credentials_and_media_continues() {
    let fx = Fx::new().await;
    let (mut alice, _media) = publisher(&fx, "alice").await;
    let mut bob = fx.join("bob").await;
    bob.pump_until(WAIT, |p| packets(p, "alice-v") >= 5)
        .await
        .expect("media flows");
    let ufrag = |sdp: &str| {
        sdp.lines()
            .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
            .map(str::to_string)
    };
    let first = alice.last_answer().to_string();
    let restarted = alice.restart_ice().await.expect("ice restart answered");
    assert!(ufrag(&restarted).is_some());
    assert_ne!(
        ufrag(&first),
        ufrag(&restarted),
        "the answer carries new credentials"
    );
    let seen = packets(&bob, "alice-v");
    bob.pump_until(WAIT, |p| packets(p, "alice-v") > seen + 30)
        .await
        .expect("media continues after the restart");
}
