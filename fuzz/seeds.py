#!/usr/bin/env python3
"""Writes the seed corpora of the signaling, sfu and http_extractors targets.

Run from anywhere: `python3 fuzz/seeds.py`. The seeds follow the input formats described at
the top of each target in fuzz_targets/; regenerate them when a format changes. Client
frames come from proto/fixtures/client, SDPs from fuzz_targets/chrome_offer.sdp and the
SFU's own test offer.
"""

import json
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
REPO = FUZZ.parent
CORPUS = FUZZ / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def s(text):
    """A string operand: length byte (255: u16 LE follows), then the bytes."""
    if isinstance(text, str):
        text = text.encode()
    if len(text) < 255:
        return bytes([len(text)]) + text
    return bytes([255]) + struct.pack("<H", len(text)) + text


# --- signaling -------------------------------------------------------------------------

def frame(control, text=""):
    return bytes([control]) + text.encode()


def event(op, arg=0):
    """A space-level event: control byte with slot bits 3."""
    return 3 | (op << 2) | (arg << 5)


def sender(slot, dt_steps=0):
    return slot | (dt_steps << 2)


def signaling():
    fixtures = {
        p.stem: json.dumps(json.loads(p.read_text()), separators=(",", ":"))
        for p in sorted((REPO / "proto/fixtures/client").glob("*.json"))
    }
    for i, (name, text) in enumerate(fixtures.items()):
        # Each fixture alone, from a publisher (slot 0) or the subscriber (slot 2).
        write("signaling", f"fixture-{name}", frame(sender(0 if i % 2 == 0 else 2, 1), text))

    f = fixtures
    sep = b"\xff"
    sessions = {
        # Publish a track, have it reported, mute it, subscribe, unpublish, leave.
        "session-publish": [
            frame(sender(0), f["pending_track_audio"]),
            frame(sender(0), f["pending_track_video"]),
            frame(event(2, 0)),
            frame(event(2, 1)),
            frame(sender(0, 4), f["mute_track"]),
            frame(sender(0, 4), f["unmute_track"]),
            frame(sender(1), f["subscribe_tracks"]),
            frame(sender(0), f["offer"]),
            frame(sender(1), f["sub_answer"]),
            frame(sender(1), f["candidate"]),
            frame(event(4, 0)),
            frame(event(3, 0)),
            frame(event(0, 0)),
        ],
        # Rate limits: custom events in a burst, display names within a second.
        "session-limits": [frame(sender(0), f["custom_event"])] * 12
        + [
            frame(sender(1), f["set_display_name"]),
            frame(sender(1, 1), f["set_display_name"]),
            frame(event(5, 0)),
            frame(sender(1), f["set_display_name"]),
            frame(sender(2), f["custom_event"]),
            frame(sender(2), f["pending_track_video"]),
            frame(sender(2), f["offer"]),
        ],
        # Everyone leaves (idle), then rejoins (a new session), one with a new name.
        "session-rejoin": [
            frame(sender(0), f["sub_answer"]),
            frame(event(0, 0)),
            frame(event(0, 1)),
            frame(event(0, 2)),
            frame(sender(0), f["set_display_name"]),
            frame(event(1, 0)),
            frame(event(1, 4)),
            frame(event(7, 2), "Zoë 🎉"),
            frame(sender(0), f["pending_track_audio"]),
            frame(event(6), f["mute_track"]),
            frame(event(1, 3)),
            frame(event(2, 0), "e35d4166-6f9c-4f6a-9b1e-0d7d5b1b2c3d"),
        ],
    }
    for name, frames in sessions.items():
        write("signaling", name, sep.join(frames))


# --- sfu -------------------------------------------------------------------------------

AUDIO_OFFER = (
    "v=0\r\n"
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "t=0 0\r\n"
    "a=group:BUNDLE 0\r\n"
    "a=msid-semantic: WMS\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=rtcp:9 IN IP4 0.0.0.0\r\n"
    "a=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n"
    "a=setup:actpass\r\n"
    "a=mid:0\r\n"
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"
    "a=sendonly\r\n"
    "a=msid:- 7c4b2a1e-0000-4000-8000-000000000001\r\n"
    "a=rtcp-mux\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
    "a=fmtp:111 minptime=10;useinbandfec=1\r\n"
    "a=ssrc:1111 cname:test\r\n"
)


def op(code, k=0, *operands):
    out = bytes([code, k])
    for o in operands:
        out += o if isinstance(o, bytes) else bytes([o])
    return out


