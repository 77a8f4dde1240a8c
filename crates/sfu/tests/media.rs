//! The SFU's media behaviour on the in-memory, virtual-time harness: str0m clients
//! publishing and subscribing as the SDK does, every wait measured in virtual time, so
//! each test is deterministic and takes milliseconds of real time.

mod harness;

use std::time::Duration;

use harness::frames::Tag;
use harness::{Datagram, Id, KeyframeAsk, Net, Received, Sent, TrackSpec};
use spacegate_sfu::{SfuConfig, SfuEvent, SfuStats, SubscriptionMode};
use str0m::media::{KeyframeRequestKind, Rid};

const AUTO: SubscriptionMode = SubscriptionMode::Automatic(16);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// `received` is a gapless run of `sent`: the same bytes in the same order, from
/// wherever the subscriber came in, so forwarding neither lost, reordered, altered nor
/// duplicated anything. Returns where in `sent` the run ends.
fn assert_run(received: &[&Received], sent: &[Sent], what: &str) -> usize {
    let first = received
        .first()
        .unwrap_or_else(|| panic!("{what}: nothing arrived"));
    let start = sent
        .iter()
        .position(|s| s.data == first.data)
        .unwrap_or_else(|| panic!("{what}: {:?} arrived but was never sent", first.tag()));
    assert!(
        start + received.len() <= sent.len(),
        "{what}: {} frames arrived from {:?}, {} were sent from there",
        received.len(),
        first.tag(),
        sent.len() - start
    );
    for (r, s) in received.iter().zip(&sent[start..]) {
        // Not assert_eq: a mismatch would print kilobytes of frame bytes.
        assert!(
            r.data == s.data,
            "{what}: frame {:?} arrived where {:?} was expected",
            Tag::parse(&r.data),
            s.tag
        );
    }
    start + received.len()
}

/// [`assert_run`] up to the last frame sent (call once the media stopped and settled).
/// Returns how many frames arrived.
fn assert_tail(received: &[&Received], sent: &[Sent], what: &str) -> usize {
    let end = assert_run(received, sent, what);
    assert_eq!(end, sent.len(), "{what}: the last frames never arrived");
    received.len()
}

fn frames<'a>(net: &'a Net, id: Id, tid: &'a str) -> Vec<&'a Received> {
    net.client(id).frames(tid).collect()
}

fn sent(net: &Net, id: Id, tid: &str, rid: Option<&str>) -> Vec<Sent> {
    let client = net.client(id);
    let source = client
        .sources
        .iter()
        .find(|s| s.tid == tid)
        .expect("a published tid");
    let layer = source
        .layers
        .iter()
        .find(|l| l.rid.as_deref() == rid)
        .expect("a layer");
    layer.sent.clone()
}

