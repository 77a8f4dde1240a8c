//! The per-space state machine in virtual time: no sockets, no clock.

use std::sync::Arc;

use spacegate_proto::signaling::{
    ClientMessage, CustomEventRequest, Envelope, PendingTrack, ServerMessage, SfuDescription,
    TrackKind,
};
use spacegate_proto::{ConnectionId, Role, SessionId};
use spacegate_signaling::{Joiner, Output, Space, SpaceConfig};

fn conn(s: &str) -> ConnectionId {
    s.parse().expect("conn")
}

fn joiner(c: &str, p: &str, role: Role) -> Joiner {
    Joiner {
        connection_id: conn(c),
        participant_id: p.parse().expect("pid"),
        role,
        display_name: format!("{p}-name"),
        managed_subscriptions: 16,
        reconnected: false,
        sub_sfus: vec![SfuDescription {
            sfu_id: "sfu-0".into(),
            sdp: "v=0\r\n".into(),
        }],
    }
}

/// Frames per recipient, decoded, in order; plus non-frame outputs.
struct Out {
    frames: Vec<(String, Envelope<ServerMessage>)>,
    other: Vec<Output>,
}

fn run(f: impl FnOnce(&mut Vec<Output>)) -> Out {
    let mut out = Vec::new();
    f(&mut out);
    let mut frames = Vec::new();
    let mut other = Vec::new();
    for o in out {
        match o {
            Output::Send { to, frame } => frames.push((
                to.to_string(),
                Envelope::decode_server(&frame).expect("valid frame"),
            )),
            o => other.push(o),
        }
    }
    Out { frames, other }
}

impl Out {
    fn to(&self, c: &str) -> Vec<&Envelope<ServerMessage>> {
        self.frames
            .iter()
            .filter(|(to, _)| to == c)
            .map(|(_, e)| e)
            .collect()
    }
}

fn msg(m: ClientMessage, request_id: Option<&str>) -> Envelope<ClientMessage> {
    Envelope::with_request_id(m, request_id.map(str::to_string))
}

fn space() -> Space {
    Space::new(
        "S1".parse().expect("space"),
        Arc::new(SpaceConfig::default()),
    )
}

fn session(s: &str) -> SessionId {
    s.parse().expect("session")
}

#[test]
fn join_sequencing_and_fan_out() {
    let mut s = space();
    let a = run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    assert_eq!(
        a.other,
        vec![Output::Activated {
            session_id: session("s1")
        }]
    );
    let [joined] = a.to("ca")[..] else {
        panic!("one frame to alice")
    };
    let ServerMessage::Joined(j) = &joined.message else {
        panic!("joined first")
    };
    assert_eq!(j.session_id, "s1");
    assert_eq!(j.connection_id, "ca");
    assert_eq!(j.participant_id, "alice");
    assert_eq!(j.display_name, "alice-name");
    assert!(j.participants.is_empty(), "never the recipient itself");
    assert_eq!(j.sub_sfus.len(), 1);
    assert_eq!(j.watchrtc_token, "");
    assert!(!j.broadcasting);
    assert_eq!(j.limits.custom_events_per_second, 10);

    let b = run(|o| {
        s.join(
            joiner("cb", "bob", Role::Subscriber),
            session("ignored"),
            5,
            o,
        )
    });
    assert!(b.other.is_empty(), "already active");
    let ServerMessage::Joined(j) = &b.to("cb")[0].message else {
        panic!("joined")
    };
    assert_eq!(j.session_id, "s1", "one session per active period");
    assert_eq!(j.participants.len(), 1);
    assert_eq!(j.participants[0].connection_id, "ca");
    assert_eq!(j.participants[0].tracks, vec![]);
    // Bob's joined comes before alice hears of bob.
    assert_eq!(b.frames[0].0, "cb");
    let ServerMessage::ParticipantConnected(p) = &b.to("ca")[0].message else {
        panic!("connected")
    };
    assert_eq!(
        (p.connection_id.as_str(), p.participant_id.as_str()),
        ("cb", "bob")
    );
    assert_eq!(
        p.role,
        spacegate_proto::signaling::ParticipantRole::Subscriber
    );
    assert!(p.tracks.is_empty());

    let c = run(|o| {
        s.join(
            Joiner {
                reconnected: true,
                ..joiner("cc", "carol", Role::Publisher)
            },
            session("x"),
            9,
            o,
        )
    });
    let ServerMessage::ParticipantConnected(p) = &c.to("cb")[0].message else {
        panic!("connected")
    };
    assert_eq!(
        p.status,
        spacegate_proto::signaling::ParticipantStatus::Reconnected
    );
    let ServerMessage::Joined(j) = &c.to("cc")[0].message else {
        panic!("joined")
    };
    let order: Vec<_> = j
        .participants
        .iter()
        .map(|p| p.connection_id.as_str())
        .collect();
    assert_eq!(order, ["ca", "cb"], "join order");
}

