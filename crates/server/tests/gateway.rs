//! The join gateway end to end: a real server on port 0, real WebSockets, the native
//! client speaking the browser SDK's protocol.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fx, TestServer, data};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use spacegate_auth::{PrivateKey, SignOptions, sign, sign_raw};
use spacegate_client::{ClientError, JoinOptions, Session, join_url};
use spacegate_proto::Role;
use spacegate_proto::signaling::{
    ClientMessage, MAX_FRAME_BYTES, PendingTrack, ServerMessage, TrackKind,
};
use spacegate_server::gateway::GatewayConfig;
use spacegate_signaling::SpaceConfig;
use tokio_tungstenite::tungstenite::Message;

impl Fx {
    async fn join(&self, participant: &str) -> Session {
        self.join_with(
            &self.token(Some(participant), Role::Publisher),
            JoinOptions::default(),
        )
        .await
        .expect("join")
    }

    async fn join_with(&self, token: &str, options: JoinOptions) -> Result<Session, ClientError> {
        Session::join(&self.s.ws_base(), token, &options).await
    }

    async fn space_json(&self) -> Value {
        data(
            self.s
                .req(Method::GET, &format!("/video/v1/spaces/{}", self.space))
                .send()
                .await
                .expect("get"),
        )
        .await
    }

