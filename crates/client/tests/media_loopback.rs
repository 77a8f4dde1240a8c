//! The media layer against itself: a webrtc-rs publisher and a webrtc-rs subscriber over
//! loopback, no server. Everything waits on a deadline and polls, so a slow machine only makes
//! the tests slower, and a broken path fails with what was seen.

use std::time::Duration;

use bytes::Bytes;
use spacegate_client::media::{MediaKind, PubPc, SubPc, vp8_frame, vp8_payload_frame};
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};

const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
const MEDIA_DEADLINE: Duration = Duration::from_secs(6);
const AUDIO_LEVEL: u8 = 30;

/// Offers from `publisher`, answers on `subscriber`, and applies the answer.
async fn negotiate(publisher: &PubPc, subscriber: &SubPc, ice_restart: bool) -> (String, String) {
    let offer = publisher.create_offer(ice_restart).await.expect("offer");
    let answer = subscriber.handle_offer(&offer).await.expect("answer");
    publisher.set_answer(&answer).await.expect("apply answer");
    (offer, answer)
}

async fn wait_connected(publisher: &PubPc, subscriber: &SubPc) {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    while !(publisher.is_connected() && subscriber.is_connected()) {
        assert!(
            Instant::now() < deadline,
            "not connected in {CONNECT_DEADLINE:?}: publisher {}, subscriber {}",
            publisher.is_connected(),
            subscriber.is_connected()
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// Writes 20 ms audio frames (with an audio level) and 25 fps VP8 frames, remembering what
/// was written, until `done` holds or the deadline passes.
#[derive(Default)]
struct Feeder {
    tick: u32,
    audio: Vec<Bytes>,
    video: Vec<Bytes>,
}

impl Feeder {
    async fn run(
        &mut self,
        publisher: &PubPc,
        subscriber: &SubPc,
        audio_tid: Option<&str>,
        video_tid: Option<&str>,
        done: impl Fn(&SubPc) -> bool,
    ) {
        let deadline = Instant::now() + MEDIA_DEADLINE;
        let mut ticker = interval(Duration::from_millis(20));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while !done(subscriber) {
            assert!(
                Instant::now() < deadline,
                "media did not arrive in {MEDIA_DEADLINE:?}"
            );
            ticker.tick().await;
            self.tick += 1;
            if let Some(tid) = audio_tid {
                let mut frame = b"opus".to_vec();
                frame.extend_from_slice(&self.tick.to_be_bytes());
                frame.resize(40 + (self.tick % 40) as usize, self.tick as u8);
                let frame = Bytes::from(frame);
                publisher
                    .write_audio_with_level(tid, frame.clone(), AUDIO_LEVEL)
                    .await
                    .expect("write audio");
                self.audio.push(frame);
            }
            if let Some(tid) = video_tid
                && self.tick % 2 == 0
            {
                let n = self.tick / 2;
                // Every frame fits one packet, so the frame bytes arrive whole.
                let frame = vp8_frame(n, n % 10 == 0, 200 + (n % 5) as usize * 150);
                publisher
                    .write(tid, None, frame.clone())
                    .await
                    .expect("write video");
                self.video.push(frame);
            }
        }
    }
}

/// Asserts that `received` is a run of consecutive frames out of `written` (frames written
/// before the connection was up are dropped, so the run may start late).
fn assert_in_order(what: &str, written: &[Bytes], received: &[Bytes]) {
    assert!(!received.is_empty(), "{what}: nothing received");
    let start = written
        .iter()
        .position(|frame| *frame == received[0])
        .unwrap_or_else(|| panic!("{what}: first received frame was never written"));
    for (i, frame) in received.iter().enumerate() {
        assert_eq!(
            Some(frame),
            written.get(start + i),
            "{what}: frame {i} after the first differs"
        );
    }
}

/// The section of `sdp` whose `a=mid` is `mid`.
fn section<'a>(sdp: &'a str, mid: &str) -> &'a str {
    sdp.split("m=")
        .skip(1)
        .find(|section| {
            section
                .lines()
                .any(|line| line.trim() == format!("a=mid:{mid}"))
        })
        .unwrap_or_else(|| panic!("no section with mid {mid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_keyframe_request_and_removal() {
    let publisher = PubPc::new().await.expect("publisher");
    let subscriber = SubPc::new().await.expect("subscriber");
    publisher
        .add_track("a1", MediaKind::Audio)
        .await
        .expect("add audio");
    publisher
        .add_track("v1", MediaKind::Video)
        .await
        .expect("add video");

    let (offer, _answer) = negotiate(&publisher, &subscriber, false).await;
    let audio_mid = publisher.mid_of("a1").expect("audio mid");
    let video_mid = publisher.mid_of("v1").expect("video mid");
    assert_ne!(audio_mid, video_mid);
    for needle in [
        "a=msid:a1 ",
        "a=msid:v1 ",
        "a=sendonly",
        "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "127.0.0.1",
    ] {
        assert!(offer.contains(needle), "offer lacks {needle:?}:\n{offer}");
    }
    assert_eq!(subscriber.active_streams(), vec!["a1", "v1"]);
    wait_connected(&publisher, &subscriber).await;

    let mut feeder = Feeder::default();
    feeder
        .run(&publisher, &subscriber, Some("a1"), Some("v1"), |sub| {
            let audio = sub.stats("a1").map_or(0, |s| s.packets);
            let video = sub.stats("v1");
            audio >= 70 && video.is_some_and(|v| v.packets >= 30 && v.keyframes >= 1)
        })
        .await;

    let audio = subscriber.stats("a1").expect("audio stats");
    assert_in_order("audio", &feeder.audio, &audio.first_payloads);
    assert_eq!(audio.last_audio_level, Some(AUDIO_LEVEL));
    assert!(audio.payload_bytes > 0 && audio.ssrc != 0);

    let video = subscriber.stats("v1").expect("video stats");
    let frames: Vec<Bytes> = video
        .first_payloads
        .iter()
        .map(|payload| {
            Bytes::copy_from_slice(vp8_payload_frame(payload).expect("VP8 payload descriptor"))
        })
        .collect();
    assert_in_order("video", &feeder.video, &frames);

    // A PLI from the subscriber must surface as a keyframe request on the publisher.
    assert_eq!(publisher.keyframe_requests("v1"), 0);
    subscriber.send_pli("v1").await.expect("send PLI");
    let deadline = Instant::now() + Duration::from_secs(3);
    while publisher.keyframe_requests("v1") == 0 {
        assert!(Instant::now() < deadline, "PLI never reached the publisher");
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(publisher.keyframe_requests("a1"), 0);

    // Removing the video leaves its section inactive, and the subscriber sees it gone.
    publisher.remove_track("v1").await.expect("remove video");
    assert!(
        publisher
            .write("v1", None, vp8_frame(0, true, 100))
            .await
            .is_err()
    );
    let (offer, _answer) = negotiate(&publisher, &subscriber, false).await;
    let video_section = section(&offer, &video_mid);
    assert!(
        video_section.contains("a=inactive") && !video_section.contains("msid:v1"),
        "removed track's section:\n{video_section}"
    );
    assert_eq!(subscriber.active_streams(), vec!["a1"]);

    // The audio survives the renegotiation.
    let before = subscriber.stats("a1").map_or(0, |s| s.packets);
    feeder
        .run(&publisher, &subscriber, Some("a1"), None, |sub| {
            sub.stats("a1").map_or(0, |s| s.packets) >= before + 10
        })
        .await;

    publisher.close().await;
    subscriber.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_without_media_then_media_and_ice_restart() {
    let publisher = PubPc::new().await.expect("publisher");
    let subscriber = SubPc::new().await.expect("subscriber");

    // Bad input is an error, never a panic.
    assert!(subscriber.handle_offer("not an sdp").await.is_err());
    assert!(publisher.set_answer("v=0\r\nm=garbage").await.is_err());
    assert!(publisher.write("nope", None, Bytes::new()).await.is_err());
    assert!(subscriber.send_pli("nope").await.is_err());
    assert!(subscriber.stats("nope").is_none());

    // The server's first offer has no media sections.
    let bare = subscriber
        .handle_offer("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n")
        .await
        .expect("answer to an offer without media");
    assert!(
        bare.starts_with("v=0\r\n") && !bare.contains("m="),
        "{bare}"
    );
    assert!(subscriber.active_streams().is_empty());

    publisher
        .add_track("a2", MediaKind::Audio)
        .await
        .expect("add audio");
    let (first_offer, _) = negotiate(&publisher, &subscriber, false).await;
    assert_eq!(subscriber.active_streams(), vec!["a2"]);
    wait_connected(&publisher, &subscriber).await;
    let mut feeder = Feeder::default();
    feeder
        .run(&publisher, &subscriber, Some("a2"), None, |sub| {
            sub.stats("a2").map_or(0, |s| s.packets) >= 10
        })
        .await;

    let (restart_offer, _) = negotiate(&publisher, &subscriber, true).await;
    let ufrag = |sdp: &str| {
        sdp.lines()
            .find_map(|line| line.trim().strip_prefix("a=ice-ufrag:").map(str::to_owned))
            .expect("ice-ufrag")
    };
    assert_ne!(ufrag(&first_offer), ufrag(&restart_offer));
    let before = subscriber.stats("a2").map_or(0, |s| s.packets);
    feeder
        .run(&publisher, &subscriber, Some("a2"), None, |sub| {
            sub.stats("a2").map_or(0, |s| s.packets) >= before + 10
        })
        .await;
    assert!(publisher.is_connected() && subscriber.is_connected());

    publisher.close().await;
    subscriber.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_layers_reach_the_subscriber() {
    let publisher = PubPc::new().await.expect("publisher");
    let subscriber = SubPc::new().await.expect("subscriber");
    assert!(publisher.add_simulcast_video("s1", &["l"]).await.is_err());
    publisher
        .add_simulcast_video("s1", &["l", "h"])
        .await
        .expect("add simulcast");

    let (offer, _) = negotiate(&publisher, &subscriber, false).await;
    for needle in [
        "a=rid:l send",
        "a=rid:h send",
        "a=simulcast:send l;h",
        "a=msid:s1 ",
    ] {
        assert!(offer.contains(needle), "offer lacks {needle:?}:\n{offer}");
    }
    assert_eq!(subscriber.active_streams(), vec!["s1"]);
    assert!(
        publisher
            .write("s1", None, vp8_frame(0, true, 100))
            .await
            .is_err()
    );
    wait_connected(&publisher, &subscriber).await;

    let deadline = Instant::now() + MEDIA_DEADLINE;
    let mut ticker = interval(Duration::from_millis(33));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u32;
    loop {
        let layers = subscriber
            .stats("s1")
            .map(|s| s.packets_by_rid)
            .unwrap_or_default();
        if layers.get("l").is_some_and(|&p| p >= 10) && layers.get("h").is_some_and(|&p| p >= 10) {
            break;
        }
        assert!(Instant::now() < deadline, "layers seen: {layers:?}");
        ticker.tick().await;
        publisher
            .write("s1", Some("l"), vp8_frame(n, n % 10 == 0, 150))
            .await
            .expect("write l");
        publisher
            .write("s1", Some("h"), vp8_frame(n, n % 10 == 0, 900))
            .await
            .expect("write h");
        n += 1;
    }

    publisher.close().await;
    subscriber.close().await;
}