#[test]
fn leaving_fans_out_and_idles_the_space() {
    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    run(|o| s.join(joiner("cb", "bob", Role::Publisher), session("s2"), 0, o));
    let out = run(|o| s.leave(&conn("cb"), o));
    let ServerMessage::ParticipantDisconnected(d) = &out.to("ca")[0].message else {
        panic!("disconnected")
    };
    assert_eq!(d.connection_id, "cb");
    assert!(out.to("cb").is_empty());
    assert!(out.other.is_empty());
    assert!(
        run(|o| s.leave(&conn("cb"), o)).frames.is_empty(),
        "double leave is harmless"
    );
    let out = run(|o| s.leave(&conn("ca"), o));
    assert_eq!(out.other, vec![Output::Idle]);
    assert!(s.is_empty());
    let again = run(|o| s.join(joiner("cd", "alice", Role::Publisher), session("s3"), 0, o));
    assert_eq!(
        again.other,
        vec![Output::Activated {
            session_id: session("s3")
        }],
        "new session"
    );
}

#[test]
fn display_names_are_validated_echoed_and_rate_limited() {
    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Subscriber), session("s1"), 0, o));
    run(|o| s.join(joiner("cb", "bob", Role::Publisher), session("s1"), 0, o));
    let set = |name: &str| msg(ClientMessage::SetDisplayName(name.into()), Some("r1"));

    let out = run(|o| s.handle(&conn("ca"), set("Alice 2"), 1_000, o));
    let mine = out.to("ca");
    assert_eq!(
        mine[0].request_id.as_deref(),
        Some("r1"),
        "author's copy carries request_id"
    );
    let ServerMessage::ParticipantUpdate(u) = &mine[0].message else {
        panic!("update")
    };
    assert_eq!(
        (u.connection_id.as_str(), u.display_name.as_str()),
        ("ca", "Alice 2")
    );
    let theirs = out.to("cb");
    assert_eq!(theirs[0].request_id, None);
    assert!(matches!(
        theirs[0].message,
        ServerMessage::ParticipantUpdate(_)
    ));

    let error_of = |out: &Out| -> (u8, Option<String>, bool) {
        let ServerMessage::Error(e) = &out.to("ca")[0].message else {
            panic!("error")
        };
        (
            e.kind,
            e.request_error.as_ref().map(|r| r.correlator.clone()),
            e.fatal,
        )
    };
    // Within a second of the last change: rate limited (8), correlated, not fatal.
    let out = run(|o| s.handle(&conn("ca"), set("Alice 3"), 1_999, o));
    assert_eq!(error_of(&out), (8, Some("r1".into()), false));
    assert!(out.to("cb").is_empty(), "nothing reaches the others");
    // Invalid names (7): empty, 65 UTF-16 units, control characters.
    for bad in ["", &"x".repeat(65), &"\u{1F600}".repeat(33), "a\nb"] {
        let out = run(|o| s.handle(&conn("ca"), set(bad), 10_000, o));
        assert_eq!(error_of(&out), (7, Some("r1".into()), false), "{bad:?}");
    }
    // 64 units is fine (32 emoji are 64 UTF-16 units), and a second later is allowed.
    let out = run(|o| s.handle(&conn("ca"), set(&"\u{1F600}".repeat(32)), 10_000, o));
    assert!(matches!(
        out.to("ca")[0].message,
        ServerMessage::ParticipantUpdate(_)
    ));
    let carol = run(|o| {
        s.join(
            joiner("cc", "carol", Role::Publisher),
            session("s"),
            10_001,
            o,
        )
    });
    let ServerMessage::Joined(j) = &carol.to("cc")[0].message else {
        panic!()
    };
    assert_eq!(
        j.participants[0].display_name,
        "\u{1F600}".repeat(32),
        "snapshots carry the new name"
    );
}

