//! The SFU as a state machine: no sockets, no clock (time is passed in). What a bad or
//! out-of-order input does, and that membership bookkeeping returns to zero.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use spacegate_sfu::{
    Sfu, SfuConfig, SfuError, SfuEvent, SubscriptionMode, TrackKind, initial_offer,
};

fn sfu(now: Instant) -> Sfu {
    let addr: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    Sfu::new(SfuConfig::new(addr), now)
}

/// A Chrome-like publisher offer with one Opus audio section.
const AUDIO_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
a=sendonly\r\n\
a=msid:- 7c4b2a1e-0000-4000-8000-000000000001\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=ssrc:1111 cname:test\r\n";

fn events(s: &mut Sfu) -> Vec<SfuEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

#[test]
fn the_initial_offer_has_no_media_sections() {
    let sdp = initial_offer(7);
    assert!(sdp.starts_with("v=0\r\no=- 7 1 IN IP4"));
    assert!(!sdp.contains("m="));
}

#[test]
fn unknown_members_and_malformed_sdp_are_errors() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    assert_eq!(
        s.offer("ghost", AUDIO_OFFER, t0),
        Err(SfuError::UnknownMember)
    );
    assert_eq!(
        s.sub_answer("ghost", "v=0\r\n", t0),
        Err(SfuError::UnknownMember)
    );
    s.join("room", "alice", SubscriptionMode::Automatic(16), t0);
    assert!(matches!(
        s.offer("alice", "not sdp at all", t0),
        Err(SfuError::BadSdp(_))
    ));
    assert!(matches!(
        s.candidate("alice", "candidate:nonsense"),
        Err(SfuError::BadCandidate(_))
    ));
    // The join's offer can be answered once; a second answer answers nothing.
    assert_eq!(s.sub_answer("alice", "v=0\r\n", t0), Ok(()));
    assert_eq!(
        s.sub_answer("alice", "v=0\r\n", t0),
        Err(SfuError::NoOfferOutstanding)
    );
    // Nothing was created by the failures.
    assert_eq!(s.stats().peer_connections, 0);
}

#[test]
fn an_announced_section_is_published_and_offered_to_the_others() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    s.join("room", "alice", SubscriptionMode::Automatic(16), t0);
    s.join("room", "bob", SubscriptionMode::Automatic(16), t0);
    s.sub_answer("bob", "v=0\r\n", t0)
        .expect("bob answers the join offer");
    s.pending_track("alice", "0", "alice-a", TrackKind::Audio, false);
    let answer = s.offer("alice", AUDIO_OFFER, t0).expect("answer");
    assert!(answer.contains("a=ice-lite"), "we are ICE-lite");
    assert!(answer.contains("a=recvonly"));
    assert!(
        answer.contains("127.0.0.1 40000 typ host"),
        "our one host candidate"
    );
    let ev = events(&mut s);
    // add_track must reach bob before the offer that carries the track.
    let published = ev
        .iter()
        .position(|e| matches!(e, SfuEvent::TrackPublished { tid, .. } if tid == "alice-a"))
        .expect("published");
    let offered = ev
        .iter()
        .position(|e| matches!(e, SfuEvent::SubOffer { member, .. } if &**member == "bob"))
        .expect("bob gets an offer");
    assert!(published < offered);
    let SfuEvent::SubOffer { sdp, .. } = &ev[offered] else {
        unreachable!()
    };
    assert!(
        sdp.contains("a=msid:alice-a "),
        "stream id = the publisher's tid"
    );
    assert!(sdp.contains("a=sendonly"));
    // Alice has no one to receive from, so no offer for her.
    assert!(
        !ev.iter()
            .any(|e| matches!(e, SfuEvent::SubOffer { member, .. } if &**member == "alice"))
    );
    let st = s.stats();
    assert_eq!((st.published_tracks, st.peer_connections), (1, 2));

    // Alice leaves: her track is unpublished, bob's section is renegotiated once his
    // outstanding offer is answered, and nothing of alice is left.
    s.leave("alice", t0);
    let ev = events(&mut s);
    assert!(
        ev.iter()
            .any(|e| matches!(e, SfuEvent::TrackUnpublished { tid, .. } if tid == "alice-a"))
    );
    s.leave("bob", t0);
    let st = s.stats();
    assert_eq!(
        (
            st.members,
            st.rooms,
            st.peer_connections,
            st.forwards,
            st.published_tracks
        ),
        (0, 0, 0, 0, 0)
    );
}

#[test]
fn manual_subscriptions_refuse_what_is_not_published() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    s.join("room", "alice", SubscriptionMode::Automatic(16), t0);
    s.join("room", "viewer", SubscriptionMode::Manual, t0);
    s.join("elsewhere", "stranger", SubscriptionMode::Automatic(16), t0);
    s.pending_track("alice", "0", "alice-a", TrackKind::Audio, false);
    s.offer("alice", AUDIO_OFFER, t0).expect("answer");
    let tids = |t: &[&str]| t.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(!s.subscribe("viewer", "alice", &tids(&["nope"]), t0));
    assert!(!s.subscribe("viewer", "nobody", &tids(&["alice-a"]), t0));
    assert!(
        !s.subscribe("viewer", "viewer", &tids(&[]), t0),
        "not oneself"
    );
    assert!(
        !s.subscribe("stranger", "alice", &tids(&["alice-a"]), t0),
        "not across rooms"
    );
    assert!(s.subscribe("viewer", "alice", &tids(&["alice-a"]), t0));
}

#[test]
fn strangers_datagrams_are_dropped_without_a_route() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    s.join("room", "alice", SubscriptionMode::Automatic(16), t0);
    let stranger: SocketAddr = "10.0.0.9:5555".parse().expect("addr");
    // RTP-looking, DTLS-looking and STUN-looking junk, and an empty datagram.
    for d in [&[0x80u8; 100][..], &[22u8; 50][..], &[0u8; 20][..], &[][..]] {
        s.receive(t0, stranger, d);
    }
    assert_eq!(s.stats().dropped_datagrams, 4);
    assert!(s.poll_transmit().is_none());
    // Time passing with nothing to do is cheap and harmless.
    s.handle_timeout(t0 + Duration::from_secs(1));
    assert!(s.poll_timeout() > t0);
}
