//! An in-memory, virtual-time network around the SFU, in the spirit of str0m's own
//! `tests/common.rs`: str0m client peers talk to the [`Sfu`] through a queue of datagrams
//! instead of sockets, and the clock is a variable that jumps from one deadline to the
//! next. Real time is read once, for the origin; nothing sleeps, nothing runs on another
//! thread, so a run depends only on what the test does, and seconds of media take
//! milliseconds.
//!
//! One step of [`Net::run_for`] takes the earliest of: a datagram arriving (after
//! [`LATENCY`], or what [`Net::set_link`] decides), the SFU's `poll_timeout`, a client
//! peer's timeout, a client's next frame. Signaling (offers, answers, `pending_track`)
//! is instantaneous: the SFU handles it synchronously, so its latency changes nothing
//! but when media starts.

pub mod frames;
mod peer;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use spacegate_sfu::{Sfu, SfuConfig, SfuEvent, SubscriptionMode, initial_offer};

pub use peer::{Client, KeyframeAsk, Received, Sent, TrackSpec};

/// The SFU's one host candidate.
pub const SFU_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 5000));

/// One-way delay of every datagram unless [`Net::set_link`] says otherwise: an
/// ordinary internet path, long enough that a DTLS handshake takes longer than a frame.
pub const LATENCY: Duration = Duration::from_millis(20);

/// How far the clock moves when a peer asks to be woken no later than it just was:
/// str0m sometimes does, and a real loop would simply come back a moment later.
const TICK: Duration = Duration::from_millis(1);

/// When a timer set to `timeout` should fire, given it last fired at `woken`.
fn due(timeout: Instant, woken: Option<Instant>) -> Instant {
    match woken {
        Some(w) if timeout <= w => w + TICK,
        _ => timeout,
    }
}

/// A datagram on the wire.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub contents: Vec<u8>,
    deliver: Instant,
}

impl Datagram {
    /// RTP media (not RTCP, STUN or DTLS), by RFC 7983's first byte and RFC 5761's
    /// payload type range.
    pub fn is_rtp(&self) -> bool {
        matches!(self.contents.first(), Some(128..=191))
            && !matches!(self.contents.get(1).map(|b| b & 0x7f), Some(64..=95))
    }
}

/// A client, by the order it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(usize);

/// Decides each datagram's fate: `None` loses it, `Some(delay)` delivers it that much later.
type Link = Box<dyn FnMut(&Datagram) -> Option<Duration>>;

/// The SFU, its clients, the wire between them, and the clock.
pub struct Net {
    pub sfu: Sfu,
    start: Instant,
    now: Instant,
    sfu_woken: Option<Instant>,
    clients: Vec<Client>,
    /// In flight, by delivery time (ties in sending order).
    wire: VecDeque<Datagram>,
    link: Option<Link>,
    /// Every event the SFU emitted, with the virtual time it did.
    pub events: Vec<(Duration, SfuEvent)>,
    /// Datagrams the link lost.
    pub lost: u64,
    next_source: u16,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("elapsed", &self.elapsed())
            .field("clients", &self.clients.len())
            .field("in_flight", &self.wire.len())
            .finish()
    }
}

const ROOM: &str = "room";

impl Net {
    pub fn new() -> Net {
        Net::with_config(|_| {})
    }