    async fn wait_status(&self, status: &str) -> Value {
        for _ in 0..200 {
            let v = self.space_json().await;
            if v["status"] == status {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("space never became {status}");
    }
}

fn refused(r: Result<Session, ClientError>) -> (u8, String, Option<u16>) {
    match r {
        Err(ClientError::Rejected { error, close_code }) => {
            assert!(
                error.fatal && !error.retry,
                "join refusals are fatal, not retryable"
            );
            (error.kind, error.message, close_code)
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, joined"),
    }
}

async fn next_message(s: &mut Session) -> ServerMessage {
    s.next().await.expect("message").message
}

#[tokio::test]
async fn join_fan_out_leave_and_space_status() {
    let fx = Fx::new().await;
    let mut alice = fx
        .join_with(
            &fx.token(Some("alice"), Role::Publisher),
            JoinOptions {
                display_name: Some("Alice A".into()),
                ..Default::default()
            },
        )
        .await
        .expect("alice joins");
    let j = alice.joined().clone();
    assert_eq!(j.participant_id, "alice");
    assert_eq!(j.display_name, "Alice A", "the URL's display_name, decoded");
    assert!(j.participants.is_empty());
    assert_eq!(j.sub_sfus.len(), 1, "publishers need one sub SFU");
    assert!(j.sub_sfus[0].sdp.starts_with("v=0\r\n"));
    assert_eq!(j.watchrtc_token, "");
    let active = fx.wait_status("active").await;
    assert_eq!(active["active_session_id"], j.session_id.as_str());
    let res =
        fx.s.req(Method::DELETE, &format!("/video/v1/spaces/{}", fx.space))
            .send()
            .await
            .expect("delete");
    assert_eq!(res.status(), 409, "an active space cannot be deleted");

    let bob = fx.join("bob").await;
    assert_eq!(bob.joined().session_id, j.session_id);
    assert_eq!(bob.joined().participants.len(), 1);
    assert_eq!(bob.joined().participants[0].display_name, "Alice A");
    assert_ne!(bob.joined().connection_id, j.connection_id);
    let ServerMessage::ParticipantConnected(p) = next_message(&mut alice).await else {
        panic!("connected")
    };
    assert_eq!(p.participant_id, "bob");
    assert_eq!(p.connection_id, bob.joined().connection_id);

    let bob_conn = bob.joined().connection_id.clone();
    bob.leave().await;
    let ServerMessage::ParticipantDisconnected(d) = next_message(&mut alice).await else {
        panic!("disconnected")
    };
    assert_eq!(d.connection_id, bob_conn);
    alice.leave().await;
    let idle = fx.wait_status("idle").await;
    assert!(idle.get("active_session_id").is_none());
    let res =
        fx.s.req(Method::DELETE, &format!("/video/v1/spaces/{}", fx.space))
            .send()
            .await
            .expect("delete");
    assert_eq!(res.status(), 204, "idle again, so deletable");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_sdk_error_and_close_4000() {
    let fx = Fx::new().await;
    let other_space = fx.s.create_space(json!({})).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let staging = fx.s.token("staging", "read,write").await;
    let res =
        fx.s.req_as(&staging, Method::POST, "/system/v1/signing-keys")
            .send()
            .await
            .expect("key");
    let staging_key = data(res).await;
    let staging_token = sign(
        &PrivateKey::parse(staging_key["private_key"].as_str().expect("pk")).expect("pk"),
        &SignOptions {
            key_id: staging_key["id"]
                .as_str()
                .expect("kid")
                .parse()
                .expect("kid"),
            space_id: fx.space.parse().expect("space"),
            expires_at: 4_000_000_000,
            role: Role::Publisher,
            participant_id: None,
        },
    )
    .expect("sign");
    let no_aud = sign_raw(
        &fx.key,
        &json!({"alg": "RS256", "kid": fx.kid}).to_string(),
        &json!({"sub": fx.space, "exp": 4_000_000_000u64}).to_string(),
    )
    .expect("sign");

    let cases: Vec<(&str, String, &str)> = vec![
        ("empty token", String::new(), "missing token"),
        ("garbage", "not.a.jwt".into(), "invalid token"),
        (
            "expired",
            fx.token_for(&fx.space, None, Role::Publisher, -3600),
            "expired",
        ),
        ("no audience", no_aud, "aud"),
        (
            "space does not exist",
            fx.token_for("NoSuchSpace", None, Role::Publisher, 3600),
            "space",
        ),
        ("key of another environment", staging_token, "environment"),
    ];
    for (what, token, needle) in &cases {
        let (kind, message, close) = refused(fx.join_with(token, JoinOptions::default()).await);
        assert_eq!(kind, 6, "{what}: InvalidJWT");
        assert!(message.contains(needle), "{what}: {message}");
        assert_eq!(close, Some(4000), "{what}");
    }
    let _ = other_space;
    // A deleted key stops working at once.
    let token = fx.token(Some("alice"), Role::Publisher);
    fx.join_with(&token, JoinOptions::default())
        .await
        .expect("valid")
        .leave()
        .await;
    let res =
        fx.s.req(
            Method::DELETE,
            &format!("/system/v1/signing-keys/{}", fx.kid),
        )
        .send()
        .await
        .expect("delete");
    assert_eq!(res.status(), 204);
    let (kind, message, _) = refused(fx.join_with(&token, JoinOptions::default()).await);
    assert_eq!(kind, 6);
    assert!(message.contains("unknown or deleted"), "{message}");
    // Bad query parameters are refused in-protocol too.
    let fx = Fx::new().await;
    let token = fx.token(None, Role::Publisher);
    let (kind, _, _) = refused(
        fx.join_with(
            &token,
            JoinOptions {
                display_name: Some("x".repeat(65)),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(kind, 6);
    let (kind, _, _) = refused(
        fx.join_with(
            &token,
            JoinOptions {
                managed_subscriptions: 21,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(kind, 6);
}

#[tokio::test]
async fn duplicate_participants_are_rejected_and_generated_ids_are_fresh() {
    let fx = Fx::new().await;
    let alice = fx.join("alice").await;
    let (kind, message, close) = refused(
        fx.join_with(
            &fx.token(Some("alice"), Role::Publisher),
            JoinOptions::default(),
        )
        .await,
    );
    assert_eq!((kind, close), (3, Some(4000)), "{message}");
    alice.leave().await;
    // Once alice has gone, her id is free again (the leave is processed asynchronously).
    let mut again = None;
    for _ in 0..100 {
        match fx
            .join_with(
                &fx.token(Some("alice"), Role::Publisher),
                JoinOptions::default(),
            )
            .await
        {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(again.is_some(), "alice can rejoin after leaving");

    // A token without participant_id can join many times, each a new participant.
    let anon = fx.token(None, Role::Subscriber);
    let a = fx
        .join_with(&anon, JoinOptions::default())
        .await
        .expect("first");
    let b = fx
        .join_with(&anon, JoinOptions::default())
        .await
        .expect("second");
    assert_ne!(a.joined().participant_id, b.joined().participant_id);
    assert_ne!(a.joined().connection_id, b.joined().connection_id);
    assert_eq!(a.joined().participant_id.len(), 32);
}

#[tokio::test]
async fn simultaneous_joins_with_one_participant_id_admit_exactly_one() {
    let fx = Arc::new(Fx::new().await);
    let token = Arc::new(fx.token(Some("same"), Role::Publisher));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (fx, token) = (fx.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            fx.join_with(&token, JoinOptions::default()).await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(s) => winners.push(s),
            Err(ClientError::Rejected { error, .. }) => assert_eq!(error.kind, 3),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1);
}

#[tokio::test]
async fn reconnect_replaces_the_stale_connection() {
    let fx = Fx::new().await;
    let mut bob = fx.join("bob").await;
    let mut alice = fx.join("alice").await;
    let ServerMessage::ParticipantConnected(_) = next_message(&mut bob).await else {
        panic!()
    };
    let old_conn = alice.joined().connection_id.clone();
    // The SDK reconnects with the same token and reconnect_id = its participant id.
    let options = JoinOptions {
        reconnect_id: Some("alice".into()),
        reconnect_attempt: Some(1),
        ..Default::default()
    };
    let alice2 = fx
        .join_with(&fx.token(Some("alice"), Role::Publisher), options)
        .await
        .expect("reconnect");
    assert_ne!(alice2.joined().connection_id, old_conn);
    assert_eq!(alice2.joined().participant_id, "alice");
    assert_eq!(
        alice.closed().await.expect("old socket closed"),
        Some(4000),
        "the ghost is told to stay away"
    );
    let ServerMessage::ParticipantDisconnected(d) = next_message(&mut bob).await else {
        panic!("disconnected")
    };
    assert_eq!(d.connection_id, old_conn);
    let ServerMessage::ParticipantConnected(p) = next_message(&mut bob).await else {
        panic!("connected")
    };
    assert_eq!(
        p.status,
        spacegate_proto::signaling::ParticipantStatus::Reconnected
    );
    assert_eq!(p.connection_id, alice2.joined().connection_id);

    // reconnect_id naming someone else than the token's participant is refused.
    let options = JoinOptions {
        reconnect_id: Some("bob".into()),
        reconnect_attempt: Some(1),
        ..Default::default()
    };
    let (kind, message, _) = refused(
        fx.join_with(&fx.token(Some("alice"), Role::Publisher), options)
            .await,
    );
    assert_eq!(kind, 6, "{message}");
    assert!(
        bob.next_within(Duration::from_millis(100))
            .await
            .expect("read")
            .is_none(),
        "bob untouched"
    );

    // A server-made id can only be taken over with the token it was made for.
    let anon = fx.token(None, Role::Publisher);
    let first = fx
        .join_with(&anon, JoinOptions::default())
        .await
        .expect("anon");
    let id = first.joined().participant_id.clone();
    // (A different token: same claims in the same second would sign to the same bytes.)
    let thief = fx.token_for(&fx.space, None, Role::Subscriber, 7200);
    let options = JoinOptions {
        reconnect_id: Some(id.clone()),
        reconnect_attempt: Some(1),
        ..Default::default()
    };
    let (kind, _, _) = refused(fx.join_with(&thief, options.clone()).await);
    assert_eq!(kind, 3, "another token cannot hijack a generated id");
    let back = fx
        .join_with(&anon, options)
        .await
        .expect("the owner reconnects");
    assert_eq!(back.joined().participant_id, id);
}

#[tokio::test]
async fn a_reconnect_id_resumes_only_an_identity_its_token_held() {
    let fx = Fx::new().await;
    let reconnect = |id: &str| JoinOptions {
        reconnect_id: Some(id.into()),
        reconnect_attempt: Some(1),
        ..Default::default()
    };
    // A shared, anonymous viewer token naming "host" as its reconnect_id while the host is
    // away: joined, but as a newcomer with an id of its own, not as the host.
    let viewer = fx.token(None, Role::Subscriber);
    let intruder = fx
        .join_with(&viewer, reconnect("host"))
        .await
        .expect("joined as a newcomer");
    let intruder_id = intruder.joined().participant_id.clone();
    assert_ne!(intruder_id, "host");
    assert_eq!(intruder_id.len(), 32, "a generated id");
    // So the real host still gets in with its own token, and sees the intruder under its
    // generated id.
    let host = fx.join("host").await;
    assert_eq!(host.joined().participant_id, "host");
    assert!(
        host.joined()
            .participants
            .iter()
            .any(|p| p.participant_id == intruder_id)
    );
    // While the host is here, the anonymous token cannot take it over either.
    let (kind, message, close) = refused(fx.join_with(&viewer, reconnect("host")).await);
    assert_eq!((kind, close), (3, Some(4000)), "{message}");
    // Nor once the host has left: its departure was recorded for its own credential.
    host.leave().await;
    let again = fx
        .join_with(&viewer, reconnect("host"))
        .await
        .expect("joined as a newcomer");
    assert_ne!(again.joined().participant_id, "host");

    // The path the SDK takes: an anonymous participant that dropped comes back with its
    // token and its id, and resumes that id.
    let own = fx.token(None, Role::Publisher);
    let first = fx
        .join_with(&own, JoinOptions::default())
        .await
        .expect("join");
    let id = first.joined().participant_id.clone();
    first.leave().await;
    let back = fx.join_with(&own, reconnect(&id)).await.expect("resume");
    assert_eq!(back.joined().participant_id, id);
}

#[tokio::test]
async fn space_capacity_is_enforced() {
    let fx = Fx::with(GatewayConfig {
        max_participants: 2,
        ..Default::default()
    })
    .await;
    let _a = fx.join("a").await;
    let _b = fx.join("b").await;
    let (kind, message, close) = refused(
        fx.join_with(
            &fx.token(Some("c"), Role::Publisher),
            JoinOptions::default(),
        )
        .await,
    );
    assert_eq!((kind, close), (7, Some(4000)), "{message}");
    assert!(message.contains("full"));
}

#[tokio::test]
async fn display_names_custom_events_and_roles() {
    let fx = Fx::new().await;
    let mut alice = fx.join("alice").await;
    let mut viewer = fx
        .join_with(
            &fx.token(Some("viewer"), Role::Subscriber),
            JoinOptions::default(),
        )
        .await
        .expect("viewer");
    let ServerMessage::ParticipantConnected(p) = next_message(&mut alice).await else {
        panic!()
    };
    assert_eq!(
        p.role,
        spacegate_proto::signaling::ParticipantRole::Subscriber
    );

    let update = alice
        .set_display_name("Alice 2", "req-1")
        .await
        .expect("set name");
    assert_eq!(update.display_name, "Alice 2");
    let ServerMessage::ParticipantUpdate(u) = next_message(&mut viewer).await else {
        panic!("update")
    };
    assert_eq!(u.connection_id, alice.joined().connection_id);
    match alice.set_display_name("", "req-2").await {
        Err(ClientError::Request(e)) => assert_eq!(e.kind, 7),
        other => panic!("expected error 7, got {other:?}"),
    }

    let event = alice
        .publish_custom_event("ev-1", "hello")
        .await
        .expect("custom event");
    assert_eq!(
        (event.payload.as_str(), event.connection_id.as_str()),
        ("hello", alice.joined().connection_id.as_str())
    );
    let ServerMessage::CustomEvent(seen) = next_message(&mut viewer).await else {
        panic!("event")
    };
    assert_eq!(seen, event);
    match viewer.publish_custom_event("ev-2", "nope").await {
        Err(ClientError::Request(e)) => assert_eq!(e.kind, 5),
        other => panic!("expected error 5, got {other:?}"),
    }
    // A subscriber cannot publish tracks.
    let pending = PendingTrack {
        tid: "t1".into(),
        kind: TrackKind::Video,
        name: "cam".into(),
        muted: false,
        source: "camera".into(),
        height: 720,
        width: 1280,
        mid: "0".into(),
    };
    viewer
        .send(ClientMessage::PendingTrack(pending), None)
        .await
        .expect("send");
    let ServerMessage::Error(e) = next_message(&mut viewer).await else {
        panic!("error")
    };
    assert_eq!((e.kind, e.fatal), (1, false));
    assert!(
        alice
            .next_within(Duration::from_millis(100))
            .await
            .expect("read")
            .is_none(),
        "nothing leaked to alice"
    );
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_survives() {
    let fx = Fx::new().await;
    let mut alice = fx.join("alice").await;
    for frame in [
        Message::Text("not json".into()),
        Message::Text(r#"{"join":{}}"#.into()),
        Message::Text(r#"{"mute_track":"a","unmute_track":"b"}"#.into()),
        Message::Text(r#"{"set_display_name":42}"#.into()),
        Message::Binary(vec![1, 2, 3].into()),
    ] {
        alice.send_raw(frame.clone()).await.expect("send");
        let ServerMessage::Error(e) = next_message(&mut alice).await else {
            panic!("error for {frame:?}")
        };
        assert!(!e.fatal, "{frame:?}: {}", e.message);
    }
    alice
        .set_display_name("still here", "r")
        .await
        .expect("connection still works");
}

#[tokio::test]
async fn oversized_strings_are_refused_and_never_fanned_out() {
    let fx = Fx::new().await;
    let mut alice = fx.join("alice").await;
    let mut bob = fx.join("bob").await;
    let ServerMessage::ParticipantConnected(_) = next_message(&mut alice).await else {
        panic!("bob connected")
    };
    // A custom event whose id is 100 KiB (the frame itself is within the frame cap), and
    // one with a 100 KiB request_id: each is refused with its cap named, and bob gets
    // nothing.
    let huge = "x".repeat(100 * 1024);
    for (frame, cap) in [
        (
            json!({"custom_event": {"id": huge, "payload": "hi", "scope": 1}}),
            "128",
        ),
        (
            json!({"custom_event": {"id": "e1", "payload": "hi", "scope": 1}, "request_id": huge}),
            "128",
        ),
    ] {
        alice
            .send_raw(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
        let ServerMessage::Error(e) = next_message(&mut alice).await else {
            panic!("an error")
        };
        assert!(!e.fatal && e.message.contains(cap), "{}", e.message);
    }
    assert!(
        bob.next_within(Duration::from_millis(200))
            .await
            .expect("read")
            .is_none(),
        "nothing reached bob"
    );
}

#[tokio::test]
async fn oversized_frames_and_floods_end_the_connection() {
    let fx = Fx::new().await;
    let mut big = fx.join("big").await;
    big.send_raw(Message::Text(
        format!(r#"{{"offer":"{}"}}"#, "a".repeat(MAX_FRAME_BYTES + 1024)).into(),
    ))
    .await
    .expect("send");
    let _ = big.closed().await;
    // Its participant id is free again.
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(s) = fx
            .join_with(
                &fx.token(Some("big"), Role::Publisher),
                JoinOptions::default(),
            )
            .await
        {
            s.leave().await;
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        ok,
        "an oversized frame ends the connection and frees the participant"
    );

    let mut flood = fx.join("flood").await;
    for i in 0..500 {
        if flood
            .send_raw(Message::Text(format!(r#"{{"mute_track":"t{i}"}}"#).into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut fatal = false;
    loop {
        match flood.next().await {
            Ok(m) => {
                if let ServerMessage::Error(e) = m.message
                    && e.fatal
                {
                    fatal = true;
                }
            }
            Err(ClientError::Closed { code }) => {
                assert_eq!(code, Some(4000));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(fatal, "the flooder is told why before the close");
}

#[tokio::test]
async fn messages_before_joined_are_refused() {
    let fx = Fx::new().await;
    let url = join_url(
        &fx.s.ws_base(),
        &fx.token(Some("eager"), Role::Publisher),
        &JoinOptions::default(),
    );
    // The server answers the upgrade only with `joined`, so a client that sends first
    // pipelines its frame behind its request: a raw socket does exactly that.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("ws://").expect("ws url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut tcp = tokio::net::TcpStream::connect(host).await.expect("connect");
    let payload = br#"{"set_display_name":"early"}"#;
    let mut bytes = format!(
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    // A masked text frame (mask key 0 leaves the payload as it is).
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0]);
    bytes.extend_from_slice(payload);
    tcp.write_all(&bytes).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("response head"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tcp,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let Some(Ok(Message::Text(first))) = ws.next().await else {
        panic!("a frame")
    };
    let v: Value = serde_json::from_str(&first).expect("json");
    assert!(v.get("error").is_some(), "{first}");
    let Some(Ok(Message::Close(Some(frame)))) = ws.next().await else {
        panic!("close")
    };
    assert_eq!(u16::from(frame.code), 4000);
}

#[tokio::test]
async fn silent_clients_are_evicted_and_their_id_freed() {
    let config = GatewayConfig {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let fx = Fx::with(config).await;
    let mut watcher = fx.join("watcher").await;
    // Never read again: no pongs go back, like a peer whose network vanished.
    let silent = fx.join("silent").await;
    let ServerMessage::ParticipantConnected(p) = next_message(&mut watcher).await else {
        panic!()
    };
    let ServerMessage::ParticipantDisconnected(d) = next_message(&mut watcher).await else {
        panic!("evicted")
    };
    assert_eq!(d.connection_id, p.connection_id);
    fx.join_with(
        &fx.token(Some("silent"), Role::Publisher),
        JoinOptions::default(),
    )
    .await
    .expect("id is free again");
    drop(silent);
}

#[tokio::test]
async fn slow_readers_are_cut_off_without_slowing_others() {
    let config = GatewayConfig {
        outbound_queue: 8,
        inbound_per_second: 100_000,
        space: Arc::new(SpaceConfig {
            limits: spacegate_proto::signaling::Limits {
                custom_events_per_second: 100_000,
                default_track_limit: 1,
                seconds_per_set_display_name: 1,
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let fx = Fx::with(config).await;
    let mut talker = fx.join("talker").await;
    let slow = fx.join("slow").await; // never reads
    let ServerMessage::ParticipantConnected(p) = next_message(&mut talker).await else {
        panic!()
    };
    let payload = "x".repeat(4000);
    let mut cut_off = false;
    for i in 0..5_000 {
        let echo = talker
            .publish_custom_event(&format!("e{i}"), &payload)
            .await
            .expect("the talker is never slowed");
        assert_eq!(echo.payload.len(), 4000);
        while let Some(m) = talker.next_within(Duration::ZERO).await.expect("read") {
            if let ServerMessage::ParticipantDisconnected(d) = m.message {
                assert_eq!(d.connection_id, p.connection_id);
                cut_off = true;
            }
        }
        if cut_off {
            break;
        }
    }
    assert!(cut_off, "the slow reader was disconnected");
    drop(slow);
}

#[tokio::test]
async fn shutdown_drains_clients_with_a_reconnect_code() {
    let mut fx = Fx::new().await;
    let mut alice = fx.join("alice").await;
    fx.s.shutdown().await;
    assert_eq!(
        alice.closed().await.expect("closed"),
        Some(1012),
        "told to reconnect, not cut"
    );
}

#[tokio::test]
async fn tokens_from_every_real_signer_join_over_the_websocket() {
    let s = TestServer::start().await;
    let f: Value = serde_json::from_str(include_str!("../../auth/tests/fixtures/real-tokens.json"))
        .expect("fixtures");
    // The fixtures' key and space, registered as if created through the API.
    let env = s
        .state
        .store
        .ensure_environment(&"unused".parse().expect("id"), "default", 0)
        .await
        .expect("default environment");
    let public = spacegate_auth::PublicKey::from_pem(f["public_key_pem"].as_str().expect("pem"))
        .expect("key");
    s.state
        .store
        .insert_signing_key(&spacegate_store::SigningKeyRecord {
            id: f["key_id"].as_str().expect("kid").parse().expect("kid"),
            environment_id: env.id.clone(),
            public_key_der: public.der().to_vec(),
            created_at: 0,
        })
        .await
        .expect("key");
    s.state
        .store
        .insert_space(&spacegate_store::SpaceRecord {
            id: f["space_id"]
                .as_str()
                .expect("space")
                .parse()
                .expect("space"),
            environment_id: env.id,
            passthrough: None,
            status: spacegate_store::SpaceStatus::Idle,
            active_session_id: None,
            created_at: 0,
        })
        .await
        .expect("space");
    let mut sessions = Vec::new();
    for t in f["tokens"].as_array().expect("tokens") {
        let signer = t["signer"].as_str().expect("signer");
        let session = Session::join(
            &s.ws_base(),
            t["token"].as_str().expect("token"),
            &JoinOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{signer}: {e}"));
        match t["participant_id"].as_str() {
            Some(p) => assert_eq!(session.joined().participant_id, p, "{signer}"),
            None => assert_eq!(
                session.joined().participant_id.len(),
                32,
                "{signer}: generated id"
            ),
        }
        // Everyone joined before is listed, with the role the token gave them.
        assert_eq!(
            session.joined().participants.len(),
            sessions.len(),
            "{signer}"
        );
        sessions.push((t["role"].as_str().expect("role").to_string(), session));
    }
    let last = &sessions.last().expect("sessions").1;
    for (p, (role, _)) in last.joined().participants.iter().zip(&sessions) {
        let expected = if role == "subscriber" {
            spacegate_proto::signaling::ParticipantRole::Subscriber
        } else {
            spacegate_proto::signaling::ParticipantRole::Publisher
        };
        assert_eq!(p.role, expected, "{}", p.participant_id);
    }
    assert!(sessions.len() >= 5);
}

#[tokio::test]
async fn a_deleted_space_refuses_joins_at_once() {
    let fx = Fx::new().await;
    fx.join("alice").await.leave().await;
    fx.wait_status("idle").await;
    let res =
        fx.s.req(Method::DELETE, &format!("/video/v1/spaces/{}", fx.space))
            .send()
            .await
            .expect("delete");
    assert_eq!(res.status(), 204);
    let (kind, message, _) = refused(
        fx.join_with(
            &fx.token(Some("alice"), Role::Publisher),
            JoinOptions::default(),
        )
        .await,
    );
    assert_eq!(kind, 6);
    assert!(message.contains("space"), "{message}");
}

#[tokio::test]
async fn a_space_with_participants_cannot_be_deleted_even_before_the_store_knows() {
    let fx = Fx::new().await;
    let alice = fx.join("alice").await;
    // No waiting for the store's status: the gateway's own view refuses the delete.
    let res =
        fx.s.req(Method::DELETE, &format!("/video/v1/spaces/{}", fx.space))
            .send()
            .await
            .expect("delete");
    assert_eq!(res.status(), 409);
    let other = fx.s.token("staging", "read,write").await;
    let res =
        fx.s.req_as(
            &other,
            Method::DELETE,
            &format!("/video/v1/spaces/{}", fx.space),
        )
        .send()
        .await
        .expect("delete");
    assert_eq!(res.status(), 404, "another environment learns nothing");
    alice.leave().await;
    fx.wait_status("idle").await;
    let res =
        fx.s.req(Method::DELETE, &format!("/video/v1/spaces/{}", fx.space))
            .send()
            .await
            .expect("delete");
    assert_eq!(res.status(), 204);
}

#[tokio::test]
async fn a_delete_and_a_join_never_both_succeed() {
    let fx = Fx::new().await;
    let gw = &fx.s.state.gateway;
    let space: spacegate_proto::SpaceId = fx.space.parse().expect("space id");
    // A delete under way (between its check and the store's delete): a join that already
    // passed the token check is refused at the registry, and leaves no claim behind.
    let claim = gw.begin_delete(&space).await.expect("nobody here");
    let (kind, message, _) = refused(
        fx.join_with(
            &fx.token(Some("late"), Role::Publisher),
            JoinOptions::default(),
        )
        .await,
    );
    assert_eq!(kind, 6, "{message}");
    assert!(message.contains("being deleted"), "{message}");
    drop(claim);
    // The delete gave up (say the store failed): the same participant joins.
    let late = fx.join("late").await;
    // And with someone in the space (or joining: a registry claim), a delete is refused.
    assert!(gw.begin_delete(&space).await.is_err());
    late.leave().await;
    for _ in 0..200 {
        if gw.begin_delete(&space).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the space never became deletable after everyone left");
}

#[tokio::test]
async fn a_connection_whose_task_panics_frees_everything_it_held() {
    let fx = Fx::new().await;
    let mut bob = fx.join("bob").await;
    let alice = fx.join("alice").await;
    let ServerMessage::ParticipantConnected(_) = next_message(&mut bob).await else {
        panic!("alice connected")
    };
    let conn: spacegate_proto::ConnectionId =
        alice.joined().connection_id.parse().expect("connection id");
    fx.s.state.gateway.panic_connection_for_tests(&conn);
    // The others hear the leave, and the id is free again: a fresh join (not a reconnect)
    // of alice is admitted.
    let ServerMessage::ParticipantDisconnected(d) = next_message(&mut bob).await else {
        panic!("alice left")
    };
    assert_eq!(d.connection_id, conn.as_str());
    let mut again = None;
    for _ in 0..200 {
        match fx
            .join_with(
                &fx.token(Some("alice"), Role::Publisher),
                JoinOptions::default(),
            )
            .await
        {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(again.is_some(), "alice's id was freed");
    assert_eq!(
        fx.s.state.gateway.connection_count(),
        2,
        "bob and the new alice"
    );
    drop(alice);
}

#[tokio::test]
async fn reconnects_may_use_a_recently_expired_token() {
    let fx = Fx::with(GatewayConfig {
        leeway_secs: 0,
        ..Default::default()
    })
    .await;
    let reconnect = |id: &str| JoinOptions {
        reconnect_id: Some(id.into()),
        reconnect_attempt: Some(1),
        ..Default::default()
    };

    // A participant named in the token, still registered (the server has not noticed its
    // drop): the SDK's reconnect with a token that expired a minute ago gets back in.
    let _alice = fx.join("alice").await;
    let expired_alice = fx.token_for(&fx.space, Some("alice"), Role::Publisher, -60);
    let (kind, message, _) = refused(fx.join_with(&expired_alice, JoinOptions::default()).await);
    assert_eq!(kind, 6);
    assert!(
        message.contains("expired"),
        "a fresh join with it is refused: {message}"
    );
    let back = fx
        .join_with(&expired_alice, reconnect("alice"))
        .await
        .expect("reconnect within the grace");
    assert_eq!(back.joined().participant_id, "alice");

    // Someone who was never here cannot use an expired token, reconnect_id or not.
    let expired_zed = fx.token_for(&fx.space, Some("zed"), Role::Publisher, -60);
    let (kind, _, _) = refused(fx.join_with(&expired_zed, reconnect("zed")).await);
    assert_eq!(kind, 6);
    // Nor anyone past the grace period (5 minutes).
    let stale = fx.token_for(&fx.space, Some("alice"), Role::Publisher, -400);
    let (kind, _, _) = refused(fx.join_with(&stale, reconnect("alice")).await);
    assert_eq!(kind, 6);

    // A server-made participant that left, coming back with the very token it joined with
    // after that token expired.
    let anon_token = fx.token_for(&fx.space, None, Role::Publisher, 1);
    let anon = fx
        .join_with(&anon_token, JoinOptions::default())
        .await
        .expect("valid now");
    let anon_id = anon.joined().participant_id.clone();
    anon.leave().await;
    fx.s.state.gateway.config.clock.advance(2); // past the token's one-second life
    let (kind, _, _) = refused(fx.join_with(&anon_token, JoinOptions::default()).await);
    assert_eq!(kind, 6, "expired for a fresh join");
    let again = fx
        .join_with(&anon_token, reconnect(&anon_id))
        .await
        .expect("recently departed");
    assert_eq!(again.joined().participant_id, anon_id);
}
