//! The SFU (`spacegate_sfu::Sfu`) driven as the server's media thread drives it, by a
//! stranger: members join and leave, send SDP offers (arbitrary text, or mutated copies of
//! a browser's), answer our subscriber offers, trickle candidates, and anyone sends
//! datagrams to the one UDP port, including STUN checks that carry the right ICE
//! credentials and so open a route to a peer connection. Time is virtual: one `Instant`
//! read once, plus offsets.
//!
//! Input, two forms:
//! - text starting with `v=0`: a fixed scenario (three members, tracks announced) in which
//!   member `m0` offers exactly that text, then the others answer what the SFU offers them,
//!   a STUN check opens a route and time passes; for SDP seeds and their mutations.
//! - anything else: a program of at most [`MAX_OPS`] operations, one opcode byte each
//!   followed by its operands (see [`Fuzz::op`]); strings are a length byte (255: a
//!   little-endian u16 follows) and that many bytes.
//!
//! Checked: no panic; at the end, after everyone left, no member, room, peer connection,
//! forward or published track is left (the SFU's own leak check).
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use spacegate_sfu::{PeerKind, Sfu, SfuConfig, SfuEvent, SfuStats, SubscriptionMode, TrackKind};

/// Operations per input: each offer can create a str0m peer, which is the expensive part.
const MAX_OPS: usize = 48;
const MEMBERS: usize = 3;

/// The SFU's host candidate.
const SFU_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 5000);

/// Where datagrams come from: two IPv4 clients, an IPv6 one, and the SFU's own address.
fn sources() -> [SocketAddr; 4] {
    [
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 10), 50000)),
        SocketAddr::from((Ipv4Addr::new(198, 51, 100, 7), 61000)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 50002)),
        SFU_ADDR,
    ]
}

/// A Chrome-like publisher offer with one Opus section (the SFU's own test offer).
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

/// A Chrome-like publisher offer as the Spaces SDK makes it: Opus audio on mid 0, and a
/// camera on mid 1 sent as three simulcast layers, with Chrome's codec list.
const BROWSER_OFFER: &str = include_str!("chrome_offer.sdp");

/// What a client puts in its answers to our subscriber offers.
const CLIENT_FINGERPRINT: &str = "a=fingerprint:sha-256 A1:B2:C3:D4:E5:F6:07:18:29:3A:4B:5C:6D:7E:8F:90:01:12:23:34:45:56:67:78:89:9A:AB:BC:CD:DE:EF:F0";
const SUB_PWD: &str = "fuzzsubscriberpassword00";

fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("SFU_FUZZ_DEBUG").is_some())
}

/// The operand reader: runs out quietly (zeros, empty strings).
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn bytes(&mut self) -> &'a [u8] {
        let len = match self.byte() {
            255 => usize::from(self.u16()),
            n => usize::from(n),
        };
        let (s, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        s
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

fn sdp_attr<'s>(sdp: &'s str, prefix: &str) -> Option<&'s str> {
    sdp.lines().find_map(|l| l.trim_end().strip_prefix(prefix))
}

/// ICE credentials of one peer connection: ours (from the SDP we produced) and the client's
/// (from the SDP it sent).
#[derive(Default, Clone)]
struct Creds {
    local_ufrag: String,
    local_pwd: String,
    remote_ufrag: String,
}

#[derive(Default)]
struct MemberState {
    joined: bool,
    /// The client's ufrag of its last offer (publisher PC).
    offer_ufrag: Option<String>,
    publisher: Option<Creds>,
    subscriber: Option<Creds>,
    /// Our last subscriber offer to it, not yet answered.
    sub_offer: Option<String>,
}

struct Fuzz {
    sfu: Sfu,
    now: Instant,
    members: Vec<MemberState>,
}

fn name(k: usize) -> &'static str {
    ["m0", "m1", "m2"][k % MEMBERS]
}

