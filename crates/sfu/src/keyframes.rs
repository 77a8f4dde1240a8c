//! Keyframe requests toward publishers, throttled per layer: subscribers ask on every
//! loss, and passing each on would make the publisher send nothing but keyframes.

use std::time::Instant;

use str0m::media::{KeyframeRequest, KeyframeRequestKind, Rid};

use crate::{PeerKind, Sfu, TrackKey, TrackKind};

impl Sfu {
    /// Asks the publisher of `track` for a keyframe on `rid`, at most once per interval.
    pub(crate) fn request_keyframe(
        &mut self,
        (p, generation, mid): TrackKey,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
        now: Instant,
    ) {
        let interval = self.config.keyframe_interval;
        let Some(Some(pm)) = self.members.get_mut(p) else {
            return;
        };
        if pm.joined_seq != generation {
            return;
        }
        let Some(track) = pm.tracks.get_mut(&mid) else {
            return;
        };
        if track.kind != TrackKind::Video {
            return;
        }
        if track
            .last_keyframe_request
            .get(&rid)
            .is_some_and(|t| now.saturating_duration_since(*t) < interval)
        {
            return;
        }
        let Some(peer) = pm.publisher.as_mut() else {
            return;
        };
        let Some(mut writer) = peer.rtc.writer(mid) else {
            return;
        };
        // Only a request that went out starts the throttle window: one refused because
        // the layer has not sent yet must not hold back the next attempt.
        if writer.request_keyframe(rid, kind).is_ok() {
            track.last_keyframe_request.insert(rid, now);
            self.stats.keyframe_requests_sent += 1;
        }
        self.drive(p, PeerKind::Publisher, now);
    }

    /// Asks for keyframes for member `i`'s video slots `which`.
    pub(crate) fn request_keyframes_for(&mut self, i: usize, which: &[usize], now: Instant) {
        let wanted: Vec<(TrackKey, Option<Rid>)> = self
            .member(i)
            .slots
            .iter()
            .enumerate()
            .filter(|(n, s)| s.kind == TrackKind::Video && s.negotiated && which.contains(n))
            .filter_map(|(_, s)| Some((s.track?, s.want_layer.or(s.layer))))
            .collect();
        for (track, rid) in wanted {
            self.request_keyframe(track, rid, KeyframeRequestKind::Pli, now);
        }
    }

    /// A subscriber's PLI/FIR, passed to the publisher of that section's track.
    pub(crate) fn relay_keyframe_request(&mut self, i: usize, req: KeyframeRequest, now: Instant) {
        let m = self.member(i);
        let Some(slot) = m.slots.iter().find(|s| s.mid == req.mid) else {
            return;
        };
        if let Some(track) = slot.track {
            // While a layer switch is pending, the keyframe that helps is the new
            // layer's (the old one may have stopped).
            let layer = slot.want_layer.or(slot.layer);
            self.request_keyframe(track, layer, req.kind, now);
        }
    }
}