#[test]
fn custom_events_are_sequenced_echoed_and_rate_limited() {
    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    run(|o| s.join(joiner("cb", "bob", Role::Subscriber), session("s1"), 0, o));
    let event = |id: &str, payload: String| {
        msg(
            ClientMessage::CustomEvent(CustomEventRequest {
                id: id.into(),
                payload,
                scope: 1,
            }),
            Some(id),
        )
    };
    let mut last_seq = 0;
    for i in 0..10 {
        let id = format!("e{i}");
        let out = run(|o| s.handle(&conn("ca"), event(&id, "hi".into()), 0, o));
        let ServerMessage::CustomEvent(mine) = &out.to("ca")[0].message else {
            panic!("echo")
        };
        assert_eq!(out.to("ca")[0].request_id.as_deref(), Some(id.as_str()));
        assert_eq!(mine.connection_id, "ca");
        assert!(mine.sequence_num > last_seq, "monotonic sequence");
        last_seq = mine.sequence_num;
        let ServerMessage::CustomEvent(theirs) = &out.to("cb")[0].message else {
            panic!("fan-out")
        };
        assert_eq!(theirs, mine);
        assert_eq!(out.to("cb")[0].request_id, None);
    }
    let kind_and_correlator = |out: &Out, c: &str| {
        let ServerMessage::Error(e) = &out.to(c)[0].message else {
            panic!("error")
        };
        (
            e.kind,
            e.request_error.as_ref().map(|r| r.correlator.clone()),
        )
    };
    // The 11th in the same instant is over 10/s.
    let out = run(|o| s.handle(&conn("ca"), event("e10", "hi".into()), 0, o));
    assert_eq!(kind_and_correlator(&out, "ca"), (6, Some("e10".into())));
    assert!(out.to("cb").is_empty());
    let out = run(|o| s.handle(&conn("ca"), event("e11", "hi".into()), 100, o));
    assert!(
        matches!(out.to("ca")[0].message, ServerMessage::CustomEvent(_)),
        "refilled after 100 ms"
    );
    // Too large, and from a subscriber: error 5.
    let out = run(|o| s.handle(&conn("ca"), event("big", "x".repeat(4097)), 10_000, o));
    assert_eq!(kind_and_correlator(&out, "ca"), (5, Some("big".into())));
    let out = run(|o| s.handle(&conn("cb"), event("sub", "hi".into()), 10_000, o));
    assert_eq!(kind_and_correlator(&out, "cb"), (5, Some("sub".into())));
    assert!(out.to("ca").is_empty());
}

fn pending(tid: &str, mid: &str, source: &str) -> Envelope<ClientMessage> {
    msg(
        ClientMessage::PendingTrack(PendingTrack {
            tid: tid.into(),
            kind: if source == "microphone" {
                TrackKind::Audio
            } else {
                TrackKind::Video
            },
            name: "cam".into(),
            muted: false,
            source: source.into(),
            height: 720,
            width: 1280,
            mid: mid.into(),
        }),
        None,
    )
}

#[test]
fn subscribers_cannot_publish() {
    let mut s = space();
    run(|o| s.join(joiner("cs", "sub", Role::Subscriber), session("s1"), 0, o));
    for m in [
        pending("t1", "0", "camera"),
        msg(ClientMessage::Offer("v=0".into()), None),
    ] {
        let out = run(|o| s.handle(&conn("cs"), m, 0, o));
        let ServerMessage::Error(e) = &out.to("cs")[0].message else {
            panic!("error")
        };
        assert_eq!((e.kind, e.fatal), (1, false));
        assert!(e.message.contains("subscribers"));
        assert!(out.other.is_empty(), "nothing reaches the media plane");
    }
}

