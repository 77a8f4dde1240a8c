//! Every client string or list that is fanned out or stored has a cap, enforced when the
//! frame is decoded; the error names the field and its cap. Each case sits one byte (or one
//! entry) past its cap, next to the same frame at the cap, which must pass.

use serde_json::json;
use spacegate_proto::signaling::{
    ClientMessage, DecodeError, Envelope, MAX_CANDIDATE_BYTES, MAX_CUSTOM_EVENT_ID, MAX_MID,
    MAX_REQUEST_ID, MAX_SDP_BYTES, MAX_SUBSCRIBE_CONNECTIONS, MAX_SUBSCRIBE_TRACKS, MAX_TRACK_ID,
    MAX_TRACK_NAME,
};

fn decode(v: serde_json::Value) -> Result<Envelope<ClientMessage>, DecodeError> {
    Envelope::<ClientMessage>::decode_client(&v.to_string())
}

fn s(n: usize) -> String {
    "a".repeat(n)
}

fn pending(tid: &str, name: &str, mid: &str) -> serde_json::Value {
    json!({"pending_track": {"tid": tid, "type": 1, "name": name, "muted": false,
        "source": "camera", "height": 0, "width": 0, "mid": mid}})
}

fn subscribe(connections: usize, tracks: usize, tid_len: usize) -> serde_json::Value {
    let c: Vec<_> = (0..connections)
        .map(|i| json!({"connection_id": format!("c{i}"), "track_ids": vec![s(tid_len); tracks]}))
        .collect();
    json!({"subscribe_tracks": {"connections": c}})
}

#[test]
fn each_cap_refuses_one_past_it_and_names_itself() {
    let event = |id: &str| json!({"custom_event": {"id": id, "payload": "x", "scope": 1}});
    let cases: Vec<(&str, serde_json::Value, serde_json::Value, &str, usize)> = vec![
        (
            "request_id",
            json!({"mute_track": "t", "request_id": s(MAX_REQUEST_ID)}),
            json!({"mute_track": "t", "request_id": s(MAX_REQUEST_ID + 1)}),
            "request_id",
            MAX_REQUEST_ID,
        ),
        (
            "custom event id",
            event(&s(MAX_CUSTOM_EVENT_ID)),
            event(&s(MAX_CUSTOM_EVENT_ID + 1)),
            "custom event id",
            MAX_CUSTOM_EVENT_ID,
        ),
        (
            "pending tid",
            pending(&s(MAX_TRACK_ID), "n", "0"),
            pending(&s(MAX_TRACK_ID + 1), "n", "0"),
            "track id",
            MAX_TRACK_ID,
        ),
        (
            "pending name",
            pending("t", &s(MAX_TRACK_NAME), "0"),
            pending("t", &s(MAX_TRACK_NAME + 1), "0"),
            "track name",
            MAX_TRACK_NAME,
        ),
        (
            "mid",
            pending("t", "n", &s(MAX_MID)),
            pending("t", "n", &s(MAX_MID + 1)),
            "mid",
            MAX_MID,
        ),
        (
            "offer",
            json!({"offer": s(MAX_SDP_BYTES)}),
            json!({"offer": s(MAX_SDP_BYTES + 1)}),
            "offer SDP",
            MAX_SDP_BYTES,
        ),
        (
            "candidate",
            json!({"candidate": {"candidate": {"candidate": s(MAX_CANDIDATE_BYTES)}, "type": 1, "sfu_id": "sfu-0"}}),
            json!({"candidate": {"candidate": {"candidate": s(MAX_CANDIDATE_BYTES + 1)}, "type": 1, "sfu_id": "sfu-0"}}),
            "candidate",
            MAX_CANDIDATE_BYTES,
        ),
        (
            "mute tid",
            json!({"mute_track": s(MAX_TRACK_ID)}),
            json!({"unmute_track": s(MAX_TRACK_ID + 1)}),
            "track id",
            MAX_TRACK_ID,
        ),
        (
            "subscribed tid",
            subscribe(1, 1, MAX_TRACK_ID),
            subscribe(1, 1, MAX_TRACK_ID + 1),
            "track id",
            MAX_TRACK_ID,
        ),
    ];
    for (name, at, past, what, max) in cases {
        decode(at).unwrap_or_else(|e| panic!("{name} at its cap: {e}"));
        let e = decode(past).expect_err(name);
        assert_eq!(e, DecodeError::TooLong { what, max }, "{name}");
        assert!(e.to_string().contains(&max.to_string()), "{name}: {e}");
    }
}

#[test]
fn subscription_lists_are_capped_in_entries() {
    decode(subscribe(
        MAX_SUBSCRIBE_CONNECTIONS,
        MAX_SUBSCRIBE_TRACKS,
        8,
    ))
    .expect("at the caps");
    assert_eq!(
        decode(subscribe(MAX_SUBSCRIBE_CONNECTIONS + 1, 1, 8)).unwrap_err(),
        DecodeError::TooMany {
            what: "connections",
            max: MAX_SUBSCRIBE_CONNECTIONS
        }
    );
    assert_eq!(
        decode(subscribe(1, MAX_SUBSCRIBE_TRACKS + 1, 8)).unwrap_err(),
        DecodeError::TooMany {
            what: "track_ids",
            max: MAX_SUBSCRIBE_TRACKS
        }
    );
}