fn counters(s: &SfuStats) -> [(&'static str, usize); 5] {
    [
        ("members", s.members),
        ("rooms", s.rooms),
        ("peer_connections", s.peer_connections),
        ("published_tracks", s.published_tracks),
        ("forwards", s.forwards),
    ]
}

/// A room whose first member, alice, publishes `tracks`.
fn alice_publishes(tracks: &[TrackSpec]) -> (Net, Id) {
    let mut net = Net::new();
    let alice = net.join("alice", AUTO);
    net.publish(alice, tracks);
    (net, alice)
}

/// Stops `id`'s media and lets what is in flight land, so that "everything sent
/// arrived" can be checked exactly.
fn stop_and_settle(net: &mut Net, id: Id) {
    for s in &mut net.client_mut(id).sources {
        s.set_live(false);
    }
    net.run_for(secs(0.5));
}

#[test]
fn audio_and_video_reach_two_subscribers_intact_and_never_their_publisher() {
    let (mut net, alice) =
        alice_publishes(&[TrackSpec::audio("alice-a"), TrackSpec::video("alice-v")]);
    // Bob publishes too, so alice has a subscriber PC that could (wrongly) carry her
    // own tracks back.
    let bob = net.join("bob", AUTO);
    net.publish(bob, &[TrackSpec::audio("bob-a")]);
    let carol = net.join("carol", AUTO);
    net.run_for(secs(3.0));
    let s = net.sfu.stats();
    assert_eq!(s.published_tracks, 3);
    assert_eq!(s.forwards, 6, "alice's 2 tracks × 2 + bob's 1 × 2");
    stop_and_settle(&mut net, alice);
    stop_and_settle(&mut net, bob);

    for viewer in [bob, carol] {
        let name = &net.client(viewer).name;
        let audio = assert_tail(
            &frames(&net, viewer, "alice-a"),
            &sent(&net, alice, "alice-a", None),
            &format!("{name}: alice-a"),
        );
        let video = assert_tail(
            &frames(&net, viewer, "alice-v"),
            &sent(&net, alice, "alice-v", None),
            &format!("{name}: alice-v"),
        );
        // 3 s at 50 and 30 frames/s, less the time to connect.
        assert!(
            audio > 120 && video > 70,
            "{name}: {audio} audio, {video} video frames"
        );
    }
    assert_tail(
        &frames(&net, carol, "bob-a"),
        &sent(&net, bob, "bob-a", None),
        "carol: bob-a",
    );

    let a = net.client(alice);
    assert_eq!(
        a.active_tids(),
        ["bob-a"],
        "alice is offered only bob's track"
    );
    let own: Vec<u16> = a.sources.iter().map(|s| s.id).collect();
    assert!(
        a.received.iter().all(|r| !own.contains(&r.tag().source)),
        "alice received her own media"
    );
    assert_tail(
        &frames(&net, alice, "bob-a"),
        &sent(&net, bob, "bob-a", None),
        "alice: bob-a",
    );
    assert_eq!(
        a.received.len(),
        frames(&net, alice, "bob-a").len(),
        "alice received only bob's track"
    );
}

fn keyframe_interval() -> Duration {
    SfuConfig::new(harness::SFU_ADDR).keyframe_interval
}

/// Requests for one layer are at least the SFU's keyframe interval apart, give or take
/// when str0m flushes its RTCP.
fn assert_throttled(asks: &[KeyframeAsk]) {
    let interval = keyframe_interval();
    let mut rids: Vec<Option<Rid>> = Vec::new();
    for k in asks {
        if !rids.contains(&k.rid) {
            rids.push(k.rid);
        }
    }
    for rid in rids {
        let times: Vec<Duration> = asks.iter().filter(|k| k.rid == rid).map(|k| k.at).collect();
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= interval - secs(0.02),
                "requests at {pair:?} are closer than {interval:?}: {asks:?}"
            );
        }
    }
}

#[test]
fn a_subscribers_pli_reaches_the_publisher_throttled_to_one_per_interval() {
    let rtt = 2 * harness::LATENCY;
    let (mut net, alice) = alice_publishes(&[TrackSpec::video("alice-v")]);
    let bob = net.join("bob", AUTO);
    net.run_for(secs(3.0));
    assert!(frames(&net, bob, "alice-v").len() > 60, "video flows");
    let asks = |net: &Net| net.client(alice).keyframe_requests.clone();
    // Steady state: once bob's section has its keyframe, the SFU asks for nothing.
    let quiet_since = net.elapsed() - secs(2.0);
    assert!(
        asks(&net).iter().all(|k| k.at < quiet_since),
        "{:?}",
        asks(&net)
    );

    // One PLI: one request at the publisher, and its keyframe back at bob.
    let before = asks(&net).len();
    let keyframes = |net: &Net| {
        net.client(bob)
            .frames("alice-v")
            .filter(|f| f.keyframe)
            .count()
    };
    let bob_keyframes = keyframes(&net);
    let pli_at = net.elapsed();
    net.pli(bob, "alice-v");
    assert!(
        net.run_until(secs(1.0), |net| keyframes(net) > bob_keyframes),
        "no keyframe reached bob after his PLI; requests {:?}",
        asks(&net)
    );
    let new = &asks(&net)[before..];
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].kind, KeyframeRequestKind::Pli);
    assert!(new[0].at >= pli_at);

    // A PLI every 50 ms for 2 s (a decoder in trouble): the publisher hears one per
    // interval, not 40.
    net.run_for(keyframe_interval());
    let before = asks(&net).len();
    let start = net.elapsed();
    for _ in 0..40 {
        net.pli(bob, "alice-v");
        net.run_for(secs(0.05));
    }
    net.run_for(rtt);
    let burst = &asks(&net)[before..];
    let expected = (secs(2.0).as_millis() / keyframe_interval().as_millis()) as usize;
    assert!(
        (expected - 1..=expected + 1).contains(&burst.len()),
        "{} requests for 40 PLIs in 2 s: {burst:?}",
        burst.len()
    );
    assert!(
        burst[0].at <= start + rtt + secs(0.05),
        "the first goes through at once"
    );
    assert_throttled(burst);
}