def sfu():
    chrome = (FUZZ / "fuzz_targets/chrome_offer.sdp").read_bytes().decode()
    write("sfu", "offer-audio.sdp", AUDIO_OFFER)
    write("sfu", "offer-chrome-simulcast.sdp", chrome)
    # The publisher stops its camera: the same offer with the video section inactive.
    write("sfu", "offer-chrome-video-stopped.sdp", chrome.replace(
        "a=sendonly\r\na=msid:5e2b3c1a-9f0d-4a57-8c3e-2b1f0e6d7a90 cc67",
        "a=inactive\r\na=msid:5e2b3c1a-9f0d-4a57-8c3e-2b1f0e6d7a90 cc67"))
    # A session-level-only offer, like the initial subscriber exchange.
    write("sfu", "offer-no-media.sdp", "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n")

    join_all = (
        op(0, 0, 2 * 17)        # m0, room r, automatic(16)
        + op(0, 1, 2 * 17)
        + op(0, 2, 0)           # m2 manual
        + op(5, 0, s("v=0\r\n"))
        + op(5, 1, s("v=0\r\n"))
        + op(5, 2, s("v=0\r\n"))
    )
    # pending_track operand byte: mid = b & 7, tid = (b >> 3) & 7 (4..7: a string follows),
    # 0x40 video, 0x80 muted.
    announce = op(2, 0, 0 | (0 << 3)) + op(2, 0, 1 | (1 << 3) | 0x40)
    publish = (
        join_all
        + announce
        + op(4, 0, 1, 0)        # the Chrome offer, no mutation
        + op(6, 1, 0)           # m1 answers what it is offered
        + op(9, 2, 0 | (2 << 2), 0, 1)   # m2 subscribes to m0's t0-0, t0-1
        + op(6, 2, 0)
        + op(12, 0, 1, 7)       # STUN check (USE-CANDIDATE) to m0's publisher from source 0
        + op(11, 0, s(bytes([22, 0xfe, 0xfd]) + bytes(10) + b"\x00\x10" + bytes(16)))
        + op(13, 0, struct.pack("<H", 500))
        + op(8, 0, 0x80)        # mute t0-0
        + op(15, 0)
        + op(13, 0, struct.pack("<H", 3000))
    )
    write("sfu", "ops-publish-subscribe", publish)
    write("sfu", "ops-audio-offer-mutated",
          join_all + announce
          + op(4, 0, 0, 2, 0, 5, s("a=sendrecv"), 4, 9, 20, s("xyz"))
          + op(6, 1, 1, 1, 3))
    write("sfu", "ops-bad-inputs",
          join_all
          + op(3, 0, s("v=0\r\nm=audio 0 RTP/AVP 0\r\n"))
          + op(5, 1, s("not sdp"))
          + op(7, 0, 0, s("candidate:nonsense"))
          + op(7, 1, 1, s("generation 0"))
          + op(14, 0, 0, 3, s(bytes([0x01, 0x00, 0x21, 0x12, 0xa4, 0x42]) + bytes(12)))
          + op(14, 0, 1, 1, s(bytes(30)))
          + op(14, 0, 2, 2, s(bytes([200, 0, 1]) + bytes(5)))
          + op(10, 2, 1 | (1 << 2), 4, s("ghost"))   # unsubscribe from m1's "ghost"
          + op(1, 0) + op(1, 0) + op(0, 0, 0x80 | 3))
    write("sfu", "ops-rejoin-renegotiate",
          join_all + announce
          + op(4, 0, 0, 0)
          + op(6, 1, 0)
          + op(0, 0, 2 * 17)      # m0 joins again: its old peers close
          + op(2, 0, 0)
          + op(4, 0, 0, 0)
          + op(6, 1, 0)
          + op(6, 2, 0)
          + op(12, 1, 4 | 1 | (1 << 3), 9)  # STUN to m1's subscriber PC from source 1
          + op(11, 1, s(bytes([0x80, 96]) + bytes(20)))
          + op(13, 0, struct.pack("<H", 9000)))


# --- http_extractors -------------------------------------------------------------------

def req(method, auth, route, flags=0, query=0, body=0, id1=None, id2="", raw="", q="",
        body_raw=b"", extra=""):
    out = bytes([method, auth, route, flags | (0x40 if id1 is not None else 0), query, body])
    if id1 is not None:
        out += s(id1)
    return out + s(id2) + s(raw) + s(q) + s(body_raw) + s(extra)