    pub fn with_config(configure: impl FnOnce(&mut SfuConfig)) -> Net {
        // The one real clock read: the origin every virtual time counts from.
        let start = Instant::now();
        let mut config = SfuConfig::new(SFU_ADDR);
        configure(&mut config);
        Net {
            sfu: Sfu::new(config, start),
            start,
            now: start,
            sfu_woken: None,
            clients: Vec::new(),
            wire: VecDeque::new(),
            link: None,
            events: Vec::new(),
            lost: 0,
            next_source: 0,
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn client(&self, id: Id) -> &Client {
        &self.clients[id.0]
    }

    pub fn client_mut(&mut self, id: Id) -> &mut Client {
        &mut self.clients[id.0]
    }

    /// Joins `name` to the room and answers the join's m-line-less offer, as the SDK
    /// does before anything else.
    pub fn join(&mut self, name: &str, mode: SubscriptionMode) -> Id {
        assert!(
            !self.clients.iter().any(|c| c.name == name && !c.gone),
            "{name} is already in"
        );
        let number = u8::try_from(self.clients.len() + 1).expect("at most 255 clients");
        self.clients.push(Client::new(name, number));
        self.sfu.join(ROOM, name, mode, self.now);
        // The browser's answer to `initial_offer`; the SFU does not read it.
        let answer = initial_offer(u64::from(number));
        self.sfu
            .sub_answer(name, &answer, self.now)
            .expect("the join's offer is outstanding");
        self.drain();
        Id(self.clients.len() - 1)
    }

    /// Publishes `specs` in one offer: each section announced with `pending_track`, the
    /// offer sent, the answer applied, and a synthetic source started per section.
    pub fn publish(&mut self, id: Id, specs: &[TrackSpec]) {
        let (now, at) = (self.now, self.elapsed());
        let client = &mut self.clients[id.0];
        let (offer, added, pending) = client.publish_offer(specs, now);
        for (mid, spec) in &added {
            self.sfu
                .pending_track(&client.name, &mid.to_string(), &spec.tid, spec.kind, false);
        }
        let answer = self
            .sfu
            .offer(&client.name, &offer, now)
            .expect("the SFU answers a str0m offer");
        let first_source = self.next_source;
        self.next_source += added.len() as u16;
        client.publish_answer(pending, &answer, added, first_source, now, at);
        self.drain();
    }

    /// The member leaves (the SDK's socket closes) and its peer connections vanish.
    pub fn leave(&mut self, id: Id) {
        let name = self.clients[id.0].name.clone();
        self.sfu.leave(&name, self.now);
        self.clients[id.0].vanish();
        self.drain();
    }

    /// The subscriber's decoder asks for a keyframe of `tid` (RTCP PLI).
    pub fn pli(&mut self, id: Id, tid: &str) {
        let at = self.elapsed();
        self.clients[id.0].request_keyframe(tid, at);
        self.drain();
    }

    /// From now on `link` decides what becomes of each datagram sent: lost (`None`) or
    /// delivered after a delay, which may differ between datagrams (reordering). Give it
    /// its own counter, not randomness, to keep the run deterministic.
    pub fn set_link(&mut self, link: impl FnMut(&Datagram) -> Option<Duration> + 'static) {
        self.link = Some(Box::new(link));
    }

    /// Back to every datagram delivered after [`LATENCY`].
    pub fn reset_link(&mut self) {
        self.link = None;
    }

    /// Advances virtual time by `d`, delivering and handling everything due on the way.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_to(end, |_| false);
        self.now = end;
    }

    /// Advances virtual time until `done` holds (checked after every step) or `limit`
    /// has passed; says whether it held.
    pub fn run_until(&mut self, limit: Duration, done: impl FnMut(&Net) -> bool) -> bool {
        let end = self.now + limit;
        let met = self.run_to(end, done);
        if !met {
            self.now = end;
        }
        met
    }

    fn run_to(&mut self, end: Instant, mut done: impl FnMut(&Net) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let next = self.next_wake();
            if next > end {
                return false;
            }
            self.now = self.now.max(next);
            self.step();
        }
    }

    fn next_wake(&self) -> Instant {
        let sfu = due(self.sfu.poll_timeout(), self.sfu_woken);
        let wire = self.wire.front().map(|d| d.deliver);
        let clients = self.clients.iter().filter_map(Client::wake_at);
        clients.chain(wire).fold(sfu, Instant::min)
    }

    /// Everything due at `now`, in a fixed order: arrivals, the SFU's timers, the
    /// clients' timers and frames; then the consequences, until nothing moves.
    fn step(&mut self) {
        let (now, at) = (self.now, self.elapsed());
        while self.wire.front().is_some_and(|d| d.deliver <= now) {
            let d = self.wire.pop_front().expect("checked above");
            if d.to == SFU_ADDR {
                self.sfu.receive(now, d.from, &d.contents);
            } else if let Some(c) = self
                .clients
                .iter_mut()
                .find(|c| !c.gone && (c.pub_addr == d.to || c.sub_addr == d.to))
            {
                c.receive(now, at, d.from, d.to, &d.contents);
            }
            // Anything else was addressed to a client that left: lost, as on a network.
        }
        if due(self.sfu.poll_timeout(), self.sfu_woken) <= now {
            self.sfu_woken = Some(now);
            self.sfu.handle_timeout(now);
        }
        for c in &mut self.clients {
            c.on_time(now, at);
        }
        self.drain();
    }

    /// Moves what the SFU and the clients produced: datagrams onto the wire, SFU
    /// events to the clients they concern (offers answered at once), until quiet.
    fn drain(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.sfu.poll_transmit() {
                self.send(t.source, t.destination, t.contents.to_vec());
                moved = true;
            }
            while let Some(e) = self.sfu.poll_event() {
                self.on_event(e);
                moved = true;
            }
            for i in 0..self.clients.len() {
                for t in std::mem::take(&mut self.clients[i].outbox) {
                    self.send(t.source, t.destination, t.contents.to_vec());
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, contents: Vec<u8>) {
        let mut d = Datagram {
            from,
            to,
            contents,
            deliver: self.now,
        };
        let delay = match self.link.as_mut() {
            Some(link) => link(&d),
            None => Some(LATENCY),
        };
        let Some(delay) = delay else {
            self.lost += 1;
            return;
        };
        d.deliver += delay;
        // After everything due no later: a shorter delay overtakes, an equal one queues.
        let at = self.wire.partition_point(|x| x.deliver <= d.deliver);
        self.wire.insert(at, d);
    }

    fn on_event(&mut self, e: SfuEvent) {
        let (now, at) = (self.now, self.elapsed());
        if let SfuEvent::SubOffer { member, sdp, .. } = &e {
            if let Some(c) = self
                .clients
                .iter_mut()
                .find(|c| !c.gone && c.name == **member)
            {
                let answer = c.answer_sub_offer(sdp, now, at);
                self.sfu
                    .sub_answer(member, &answer, now)
                    .expect("the SFU takes a str0m answer to its offer");
            }
        }
        self.events.push((at, e));
    }
}