/// Alice streams video to bob whose encoder makes keyframes only at its start and when
/// asked, as a browser's does; carol joins 3 s in. Returns (alice, carol, when carol
/// joined, how many requests alice had had by then).
fn late_join() -> (Net, Id, Id, Duration, usize) {
    let (mut net, alice) = alice_publishes(&[TrackSpec::video("alice-v")]);
    let bob = net.join("bob", AUTO);
    net.run_for(secs(3.0));
    assert!(
        frames(&net, bob, "alice-v").len() > 60,
        "video flows to bob"
    );
    let asked = net.client(alice).keyframe_requests.len();
    let joined = net.elapsed();
    let carol = net.join("carol", AUTO);
    (net, alice, carol, joined, asked)
}

#[test]
fn a_late_joiner_makes_the_sfu_ask_the_publisher_for_a_keyframe() {
    let (mut net, alice, carol, joined, asked) = late_join();
    net.run_for(secs(1.0));
    assert!(
        !frames(&net, carol, "alice-v").is_empty(),
        "video flows to carol"
    );
    let asks = &net.client(alice).keyframe_requests[asked..];
    assert!(
        !asks.is_empty() && asks.iter().all(|k| k.at >= joined),
        "alice was asked because carol joined: {asks:?}"
    );
}

#[test]
/// Regression: the keyframe asked for at the answer arrived before DTLS was up, the
/// request at the connection fell in the throttle window, and once a delta frame was
/// forwarded nothing asked again.
fn a_late_joiner_receives_a_keyframe_without_asking() {
    let (mut net, alice, carol, _, _) = late_join();
    let got_keyframe = |net: &Net| net.client(carol).frames("alice-v").any(|f| f.keyframe);
    assert!(
        net.run_until(secs(2.0), got_keyframe),
        "carol got {} frames and no keyframe; requests at alice {:?}",
        frames(&net, carol, "alice-v").len(),
        net.client(alice).keyframe_requests
    );
}

