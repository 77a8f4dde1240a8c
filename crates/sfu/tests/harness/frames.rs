//! Synthetic media frames whose bytes name their origin: which source, which simulcast
//! layer, which frame. A receiver can tell what it got without any side channel, and a
//! test can compare what arrived byte for byte with what was written.
//!
//! Layout: `[tag, source (u16 BE), layer, seq (u32 BE), filler…]`. For video the tag is a
//! VP8 payload header whose P bit (bit 0) is 0 on keyframes, which is all str0m's VP8
//! depacketiser looks at to set `is_keyframe`.

/// Audio frames are one small Opus-sized packet.
pub const AUDIO_LEN: usize = 160;

/// Video frames span several RTP packets (str0m's MTU is about 1150 bytes), so forwarding
/// has to reassemble and re-packetise them; higher simulcast layers are bigger, as real
/// ones are.
pub fn video_len(layer: u8) -> usize {
    1500 * (usize::from(layer) + 1)
}

const AUDIO_TAG: u8 = b'A';
/// VP8 frame tag with show_frame set; bit 0 (P) clear means keyframe.
const VP8_KEY: u8 = 0x10;
const VP8_DELTA: u8 = 0x11;

/// What a frame says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub source: u16,
    pub layer: u8,
    pub seq: u32,
    /// `None` for audio.
    pub keyframe: Option<bool>,
}

/// Builds the frame `tag` describes; the filler depends on every field so that two
/// different frames never compare equal.
pub fn frame(tag: Tag) -> Vec<u8> {
    let (first, len) = match tag.keyframe {
        None => (AUDIO_TAG, AUDIO_LEN),
        Some(true) => (VP8_KEY, video_len(tag.layer)),
        Some(false) => (VP8_DELTA, video_len(tag.layer)),
    };
    let mut out = Vec::with_capacity(len);
    out.push(first);
    out.extend_from_slice(&tag.source.to_be_bytes());
    out.push(tag.layer);
    out.extend_from_slice(&tag.seq.to_be_bytes());
    let salt = tag.seq.wrapping_mul(31) ^ u32::from(tag.source) << 8 ^ u32::from(tag.layer);
    out.extend((out.len()..len).map(|i| (salt.wrapping_add(i as u32 * 7) % 251) as u8));
    out
}

impl Tag {
    /// Reads a frame's header; `None` for bytes that are not one of ours.
    pub fn parse(data: &[u8]) -> Option<Tag> {
        let keyframe = match *data.first()? {
            AUDIO_TAG => None,
            VP8_KEY => Some(true),
            VP8_DELTA => Some(false),
            _ => return None,
        };
        Some(Tag {
            source: u16::from_be_bytes(data.get(1..3)?.try_into().ok()?),
            layer: *data.get(3)?,
            seq: u32::from_be_bytes(data.get(4..8)?.try_into().ok()?),
            keyframe,
        })
    }
}