#[test]
fn tracks_publish_mute_and_unpublish() {
    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    run(|o| s.join(joiner("cb", "bob", Role::Publisher), session("s1"), 0, o));
    // Muting an unknown track is a non-fatal request error (2), to the author only.
    let out = run(|o| {
        s.handle(
            &conn("ca"),
            msg(ClientMessage::MuteTrack("nope".into()), None),
            0,
            o,
        )
    });
    let ServerMessage::Error(e) = &out.to("ca")[0].message else {
        panic!("error")
    };
    assert_eq!(e.kind, 2);
    assert!(out.to("cb").is_empty());

    let out = run(|o| s.handle(&conn("ca"), pending("cam1", "0", "camera"), 0, o));
    // The space's first media message: both members enter the media plane first.
    assert!(matches!(
        &out.other[..],
        [
            Output::MediaJoin { .. },
            Output::MediaJoin { .. },
            Output::Media {
                message: ClientMessage::PendingTrack(_),
                ..
            }
        ]
    ));
    assert!(
        out.frames.is_empty(),
        "nothing announced before the media flows"
    );
    // Bad sources and a second camera (track limit 1 per source) are refused.
    let out = run(|o| s.handle(&conn("ca"), pending("x", "1", "hologram"), 0, o));
    assert!(matches!(out.to("ca")[0].message, ServerMessage::Error(ref e) if e.kind == 1));
    let out = run(|o| s.handle(&conn("ca"), pending("cam2", "1", "camera"), 0, o));
    assert!(matches!(out.to("ca")[0].message, ServerMessage::Error(ref e) if e.kind == 1));
    // Muted while negotiating: remembered silently.
    assert!(
        run(|o| s.handle(
            &conn("ca"),
            msg(ClientMessage::MuteTrack("cam1".into()), None),
            0,
            o
        ))
        .frames
        .is_empty()
    );

    let out = run(|o| s.track_published(&conn("ca"), "cam1", o));
    let ServerMessage::AddTrack(t) = &out.to("cb")[0].message else {
        panic!("add_track")
    };
    assert_eq!(
        (
            t.connection_id.as_str(),
            t.track.tid.as_str(),
            t.track.muted
        ),
        ("ca", "cam1", true)
    );
    assert!(out.to("ca").is_empty(), "never to the publisher itself");

    let out = run(|o| {
        s.handle(
            &conn("ca"),
            msg(ClientMessage::UnmuteTrack("cam1".into()), None),
            0,
            o,
        )
    });
    assert!(
        matches!(&out.to("cb")[0].message, ServerMessage::TrackUnmuted(e) if e.track.tid == "cam1")
    );
    assert!(
        out.to("ca").is_empty(),
        "the SDK throws on its own mute events"
    );
    let out = run(|o| {
        s.handle(
            &conn("ca"),
            msg(ClientMessage::MuteTrack("cam1".into()), None),
            0,
            o,
        )
    });
    assert!(matches!(
        &out.to("cb")[0].message,
        ServerMessage::TrackMuted(_)
    ));

    let carol = run(|o| s.join(joiner("cc", "carol", Role::Publisher), session("s"), 0, o));
    let ServerMessage::Joined(j) = &carol.to("cc")[0].message else {
        panic!()
    };
    assert_eq!(
        j.participants[0].tracks[0].tid, "cam1",
        "snapshots carry published tracks"
    );
    assert!(j.participants[0].tracks[0].muted);

    let out = run(|o| s.track_unpublished(&conn("ca"), "cam1", o));
    assert!(
        matches!(&out.to("cb")[0].message, ServerMessage::RemoveTrack(e) if e.track.tid == "cam1")
    );
    assert!(matches!(
        &out.to("cc")[0].message,
        ServerMessage::RemoveTrack(_)
    ));
}