/// The client's answer to one of our subscriber offers: the same sections, receiving, with
/// the client's ICE and DTLS parameters.
fn answer_for(offer: &str, k: usize) -> String {
    let mut out = String::new();
    for line in offer.split("\r\n").filter(|l| !l.is_empty()) {
        let line = if line.starts_with("o=") {
            "o=- 4242 2 IN IP4 127.0.0.1".to_string()
        } else if line.starts_with("a=ice-ufrag:") {
            format!("a=ice-ufrag:fzsub{k}")
        } else if line.starts_with("a=ice-pwd:") {
            format!("a=ice-pwd:{SUB_PWD}")
        } else if line.starts_with("a=fingerprint:") {
            CLIENT_FINGERPRINT.to_string()
        } else if line.starts_with("a=setup:") {
            "a=setup:active".to_string()
        } else if line == "a=sendonly" {
            "a=recvonly".to_string()
        } else if line == "a=recvonly" {
            "a=sendonly".to_string()
        } else if line == "a=ice-lite"
            || line.starts_with("a=candidate:")
            || line == "a=end-of-candidates"
            || line.starts_with("a=msid:")
            || line.starts_with("a=ssrc")
        {
            continue;
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

/// A few line-level edits of an SDP, chosen by the input.
fn mutate(sdp: &str, r: &mut Reader) -> String {
    let mut lines: Vec<String> = sdp.split("\r\n").map(str::to_string).collect();
    for _ in 0..r.byte() % 4 {
        if lines.is_empty() {
            break;
        }
        let op = r.byte();
        let at = usize::from(r.byte()) % lines.len();
        match op % 6 {
            0 => lines[at] = r.string(),
            1 => {
                lines.remove(at);
            }
            2 => lines.insert(at, r.string()),
            3 => {
                let l = lines[at].clone();
                lines.insert(at, l);
            }
            4 => {
                let l = &mut lines[at];
                let mut cut = usize::from(r.byte()).min(l.len());
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
                let tail = r.string();
                l.push_str(&tail);
            }
            _ => {
                let other = usize::from(r.byte()) % lines.len();
                lines.swap(at, other);
            }
        }
    }
    lines.join("\r\n")
}

/// A STUN binding request from the client of `creds`, as a browser sends it: USERNAME,
/// PRIORITY, ICE-CONTROLLING, maybe USE-CANDIDATE, MESSAGE-INTEGRITY with our password,
/// FINGERPRINT.
fn stun_request(creds: &Creds, trans: [u8; 12], use_candidate: bool, corrupt: bool) -> Vec<u8> {
    fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        buf.extend_from_slice(value);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
    }
    let username = format!("{}:{}", creds.local_ufrag, creds.remote_ufrag);
    let mut attrs = Vec::new();
    attr(&mut attrs, 0x0006, username.as_bytes());
    attr(&mut attrs, 0x0024, &0x6e7f_00ffu32.to_be_bytes());
    attr(&mut attrs, 0x802a, &0x0102_0304_0506_0708u64.to_be_bytes());
    if use_candidate {
        attr(&mut attrs, 0x0025, &[]);
    }
    let header = |len: usize| {
        let mut h = vec![0x00, 0x01];
        h.extend_from_slice(&(len as u16).to_be_bytes());
        h.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        h.extend_from_slice(&trans);
        h
    };
    // MESSAGE-INTEGRITY covers the header (its length counting up to MI) and the
    // attributes before it.
    let mut signed = header(attrs.len() + 24);
    signed.extend_from_slice(&attrs);
    let key = aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        creds.local_pwd.as_bytes(),
    );
    let mut mac = aws_lc_rs::hmac::sign(&key, &signed).as_ref().to_vec();
    if corrupt {
        mac[0] ^= 1;
    }
    attr(&mut attrs, 0x0008, &mac);
    let mut msg = header(attrs.len() + 8);
    msg.extend_from_slice(&attrs);
    let crc = crc32(&msg) ^ 0x5354_554e;
    let mut fp = Vec::new();
    attr(&mut fp, 0x8028, &crc.to_be_bytes());
    msg.extend_from_slice(&fp);
    msg
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

impl Fuzz {
    fn new() -> Self {
        let now = t0();
        let config = SfuConfig::new(SFU_ADDR);
        Fuzz {
            sfu: Sfu::new(config, now),
            now,
            members: (0..MEMBERS).map(|_| MemberState::default()).collect(),
        }
    }

    /// Drains datagrams and events, as the media thread does after every command.
    fn drain(&mut self) {
        while let Some(t) = self.sfu.poll_transmit() {
            if debug() {
                eprintln!("transmit {} bytes to {}", t.contents.len(), t.destination);
            }
        }
        while let Some(e) = self.sfu.poll_event() {
            if debug() {
                eprintln!("event: {e:?}");
            }
            if let SfuEvent::SubOffer { member, sdp, .. } = e {
                if let Some(k) = (0..MEMBERS).find(|&k| name(k) == &*member) {
                    let m = &mut self.members[k];
                    if let (Some(ufrag), Some(pwd)) =
                        (sdp_attr(&sdp, "a=ice-ufrag:"), sdp_attr(&sdp, "a=ice-pwd:"))
                    {
                        m.subscriber = Some(Creds {
                            local_ufrag: ufrag.into(),
                            local_pwd: pwd.into(),
                            remote_ufrag: format!("fzsub{k}"),
                        });
                    }
                    m.sub_offer = Some(sdp);
                }
            }
        }
    }

    fn join(&mut self, k: usize, room: &str, mode: SubscriptionMode, stable: bool) {
        if stable {
            self.sfu.join_stable(room, name(k), mode, self.now);
        } else {
            self.sfu.join(room, name(k), mode, self.now);
        }
        self.members[k] = MemberState {
            joined: true,
            ..MemberState::default()
        };
    }

    fn leave(&mut self, k: usize) {
        self.sfu.leave(name(k), self.now);
        self.members[k] = MemberState::default();
    }

    fn offer(&mut self, k: usize, sdp: &str) {
        let result = self.sfu.offer(name(k), sdp, self.now);
        if debug() {
            eprintln!("offer by {k}: {result:?}");
        }
        if let Ok(answer) = result {
            let m = &mut self.members[k];
            m.offer_ufrag = sdp_attr(sdp, "a=ice-ufrag:").map(str::to_string);
            if let (Some(ufrag), Some(pwd), Some(remote)) = (
                sdp_attr(&answer, "a=ice-ufrag:"),
                sdp_attr(&answer, "a=ice-pwd:"),
                m.offer_ufrag.clone(),
            ) {
                m.publisher = Some(Creds {
                    local_ufrag: ufrag.into(),
                    local_pwd: pwd.into(),
                    remote_ufrag: remote,
                });
            }
        }
    }

    fn sub_answer(&mut self, k: usize, sdp: &str) {
        let result = self.sfu.sub_answer(name(k), sdp, self.now);
        if debug() {
            eprintln!("sub_answer by {k}: {result:?}");
        }
        self.members[k].sub_offer = None;
    }

    /// Answers our outstanding subscriber offer to `k` as a browser would.
    fn answer_offer(&mut self, k: usize, r: Option<&mut Reader>) {
        let Some(offer) = self.members[k].sub_offer.clone() else {
            return;
        };
        let mut answer = answer_for(&offer, k);
        if let Some(r) = r {
            answer = mutate(&answer, r);
        }
        self.sub_answer(k, &answer);
    }

    fn stun(&mut self, k: usize, kind: PeerKind, source: SocketAddr, trans: [u8; 12], bits: u8) {
        let m = &self.members[k];
        let creds = match kind {
            PeerKind::Publisher => m.publisher.clone(),
            PeerKind::Subscriber => m.subscriber.clone(),
        };
        let Some(creds) = creds else { return };
        let msg = stun_request(&creds, trans, bits & 1 != 0, bits & 2 != 0);
        self.sfu.receive(self.now, source, &msg);
    }

    /// Moves the clock forward by `by`, waking the SFU at each deadline on the way as the
    /// media thread's sleep would (time never goes backwards; a deadline that does not
    /// move is retried a millisecond later), at most [`MAX_WAKEUPS`] times.
    fn advance(&mut self, by: Duration) {
        const MAX_WAKEUPS: usize = 128;
        let target = self.now + by;
        for _ in 0..MAX_WAKEUPS {
            let mut due = self.sfu.poll_timeout();
            if due <= self.now {
                due = self.now + Duration::from_millis(1);
            }
            if due > target {
                break;
            }
            self.now = due;
            self.sfu.handle_timeout(due);
            self.drain();
        }
        self.now = target;
        self.sfu.handle_timeout(target);
        self.drain();
    }

    /// A track id: `choice & 7` below 4 names one of member `k`'s usual four, above reads
    /// one from the input.
    fn tid(k: usize, choice: u8, r: &mut Reader) -> String {
        match choice & 7 {
            n @ 0..=3 => format!("t{k}-{n}"),
            _ => r.string(),
        }
    }

    /// One operation; its opcode and operands come from `r`.
    fn op(&mut self, r: &mut Reader) {
        let op = r.byte();
        let k = usize::from(r.byte()) % MEMBERS;
        if debug() {
            eprintln!("op {} on m{k}", op % 16);
        }
        match op % 16 {
            0 => {
                let b = r.byte();
                let room = if b & 1 == 0 { "r" } else { "r2" };
                let mode = match (b >> 1) % 22 {
                    0 => SubscriptionMode::Manual,
                    n => SubscriptionMode::Automatic(n - 1),
                };
                self.join(k, room, mode, b & 0x80 != 0);
            }
            1 => self.leave(k),
            2 => {
                let b = r.byte();
                let mid = match b & 7 {
                    n @ 0..=3 => n.to_string(),
                    _ => r.string(),
                };
                let tid = Self::tid(k, b >> 3, r);
                let kind = if b & 0x40 == 0 {
                    TrackKind::Audio
                } else {
                    TrackKind::Video
                };
                self.sfu
                    .pending_track(name(k), &mid, &tid, kind, b & 0x80 != 0);
            }
            3 => {
                let sdp = r.string();
                self.offer(k, &sdp);
            }
            4 => {
                let seed = if r.byte() & 1 == 0 {
                    AUDIO_OFFER
                } else {
                    BROWSER_OFFER
                };
                let sdp = mutate(seed, r);
                self.offer(k, &sdp);
            }
            5 => {
                let sdp = r.string();
                self.sub_answer(k, &sdp);
            }
            6 => self.answer_offer(k, Some(r)),
            7 => {
                let candidate = match r.byte() % 3 {
                    0 => r.string(),
                    1 => format!(
                        "candidate:1 1 udp 2122260223 192.0.2.10 50000 typ host {}",
                        r.string()
                    ),
                    _ => format!("a=candidate:{}", r.string()),
                };
                let _ = self.sfu.candidate(name(k), &candidate);
            }
            8 => {
                let b = r.byte();
                let tid = Self::tid(k, b, r);
                self.sfu.set_muted(name(k), &tid, b & 0x80 != 0, self.now);
            }
            9 | 10 => {
                let b = r.byte();
                let publisher = match b & 3 {
                    3 => r.string(),
                    p => name(usize::from(p)).to_string(),
                };
                let p = usize::from(b & 3) % MEMBERS;
                let tids: Vec<String> = (0..(b >> 2) & 3)
                    .map(|_| {
                        let c = r.byte();
                        Self::tid(p, c, r)
                    })
                    .collect();
                if op % 16 == 9 {
                    self.sfu.subscribe(name(k), &publisher, &tids, self.now);
                } else {
                    self.sfu.unsubscribe(name(k), &publisher, &tids, self.now);
                }
            }
            11 => {
                let source = sources()[k];
                let data = r.bytes();
                self.sfu.receive(self.now, source, data);
            }
            12 => {
                let b = r.byte();
                let kind = if b & 4 == 0 {
                    PeerKind::Publisher
                } else {
                    PeerKind::Subscriber
                };
                let source = sources()[usize::from(b >> 3) % 4];
                let mut trans = [0u8; 12];
                trans[0] = r.byte();
                trans[11] = op;
                self.stun(k, kind, source, trans, b);
            }
            13 => {
                let ms = u64::from(r.u16()) % 10_000;
                self.advance(Duration::from_millis(ms));
            }
            14 => {
                // A datagram whose first byte puts it in one RFC 7983 class, the rest free.
                let source = sources()[usize::from(r.byte()) % 4];
                let first = match r.byte() % 4 {
                    0 => 22,   // DTLS handshake
                    1 => 0x80, // RTP
                    2 => 0x81, // RTCP (with a payload type in 200..=206 next)
                    _ => 0x00, // STUN
                };
                let mut d = vec![first];
                d.extend_from_slice(r.bytes());
                self.sfu.receive(self.now, source, &d);
            }
            _ => {
                // Read-only accessors the server calls (media thread recovery, metrics).
                let _ = self.sfu.stats();
                let _ = self.sfu.counters();
                let _ = self.sfu.has_peers(name(k));
                let _ = self.sfu.answered_initial_offer(name(k));
                let _ = self.sfu.members().count();
                assert_eq!(
                    self.sfu.counters().members,
                    self.members.iter().filter(|m| m.joined).count(),
                    "member count"
                );
            }
        }
        self.drain();
    }

    /// The `v=0` form: `m0` offers `sdp` in an otherwise well-behaved room.
    fn scenario(&mut self, sdp: &str) {
        let auto = SubscriptionMode::Automatic(16);
        self.join(0, "r", auto, false);
        self.join(1, "r", auto, false);
        self.join(2, "r", SubscriptionMode::Manual, false);
        for k in 0..MEMBERS {
            self.sub_answer(k, "v=0\r\n");
        }
        self.sfu
            .pending_track("m0", "0", "t0-0", TrackKind::Audio, false);
        self.sfu
            .pending_track("m0", "1", "t0-1", TrackKind::Video, false);
        self.sfu
            .pending_track("m0", "2", "t0-2", TrackKind::Video, true);
        self.offer(0, sdp);
        self.drain();
        let tids = ["t0-0".to_string(), "t0-1".to_string()];
        self.sfu.subscribe("m2", "m0", &tids, self.now);
        self.drain();
        for k in 1..MEMBERS {
            self.answer_offer(k, None);
            self.drain();
        }
        let [a, b, ..] = sources();
        self.stun(0, PeerKind::Publisher, a, [1; 12], 1);
        self.stun(1, PeerKind::Subscriber, b, [2; 12], 1);
        self.drain();
        self.advance(Duration::from_millis(1500));
        self.sfu.set_muted("m0", "t0-0", true, self.now);
        self.drain();
        // The SDK's next offer: the same text again (renegotiation with nothing new).
        self.offer(0, sdp);
        self.drain();
        self.advance(Duration::from_secs(40));
    }

    /// Everyone leaves; nothing may be left behind.
    fn finish(mut self) {
        for k in 0..MEMBERS {
            self.leave(k);
            self.drain();
        }
        self.advance(Duration::from_secs(1));
        let s = self.sfu.stats();
        let left = SfuStats {
            members: s.members,
            rooms: s.rooms,
            peer_connections: s.peer_connections,
            forwards: s.forwards,
            published_tracks: s.published_tracks,
            ..SfuStats::default()
        };
        assert_eq!(
            left,
            SfuStats::default(),
            "state left after every member left"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut f = Fuzz::new();
    if data.starts_with(b"v=0") {
        let Ok(sdp) = std::str::from_utf8(data) else {
            return;
        };
        f.scenario(sdp);
    } else {
        let mut r = Reader { data };
        for _ in 0..MAX_OPS {
            if r.is_empty() {
                break;
            }
            f.op(&mut r);
        }
    }
    f.finish();
});