#[test]
fn simulcast_forwards_the_highest_live_layer_and_switches_at_keyframes_without_time_jumps() {
    // A keyframe every 30 frames on every layer: lower layers have keyframes the SFU
    // could switch at, so staying on the top layer is a choice, not a lack of chances.
    let (mut net, alice) = alice_publishes(&[TrackSpec::video("alice-v")
        .simulcast(&["l", "m", "h"])
        .keyframe_every(30)]);
    let bob = net.join("bob", AUTO);
    net.run_for(secs(3.0));
    let layers = |net: &Net| -> Vec<u8> {
        frames(net, bob, "alice-v")
            .iter()
            .map(|f| f.tag().layer)
            .collect()
    };
    let on_h = frames(&net, bob, "alice-v");
    assert!(on_h.len() > 60, "{} frames", on_h.len());
    assert!(on_h[0].keyframe, "bob starts at a keyframe");
    // Only h, and every frame of h from there: three layers sent, one forwarded.
    assert_run(&on_h, &sent(&net, alice, "alice-v", Some("h")), "bob on h");

    // h stops (a congested browser drops its top layer): bob moves to m, the highest
    // layer still live, at one of m's keyframes.
    let h_stopped = net.elapsed();
    let asked = net.client(alice).keyframe_requests.len();
    net.client_mut(alice)
        .source_mut("alice-v")
        .layer_mut("h")
        .live = false;
    let on_layer = |layer: u8| move |net: &Net| layers(net).last() == Some(&layer);
    assert!(
        net.run_until(secs(4.0), on_layer(1)),
        "never switched to m: {:?}",
        layers(&net)
    );
    net.run_for(secs(2.0));
    let all = frames(&net, bob, "alice-v");
    let first_m = all
        .iter()
        .position(|f| f.tag().layer == 1)
        .expect("m arrived");
    assert!(
        all[first_m].keyframe,
        "the switch happens at a keyframe of m"
    );
    assert!(all[first_m].at > h_stopped);
    assert!(all[..first_m].iter().all(|f| f.tag().layer == 2));
    assert_run(
        &all[first_m..],
        &sent(&net, alice, "alice-v", Some("m")),
        "bob on m",
    );
    let m = Some(Rid::from("m"));
    let asks = &net.client(alice).keyframe_requests[asked..];
    assert!(
        asks.iter().any(|k| k.rid == m),
        "the SFU asked m for a keyframe: {asks:?}"
    );

    // h comes back: bob returns to it, again at one of its keyframes.
    let h_back = net.elapsed();
    net.client_mut(alice)
        .source_mut("alice-v")
        .layer_mut("h")
        .live = true;
    assert!(
        net.run_until(secs(2.0), on_layer(2)),
        "never switched back to h: {:?}",
        layers(&net)
    );
    let all = frames(&net, bob, "alice-v");
    let back = all
        .iter()
        .rposition(|f| f.tag().layer == 1)
        .expect("m frames")
        + 1;
    assert!(all[back].keyframe && all[back].at > h_back);
    assert_throttled(&net.client(alice).keyframe_requests);

    // The RTP time bob sees follows the clock across both switches, although the layers'
    // own times are a million ticks apart (11 s at 90 kHz) in either direction.
    for pair in all.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(b.time > a.time, "RTP time went backwards: {a:?} then {b:?}");
        let rtp_ms = (b.time - a.time) as f64 / 90.0;
        let wall_ms = (b.at - a.at).as_secs_f64() * 1000.0;
        assert!(
            (rtp_ms - wall_ms).abs() < 100.0,
            "RTP time jumped {rtp_ms} ms over {wall_ms} ms at {:?}",
            b.at
        );
    }
}

