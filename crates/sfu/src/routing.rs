//! Which peer connection a datagram belongs to.
//!
//! All peers share one UDP port. A known source address maps straight to its peer. A new
//! address can only be opened by a STUN binding request, and that request names the peer:
//! its USERNAME attribute is `<our ufrag>:<client ufrag>` (RFC 8445 §7.2.2), and our ufrag is
//! unique per peer connection. So a new route costs one hash lookup, not a scan of every
//! peer on the node; the peer itself then checks the message integrity.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use str0m::Input;
use str0m::net::{Protocol, Receive};

use crate::{PeerKind, Sfu};

/// Source addresses one peer connection may use: IPv4, IPv6 and a NAT rebinding or two.
/// More is a client spraying checks to grow our state.
pub(crate) const MAX_ROUTES_PER_PEER: usize = 8;

#[derive(Debug, Default)]
pub(crate) struct Routing {
    by_addr: HashMap<SocketAddr, (usize, PeerKind)>,
    by_ufrag: HashMap<Box<str>, (usize, PeerKind)>,
}

/// What one member put into [`Routing`].
#[derive(Debug, Default)]
pub(crate) struct MemberRoutes {
    addrs: Vec<(SocketAddr, PeerKind)>,
    /// Our current ICE ufrag per peer (publisher, subscriber); an ICE restart replaces it.
    ufrags: [Option<Box<str>>; 2],
}

fn kind_index(kind: PeerKind) -> usize {
    match kind {
        PeerKind::Publisher => 0,
        PeerKind::Subscriber => 1,
    }
}

impl Routing {
    /// Forgets everything member `i` had.
    pub(crate) fn remove_member(&mut self, routes: &mut MemberRoutes) {
        for (addr, _) in routes.addrs.drain(..) {
            self.by_addr.remove(&addr);
        }
        for ufrag in routes.ufrags.iter_mut().filter_map(Option::take) {
            self.by_ufrag.remove(&ufrag);
        }
    }
}

/// The `a=ice-ufrag:` of an SDP we produced (every section of a bundle carries the same).
pub(crate) fn sdp_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
}

/// The part of a STUN request's USERNAME before the colon: the ufrag of ours it is for.
/// Returns `None` for anything that is not a well-formed STUN message with a USERNAME.
pub(crate) fn stun_local_ufrag(data: &[u8]) -> Option<&str> {
    const HEADER: usize = 20;
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
    const USERNAME: u16 = 0x0006;
    if data.len() < HEADER || data[0] > 3 || data[4..8] != MAGIC {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let body = data.get(HEADER..HEADER + length)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + len)?;
        if kind == USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        // Attributes are padded to four bytes.
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

impl Sfu {
    /// Records the ufrag of an SDP we just produced for member `i`'s peer of `kind`, so
    /// the client's first STUN check finds its peer.
    pub(crate) fn note_ufrag(&mut self, i: usize, kind: PeerKind, sdp: &str) {
        let Some(ufrag) = sdp_ufrag(sdp) else { return };
        let Some(Some(m)) = self.members.get_mut(i) else {
            return;
        };
        let slot = &mut m.routes.ufrags[kind_index(kind)];
        if slot.as_deref() == Some(ufrag) {
            return;
        }
        if let Some(old) = slot.take() {
            self.routing.by_ufrag.remove(&old);
        }
        let ufrag: Box<str> = ufrag.into();
        self.routing.by_ufrag.insert(ufrag.clone(), (i, kind));
        *slot = Some(ufrag);
    }

    /// One datagram from the socket. Unknown senders are accepted only with a STUN
    /// check naming one of our peers.
    pub fn receive(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        let Ok(contents) = data.try_into() else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.config.candidate,
                contents,
            },
        );
        let route = match self.routing.by_addr.get(&source) {
            Some(r) => Some(*r),
            // RFC 7983: only STUN can open a new route; anything else from an unknown
            // address is dropped.
            None => self.open_route(source, data, &input),
        };
        let Some((i, kind)) = route else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let rate = f64::from(self.config.packets_per_second);
        let Some(peer) = self
            .members
            .get_mut(i)
            .and_then(Option::as_mut)
            .and_then(|m| m.peer_mut(kind))
        else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let elapsed = now.saturating_duration_since(peer.refilled).as_secs_f64();
        peer.tokens = (peer.tokens + elapsed * rate).min(rate * 2.0);
        peer.refilled = now;
        if peer.tokens < 1.0 {
            self.stats.dropped_datagrams += 1;
            return;
        }
        peer.tokens -= 1.0;
        if let Err(e) = peer.rtc.handle_input(input) {
            tracing::debug!(error = %e, "datagram rejected");
        }
        self.drive(i, kind, now);
    }

    fn open_route(
        &mut self,
        source: SocketAddr,
        data: &[u8],
        input: &Input,
    ) -> Option<(usize, PeerKind)> {
        let ufrag = stun_local_ufrag(data)?;
        let (i, kind) = *self.routing.by_ufrag.get(ufrag)?;
        let m = self.members.get_mut(i)?.as_mut()?;
        let accepted = match kind {
            PeerKind::Publisher => m.publisher.as_ref(),
            PeerKind::Subscriber => m.subscriber.as_ref(),
        }
        .is_some_and(|p| p.rtc.accepts(input));
        let in_use = m.routes.addrs.iter().filter(|(_, k)| *k == kind).count();
        if !accepted || in_use >= MAX_ROUTES_PER_PEER {
            return None;
        }
        m.routes.addrs.push((source, kind));
        self.routing.by_addr.insert(source, (i, kind));
        Some((i, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(username: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        // A PRIORITY attribute first, so the parser must skip one.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn the_local_ufrag_comes_from_the_username_attribute() {
        assert_eq!(stun_local_ufrag(&stun(b"srv1:cli")), Some("srv1"));
        assert_eq!(stun_local_ufrag(&stun(b"abc")), Some("abc"));
    }

    #[test]
    fn malformed_stun_names_nobody() {
        let good = stun(b"srv1:cli");
        assert_eq!(stun_local_ufrag(&good[..19]), None, "short header");
        let mut rtp = good.clone();
        rtp[0] = 0x80;
        assert_eq!(stun_local_ufrag(&rtp), None, "not STUN (RFC 7983)");
        let mut no_cookie = good.clone();
        no_cookie[4] = 0;
        assert_eq!(stun_local_ufrag(&no_cookie), None);
        let mut long = good.clone();
        long[3] = 200;
        assert_eq!(stun_local_ufrag(&long), None, "length beyond the datagram");
        let mut bad_attr = good;
        bad_attr[23] = 250;
        assert_eq!(
            stun_local_ufrag(&bad_attr),
            None,
            "attribute beyond the body"
        );
        assert_eq!(stun_local_ufrag(&stun(&[0xff, 0xfe])), None, "not UTF-8");
    }

    #[test]
    fn the_ufrag_is_read_from_an_sdp() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:Xy12\r\na=ice-pwd:p\r\n";
        assert_eq!(sdp_ufrag(sdp), Some("Xy12"));
        assert_eq!(sdp_ufrag("v=0\r\n"), None);
    }
}