#[test]
fn media_messages_go_to_the_media_plane_and_strangers_are_ignored() {
    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    let out = run(|o| {
        s.handle(
            &conn("ca"),
            msg(ClientMessage::Offer("v=0".into()), None),
            0,
            o,
        )
    });
    assert_eq!(
        out.other,
        vec![
            Output::MediaJoin {
                member: conn("ca"),
                managed_subscriptions: 16,
                answered_initial_offer: false,
            },
            Output::Media {
                from: conn("ca"),
                message: ClientMessage::Offer("v=0".into())
            }
        ]
    );
    let out = run(|o| {
        s.handle(
            &conn("zz"),
            msg(ClientMessage::SetDisplayName("x".into()), None),
            0,
            o,
        )
    });
    assert!(out.frames.is_empty() && out.other.is_empty());
}

#[test]
fn liveness_pings_on_schedule_and_evicts_the_silent() {
    use spacegate_signaling::{Liveness, LivenessAction};
    let mut l = Liveness::new(0, 5_000, 12_000);
    assert_eq!(l.poll(0), LivenessAction::Wait);
    assert_eq!(l.next_wakeup(), 5_000);
    assert_eq!(l.poll(4_999), LivenessAction::Wait);
    assert_eq!(l.poll(5_000), LivenessAction::Ping);
    assert_eq!(l.poll(5_001), LivenessAction::Wait, "one ping per interval");
    assert_eq!(l.next_wakeup(), 10_000);
    // A pong at 6 s pushes eviction to 18 s; pings continue meanwhile.
    l.heard(6_000);
    assert_eq!(l.poll(10_000), LivenessAction::Ping);
    assert_eq!(l.poll(15_000), LivenessAction::Ping);
    assert_eq!(l.next_wakeup(), 18_000);
    assert_eq!(l.poll(17_999), LivenessAction::Wait);
    assert_eq!(
        l.poll(18_000),
        LivenessAction::Evict,
        "silent for the idle timeout"
    );
    // With a 5 s ping and 12 s timeout, a half-open peer is gone within 15 s of its last word.
    let mut half_open = Liveness::new(0, 5_000, 12_000);
    let mut t = 0;
    while half_open.poll(t) != LivenessAction::Evict {
        t = half_open.next_wakeup();
    }
    assert!(t <= 15_000, "evicted at {t} ms");
}

#[test]
fn flood_guard_admits_a_burst_then_the_rate() {
    use spacegate_signaling::FloodGuard;
    let mut g = FloodGuard::new(50, 0);
    assert_eq!(
        (0..200).filter(|_| g.admit(0)).count(),
        100,
        "two seconds' worth at once"
    );
    assert!(!g.admit(19));
    assert!(g.admit(20), "one frame per 20 ms at 50/s");
}

fn sub_answer(sfu_id: &str) -> Envelope<ClientMessage> {
    msg(
        ClientMessage::SubAnswer(SfuDescription {
            sfu_id: sfu_id.into(),
            sdp: "v=0\r\n".into(),
        }),
        None,
    )
}

fn media_membership(out: &Out) -> Vec<String> {
    out.other
        .iter()
        .filter_map(|o| match o {
            Output::MediaJoin {
                member,
                managed_subscriptions,
                answered_initial_offer,
            } => Some(format!(
                "join {member} {managed_subscriptions} {answered_initial_offer}"
            )),
            Output::MediaLeave { member } => Some(format!("leave {member}")),
            _ => None,
        })
        .collect()
}