/// The first member of each non-empty `ActiveSpeakers`, consecutive repeats folded.
fn leaders(net: &Net) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, e) in &net.events {
        if let SfuEvent::ActiveSpeakers { speakers, .. } = e {
            if let Some((member, _)) = speakers.first() {
                if out.last().map(String::as_str) != Some(&**member) {
                    out.push(member.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn automatic_mode_follows_the_loudest_speaker() {
    let mut net = Net::new();
    // p1 joins first, so join order alone would pick it; p2 is the one talking.
    let p1 = net.join("p1", AUTO);
    net.publish(p1, &[TrackSpec::audio("p1-a")]);
    let p2 = net.join("p2", AUTO);
    net.publish(p2, &[TrackSpec::audio("p2-a")]);
    net.client_mut(p2).source_mut("p2-a").level = -10;
    net.run_for(secs(1.0));
    assert_eq!(leaders(&net), ["p2"]);
    let viewer = net.join("viewer", SubscriptionMode::Automatic(1));
    net.run_for(secs(2.0));
    assert_eq!(net.client(viewer).active_tids(), ["p2-a"]);
    assert!(frames(&net, viewer, "p2-a").len() > 50, "p2's audio flows");
    assert!(frames(&net, viewer, "p1-a").is_empty());
    assert_eq!(leaders(&net), ["p2"]);

    // They swap: p1 talks, p2 falls silent. The viewer is re-offered p1 instead.
    let offers = net.client(viewer).offers.len();
    let swapped = net.elapsed();
    net.client_mut(p1).source_mut("p1-a").level = -10;
    net.client_mut(p2).source_mut("p2-a").level = -127;
    net.run_for(secs(2.0));
    let v = net.client(viewer);
    assert!(v.offers.len() > offers, "a new offer");
    assert_eq!(v.active_tids(), ["p1-a"], "sections {:?}", v.sections);
    assert_eq!(leaders(&net), ["p2", "p1"]);
    let last = net.events.iter().rev().find_map(|(_, e)| match e {
        SfuEvent::ActiveSpeakers { speakers, .. } => Some(speakers.clone()),
        _ => None,
    });
    assert_eq!(last, Some(vec![("p1".into(), "p1-a".to_string())]));
    let p1_frames = frames(&net, viewer, "p1-a");
    assert!(p1_frames.len() > 30 && p1_frames[0].at > swapped);
    // p1's audio is p1's: the frames are the tail of what p1 sent.
    stop_and_settle(&mut net, p1);
    assert_tail(
        &frames(&net, viewer, "p1-a"),
        &sent(&net, p1, "p1-a", None),
        "viewer: p1-a",
    );
    let last_p2 = frames(&net, viewer, "p2-a").last().expect("p2 frames").at;
    assert!(
        last_p2 < swapped + secs(1.0),
        "p2 is no longer forwarded (last frame at {last_p2:?})"
    );
}

#[test]
fn leaving_returns_every_counter_to_zero() {
    let (mut net, alice) =
        alice_publishes(&[TrackSpec::audio("alice-a"), TrackSpec::video("alice-v")]);
    let bob = net.join("bob", AUTO);
    let carol = net.join("carol", AUTO);
    net.run_for(secs(2.0));
    assert_eq!(
        counters(&net.sfu.stats()),
        counters(&SfuStats {
            members: 3,
            rooms: 1,
            peer_connections: 3,
            published_tracks: 2,
            forwards: 4,
            ..SfuStats::default()
        })
    );

    // Alice vanishes mid-stream: her tracks are unpublished and the others' sections
    // go inactive.
    let left = net.elapsed();
    net.leave(alice);
    let unpublished = net
        .events
        .iter()
        .filter(|(at, e)| *at >= left && matches!(e, SfuEvent::TrackUnpublished { .. }))
        .count();
    assert_eq!(unpublished, 2);
    net.run_for(secs(1.0));
    let s = net.sfu.stats();
    assert_eq!(
        (
            s.members,
            s.published_tracks,
            s.forwards,
            s.peer_connections
        ),
        (2, 0, 0, 2)
    );
    let forwarded = s.forwarded_frames;
    for viewer in [bob, carol] {
        let c = net.client(viewer);
        assert!(c.active_tids().is_empty(), "{:?}", c.sections);
        let last = c.received.last().expect("frames").at;
        assert!(
            last < left + secs(0.1),
            "a frame at {last:?} after alice left"
        );
    }
    net.run_for(secs(1.0));
    assert_eq!(net.sfu.stats().forwarded_frames, forwarded);

    net.leave(bob);
    net.leave(carol);
    net.run_for(secs(1.0));
    assert_eq!(counters(&net.sfu.stats()), counters(&SfuStats::default()));
}

/// A deterministic stand-in for random loss: xorshift64 from a fixed seed, so the same
/// datagrams are lost on every run.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[test]
fn video_survives_loss_to_the_subscriber_and_reordering_both_ways() {
    let (mut net, alice) = alice_publishes(&[TrackSpec::video("alice-v")]);
    let bob = net.join("bob", AUTO);
    net.run_for(secs(2.0));
    let flowing = frames(&net, bob, "alice-v").len();
    assert!(flowing > 30, "{flowing} frames");
    // 5% of the RTP to bob is lost, and 30% of all RTP takes 10 ms longer than the rest
    // (overtaken within a frame's packets or by the next frame's): the SFU's NACK/RTX
    // towards bob and both receivers' reordering must still deliver every frame, in order.
    let mut random = xorshift(0x2545_f491_4f6c_dd1d);
    net.set_link(move |d| {
        if !d.is_rtp() {
            return Some(harness::LATENCY);
        }
        match random() % 100 {
            r if r < 5 && d.to != harness::SFU_ADDR => None,
            r if r >= 70 => Some(harness::LATENCY + secs(0.01)),
            _ => Some(harness::LATENCY),
        }
    });
    net.run_for(secs(3.0));
    net.reset_link();
    assert!(net.lost > 5, "{} datagrams lost", net.lost);
    // Media keeps flowing a while: a lost last packet is one nobody can notice missing.
    net.run_for(secs(1.0));
    stop_and_settle(&mut net, alice);
    let got = assert_tail(
        &frames(&net, bob, "alice-v"),
        &sent(&net, alice, "alice-v", None),
        "bob: alice-v",
    );
    assert!(got > flowing + 100, "{got} frames");
}

/// Loses every RTP packet of the `nth` video frame the link sees from `from`: that
/// frame is complete only when its retransmissions arrive, after the next frame.
fn lose_one_frame(
    from: std::net::SocketAddr,
    nth: u32,
) -> impl FnMut(&Datagram) -> Option<Duration> {
    let mut after_marker = true;
    let mut frames = 0;
    move |d| {
        if d.from != from || !d.is_rtp() {
            return Some(harness::LATENCY);
        }
        frames += u32::from(after_marker);
        // RTP marker bit: the last packet of a video frame.
        after_marker = d.contents[1] & 0x80 != 0;
        if frames == nth {
            return None;
        }
        Some(harness::LATENCY)
    }
}

#[test]
/// Regression: frames were written with their network time as str0m's wallclock, and
/// str0m queues a section's frames by wallclock, so a frame completed by a
/// retransmission went out after the frames that overtook it.
fn a_frame_repaired_by_retransmission_upstream_is_forwarded_in_order() {
    let (mut net, alice) = alice_publishes(&[TrackSpec::video("alice-v")]);
    let bob = net.join("bob", AUTO);
    net.run_for(secs(2.0));
    let pub_addr = net.client(alice).pub_addr;
    net.set_link(lose_one_frame(pub_addr, 10));
    net.run_for(secs(1.0));
    assert_eq!(net.lost, 2, "both packets of one frame");
    stop_and_settle(&mut net, alice);
    assert_tail(
        &frames(&net, bob, "alice-v"),
        &sent(&net, alice, "alice-v", None),
        "bob: alice-v",
    );
}

/// A trace of everything observable in the forwarding scenario, minus what str0m
/// randomises by design (SSRCs, ICE credentials in SDP).
fn trace() -> Vec<String> {
    let (mut net, alice) =
        alice_publishes(&[TrackSpec::audio("alice-a"), TrackSpec::video("alice-v")]);
    let bob = net.join("bob", AUTO);
    net.run_for(secs(1.0));
    net.pli(bob, "alice-v");
    net.run_for(secs(1.0));
    let mut out: Vec<String> = net
        .client(bob)
        .received
        .iter()
        .map(|r| format!("{:?} {} {:?} {}", r.at, r.tid, r.tag(), r.time))
        .collect();
    out.extend(
        net.client(alice)
            .keyframe_requests
            .iter()
            .map(|k| format!("{k:?}")),
    );
    // The SFU announces the tracks of one offer in hash order: events are compared
    // as a set of timed events, not in their order within an instant.
    let mut events: Vec<String> = net
        .events
        .iter()
        .map(|(at, e)| match e {
            SfuEvent::SubOffer { member, .. } => format!("{at:?} offer to {member}"),
            other => format!("{at:?} {other:?}"),
        })
        .collect();
    events.sort();
    out.extend(events);
    let s = net.sfu.stats();
    out.push(format!(
        "{} {} {}",
        s.forwarded_frames, s.keyframe_requests_sent, s.timer_wakeups
    ));
    out
}

#[test]
fn two_runs_of_the_same_scenario_are_identical() {
    let (a, b) = (trace(), trace());
    assert!(a.len() > 100);
    assert_eq!(a, b);
}
