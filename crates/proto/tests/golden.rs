//! Golden fixtures (`proto/fixtures/{client,server}/*.json`) of every message: each decodes
//! into our types and encodes back to the same JSON, and every message type has one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use spacegate_proto::signaling::{
    CLIENT_MESSAGE_TYPES, ClientMessage, DecodeError, Envelope, MAX_FRAME_BYTES,
    SERVER_MESSAGE_TYPES, ServerMessage,
};

fn fixtures(dir: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../proto/fixtures")
        .join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&root)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            (p, text)
        })
        .collect();
    out.sort();
    out
}

fn key(text: &str) -> String {
    let v: Value = serde_json::from_str(text).expect("json");
    v.as_object()
        .expect("object")
        .keys()
        .find(|k| *k != "request_id")
        .expect("payload key")
        .clone()
}

#[test]
fn client_fixtures_round_trip() {
    let mut seen = HashSet::new();
    for (path, text) in fixtures("client") {
        let env = Envelope::<ClientMessage>::decode_client(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let again: Value = serde_json::from_str(&env.to_json()).expect("json");
        let original: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(again, original, "{}", path.display());
        seen.insert(key(&text));
    }
    for t in CLIENT_MESSAGE_TYPES {
        assert!(seen.contains(*t), "no fixture for client message {t}");
    }
}

#[test]
fn server_fixtures_round_trip() {
    let mut seen = HashSet::new();
    for (path, text) in fixtures("server") {
        let env = Envelope::<ServerMessage>::decode_server(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let again: Value = serde_json::from_str(&env.to_json()).expect("json");
        let original: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(again, original, "{}", path.display());
        seen.insert(key(&text));
    }
    for t in SERVER_MESSAGE_TYPES {
        assert!(seen.contains(*t), "no fixture for server message {t}");
    }
}

#[test]
fn bad_frames_get_precise_errors() {
    let d = Envelope::<ClientMessage>::decode_client;
    assert!(matches!(d("not json"), Err(DecodeError::NotJson(_))));
    assert!(matches!(d("[1]"), Err(DecodeError::NotJson(_))));
    assert_eq!(d("{}"), Err(DecodeError::KeyCount(0)));
    assert_eq!(
        d(r#"{"mute_track":"a","unmute_track":"a"}"#),
        Err(DecodeError::KeyCount(2))
    );
    assert_eq!(
        d(r#"{"join":{}}"#),
        Err(DecodeError::UnknownType("join".into()))
    );
    // A server message type sent by a client is unknown to the server.
    assert_eq!(
        d(r#"{"joined":{}}"#),
        Err(DecodeError::UnknownType("joined".into()))
    );
    assert_eq!(
        d(r#"{"mute_track":"a","request_id":5}"#),
        Err(DecodeError::BadRequestId)
    );
    assert!(matches!(
        d(r#"{"mute_track":5}"#),
        Err(DecodeError::BadPayload { .. })
    ));
    assert!(matches!(
        d(
            r#"{"pending_track":{"tid":"a","type":3,"name":"x","muted":false,"source":"camera","height":0,"width":0,"mid":"0"}}"#
        ),
        Err(DecodeError::BadPayload { .. })
    ));
    let huge = format!(r#"{{"offer":"{}"}}"#, "a".repeat(MAX_FRAME_BYTES + 1024));
    assert_eq!(d(&huge), Err(DecodeError::TooLarge));
    // request_id is carried through.
    let env = d(r#"{"set_display_name":"Al","request_id":"r1"}"#).expect("valid");
    assert_eq!(env.request_id.as_deref(), Some("r1"));
    assert_eq!(env.message, ClientMessage::SetDisplayName("Al".into()));
    // Fractional sizes are accepted and kept as whole pixels.
    let env = d(r#"{"pending_track":{"tid":"a","type":2,"name":"x","muted":false,"source":"camera","height":719.6,"width":1280,"mid":"0"}}"#)
        .expect("valid");
    let ClientMessage::PendingTrack(p) = env.message else {
        panic!("pending_track")
    };
    assert_eq!((p.width, p.height), (1280, 719));
}