#[test]
fn members_enter_the_media_plane_only_once_their_space_has_media() {
    let mut s = space();
    // Signaling only: nothing for the media plane, whether joining, answering the offer
    // of `joined`, or leaving.
    let out = run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    assert!(media_membership(&out).is_empty());
    let mut quiet = joiner("cb", "bob", Role::Subscriber);
    quiet.managed_subscriptions = 0;
    run(|o| s.join(quiet, session("s1"), 0, o));
    run(|o| s.join(joiner("cc", "carol", Role::Publisher), session("s1"), 0, o));
    let out = run(|o| s.handle(&conn("ca"), sub_answer("sfu-0"), 0, o));
    assert!(out.other.is_empty() && out.frames.is_empty(), "absorbed");
    let out = run(|o| s.leave(&conn("cc"), o));
    assert!(media_membership(&out).is_empty());
    assert!(!s.has_media());

    // The first media message puts everyone in, in join order, with what each already
    // did, before the message itself.
    let out = run(|o| s.handle(&conn("ca"), pending("cam1", "0", "camera"), 0, o));
    assert_eq!(
        media_membership(&out),
        ["join ca 16 true", "join cb 0 false"]
    );
    assert!(matches!(out.other.last(), Some(Output::Media { from, .. }) if from == &conn("ca")));
    assert!(s.has_media());
    // From now on joins and leaves go to the media plane, after the frames they cause;
    // an answer is passed on as it is.
    let out = run(|o| s.join(joiner("cd", "dave", Role::Publisher), session("s1"), 0, o));
    assert_eq!(media_membership(&out), ["join cd 16 false"]);
    assert!(matches!(out.other.last(), Some(Output::MediaJoin { .. })));
    let out = run(|o| s.handle(&conn("cd"), sub_answer("sfu-0"), 0, o));
    assert!(matches!(
        &out.other[..],
        [Output::Media {
            message: ClientMessage::SubAnswer(_),
            ..
        }]
    ));
    let out = run(|o| s.leave(&conn("ca"), o));
    assert_eq!(media_membership(&out), ["leave ca"]);

    // Once the space empties it starts over without media.
    run(|o| s.leave(&conn("cb"), o));
    run(|o| s.leave(&conn("cd"), o));
    assert!(s.is_empty() && !s.has_media());
    let out = run(|o| s.join(joiner("ce", "erin", Role::Publisher), session("s2"), 0, o));
    assert!(media_membership(&out).is_empty());
}

#[test]
fn only_the_first_answer_to_the_joined_offer_is_absorbed() {
    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    // An answer for another sfu_id is the media plane's to refuse.
    let out = run(|o| s.handle(&conn("ca"), sub_answer("sfu-9"), 0, o));
    assert_eq!(media_membership(&out), ["join ca 16 false"]);
    assert!(matches!(out.other.last(), Some(Output::Media { .. })));

    let mut s = space();
    run(|o| s.join(joiner("ca", "alice", Role::Publisher), session("s1"), 0, o));
    run(|o| s.handle(&conn("ca"), sub_answer("sfu-0"), 0, o));
    // A second answer has no offer to go with: the media plane says so.
    let out = run(|o| s.handle(&conn("ca"), sub_answer("sfu-0"), 0, o));
    assert_eq!(media_membership(&out), ["join ca 16 true"]);
    assert!(matches!(
        out.other.last(),
        Some(Output::Media {
            message: ClientMessage::SubAnswer(_),
            ..
        })
    ));
}

#[test]
fn a_staggered_first_ping_keeps_the_interval_after() {
    use spacegate_signaling::{Liveness, LivenessAction};
    // Joined at 1 s; first ping 2.5 s later (the offset is taken modulo the interval).
    let mut l = Liveness::new(1_000, 5_000, 12_000).with_first_ping_after(12_499);
    assert_eq!(l.next_wakeup(), 3_500);
    assert_eq!(l.poll(3_499), LivenessAction::Wait);
    assert_eq!(l.poll(3_500), LivenessAction::Ping);
    assert_eq!(l.next_wakeup(), 8_500, "then every interval");
    // Connections that arrive together are pinged apart.
    let wakeups: std::collections::BTreeSet<u64> = (0..50)
        .map(|i| {
            Liveness::new(0, 5_000, 12_000)
                .with_first_ping_after(i * 997)
                .next_wakeup()
        })
        .collect();
    assert_eq!(wakeups.len(), 50);
    assert!(wakeups.iter().all(|&w| (1..=5_000).contains(&w)));
}