GET, POST, DELETE, PUT, PATCH, HEAD, OPTIONS, CUSTOM = range(8)
NOAUTH, RW, RO, OTHER, BADSECRET, B64, RAWAUTH, SCHEME = range(8)
SPACE, ACTIVE, OTHERSPACE, KEY = (0 << 6, 1 << 6, 2 << 6, 3 << 6)
CT_JSON, XFF, CLEN, SLASH = 2, 4, 8, 0x20


def http():
    seeds = {
        "create-space": req(POST, RW, 1, CT_JSON, 0, 2 | 4 | 8, body_raw=b"server"),
        "create-space-empty": req(POST, RW, 1, CT_JSON | CLEN),
        "create-space-raw-json": req(POST, RW, 1, CT_JSON, 0, 1,
                                     body_raw=b'{"type":"server","passthrough":"x","broadcasts":[]}'),
        "create-space-bad-json": req(POST, RW, 1 | SLASH, CT_JSON, 0, 1, body_raw=b'{"type": 5'),
        "create-space-broadcasts": req(POST, RW, 1, 0, 0, 2 | 16 | (1 << 5), body_raw=b"ls1"),
        "create-space-readonly": req(POST, RO, 1, 0, 0, 3 | 8, id2="extra", body_raw=b"p", extra="v"),
        "list-spaces": req(GET, RW, 1, 0, 2, id2="2", q="10"),
        "list-spaces-bad-limit": req(GET, RO, 1, SLASH, 2, id2="0", q="1000"),
        "list-spaces-raw-query": req(GET, RW, 1, 0, 1, q="limit=%20%2B5&page=&x=y&&=="),
        "get-space": req(GET, RW, 2 | SPACE),
        "get-space-other-env": req(GET, OTHER, 2 | SPACE),
        "get-space-made-up-id": req(GET, RW, 2, id1="a b/c%"),
        "delete-active-space": req(DELETE, RW, 2 | ACTIVE),
        "delete-space": req(DELETE, RW, 2 | SPACE),
        "broadcast-get": req(GET, RW, 4 | SPACE, id2="b1"),
        "broadcast-start": req(POST, RW, 5 | OTHERSPACE, id2="b1"),
        "broadcast-stop-bad-id": req(POST, RW, 6, id1="..", id2="\u00e9"),
        "broadcast-create": req(POST, RW, 3 | SPACE, CT_JSON, 0, 1, body_raw=b"{}"),
        "key-get": req(GET, RW, 8 | KEY),
        "key-delete": req(DELETE, RW, 10 | KEY),
        "key-list": req(GET, RO, 9, 0, 2, id2="1", q="100"),
        "key-create-readonly": req(POST, RO, 7, CT_JSON, 0, 1, body_raw=b"{}"),
        "join-upgrade": req(GET, NOAUTH, 11, 1 | XFF, 3, id2="16",
                            q="eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6IksxIn0.e30.c2ln",
                            extra="203.0.113.9"),
        "join-no-upgrade": req(GET, NOAUTH, 12, 0, 3, id2="x", q="", extra="Alice"),
        "join-post": req(POST, NOAUTH, 11, 1, 1, q="token=abc"),
        "wrong-secret": req(GET, BADSECRET, 1, extra="nope"),
        "malformed-auth": req(GET, RAWAUTH, 1, extra="Basic !!!"),
        "basic-no-colon": req(GET, B64, 1, extra="justanid"),
        "lowercase-scheme": req(GET, SCHEME, 2 | SPACE, extra="basic"),
        "bearer-scheme": req(GET, SCHEME, 1, extra="Bearer"),
        "raw-path": req(GET, RW, 0, raw="/video/v1/spaces/%ZZ/broadcasts"),
        "raw-path-unknown": req(PUT, RW, 0, raw="/video/v2/../v1/spaces"),
        "method-not-allowed": req(PATCH, RW, 2 | SPACE),
        "custom-method": req(CUSTOM, RW, 1, extra="PROPFIND"),
        "head-list": req(HEAD, RW, 1),
        "options": req(OPTIONS, NOAUTH, 13),
        "readyz": req(GET, NOAUTH, 14),
        "openapi": req(GET, NOAUTH, 15),
    }
    for name, data in seeds.items():
        write("http_extractors", name, data)


if __name__ == "__main__":
    signaling()
    sfu()
    http()
