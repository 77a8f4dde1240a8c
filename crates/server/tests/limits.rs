//! The node's admission limits: connections, joins per source address, request-head
//! timeouts (slowloris) and unknown signing keys, each refused with something a client can
//! act on and none of them touching who is already connected.

mod common;

use std::time::Duration;

use common::Fx;
use futures_util::StreamExt;
use serde_json::json;
use spacegate_auth::sign_raw;
use spacegate_client::{ClientError, JoinOptions, Session, join_url};
use spacegate_proto::Role;
use spacegate_proto::signaling::{Envelope, ServerMessage};
use spacegate_server::gateway::GatewayConfig;
use spacegate_session::Registry as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The SDK's error type and message of a refused join.
fn refused(r: Result<Session, ClientError>) -> (u8, String) {
    match r {
        Err(ClientError::Rejected { error, .. }) => (error.kind, error.message),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, joined"),
    }
}

impl Fx {
    async fn try_join(&self, participant: &str) -> Result<Session, ClientError> {
        Session::join(
            &self.s.ws_base(),
            &self.token(Some(participant), Role::Publisher),
            &JoinOptions::default(),
        )
        .await
    }

    /// A join with an `X-Forwarded-For` header: the first frame's error type, or 0 for
    /// `joined`.
    async fn join_forwarded_for(&self, participant: &str, forwarded: &str) -> u8 {
        let url = join_url(
            &self.s.ws_base(),
            &self.token(Some(participant), Role::Publisher),
            &JoinOptions::default(),
        );
        let mut request = url.into_client_request().expect("request");
        request
            .headers_mut()
            .insert("x-forwarded-for", forwarded.parse().expect("header"));
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("no first frame")
        };
        match Envelope::<ServerMessage>::decode_server(&text)
            .expect("frame")
            .message
        {
            ServerMessage::Joined(_) => 0,
            ServerMessage::Error(e) => e.kind,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_connection_limit_refuses_with_try_again_and_frees_on_leave() {
    let fx = Fx::with(GatewayConfig {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let a = fx.try_join("a").await.expect("a");
    let mut b = fx.try_join("b").await.expect("b");
    let (kind, message) = refused(fx.try_join("c").await);
    assert_eq!(kind, 7, "{message}");
    assert!(message.contains("try again"), "{message}");
    // Those already in keep everything: b still hears a's leave.
    a.leave().await;
    let left = tokio::time::timeout(Duration::from_secs(5), b.next())
        .await
        .expect("b hears")
        .expect("frame");
    assert!(matches!(
        left.message,
        ServerMessage::ParticipantDisconnected(_)
    ));
    // The slot is free again (the refused join did not keep one either).
    let mut joined = None;
    for _ in 0..100 {
        match fx.try_join("c").await {
            Ok(s) => {
                joined = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(joined.is_some(), "a slot came free");
}

#[tokio::test]
async fn joins_per_source_address_are_rate_limited() {
    let fx = Fx::with(GatewayConfig {
        join_rate_per_ip: 1,
        join_burst_per_ip: 3,
        ..Default::default()
    })
    .await;
    let mut held = Vec::new();
    for p in ["a", "b", "c"] {
        held.push(fx.try_join(p).await.expect("within the burst"));
    }
    let (kind, message) = refused(fx.try_join("d").await);
    assert_eq!(kind, 7, "{message}");
    assert!(message.contains("too many joins"), "{message}");
    // Not behind a trusted proxy: X-Forwarded-For is the client's own claim, ignored.
    assert_eq!(fx.join_forwarded_for("e", "198.51.100.1").await, 7);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_source() {
    let fx = Fx::with(GatewayConfig {
        join_rate_per_ip: 1,
        join_burst_per_ip: 1,
        trust_forwarded_for: true,
        ..Default::default()
    })
    .await;
    // Two clients behind the proxy (same TCP peer), each with its own budget; the last
    // entry is the one the proxy appended, earlier ones are the client's claims.
    assert_eq!(fx.join_forwarded_for("a", "198.51.100.1").await, 0);
    assert_eq!(fx.join_forwarded_for("b", "198.51.100.2").await, 0);
    assert_eq!(
        fx.join_forwarded_for("c", "198.51.100.2, 198.51.100.1")
            .await,
        7,
        "198.51.100.1 has used its one join"
    );
    assert_eq!(
        fx.join_forwarded_for("d", "198.51.100.1, 198.51.100.3")
            .await,
        0
    );
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(mut tcp: tokio::net::TcpStream) -> Duration {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed a connection that never finished its request head");
    started.elapsed()
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let fx = Fx::with(GatewayConfig {
        head_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    // A join, an API request, and an API request on a connection that already served one
    // (hyper's keep-alive): each starts a head and never finishes it.
    for (name, first) in [
        (
            "join",
            "GET /v1?token=x HTTP/1.1\r\nHost: a\r\n".to_string(),
        ),
        (
            "api",
            "GET /video/v1/spaces HTTP/1.1\r\nHost: a\r\n".to_string(),
        ),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(fx.s.addr)
            .await
            .expect("connect");
        tcp.write_all(first.as_bytes()).await.expect("write");
        let took = closed_after(tcp).await;
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
    }
    let mut tcp = tokio::net::TcpStream::connect(fx.s.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\n")
        .await
        .expect("write");
    let took = closed_after(tcp).await;
    assert!(took < Duration::from_secs(5), "keep-alive: {took:?}");
}

#[tokio::test]
async fn unknown_key_ids_do_not_each_query_the_store() {
    let fx = Fx::new().await;
    let keys = &fx.s.state.keys;
    let forged = |kid: &str| {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string();
        let claims =
            json!({"sub": fx.space, "aud": "rt", "exp": spacegate_server::now_secs() + 600})
                .to_string();
        sign_raw(&fx.key, &header, &claims).expect("sign")
    };
    let join = |token: String| {
        let base = fx.s.ws_base();
        async move { Session::join(&base, &token, &JoinOptions::default()).await }
    };
    let before = keys.store_lookups();
    // The same unknown kid, again and again: one store query.
    let token = forged("no-such-key");
    for _ in 0..20 {
        let (kind, message) = refused(join(token.clone()).await);
        assert_eq!(kind, 6, "{message}");
    }
    assert_eq!(keys.store_lookups() - before, 1);
    // Random kids, each new: the store sees at most the lookup cap, the rest are told to
    // try again without a query.
    let before = keys.store_lookups();
    let mut try_again = 0;
    for i in 0..120 {
        let (kind, _) = refused(join(forged(&format!("random-{i}"))).await);
        assert!(kind == 6 || kind == 7, "{kind}");
        try_again += usize::from(kind == 7);
    }
    let queried = keys.store_lookups() - before;
    assert!(
        queried <= u64::from(spacegate_server::keys::KID_LOOKUPS_PER_SECOND) * 2,
        "{queried} store lookups for 120 random kids"
    );
    assert!(try_again > 0);
    // A real key keeps working meanwhile (cached, no lookup needed).
    fx.try_join("alice").await.expect("a real key still joins");
}

/// The real in-memory registry, whose claims stall after they are made while `stall` is
/// set: what a registry whose reply is lost or late (a Redis failover) looks like to the
/// gateway.
#[derive(Debug, Default)]
struct StallingRegistry {
    inner: spacegate_session::MemoryRegistry,
    stall: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl spacegate_session::Registry for StallingRegistry {
    async fn reserve(
        &self,
        r: spacegate_session::ReserveRequest<'_>,
    ) -> Result<spacegate_session::Reservation, spacegate_session::ReserveError> {
        let claimed = self.inner.reserve(r).await;
        if self.stall.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        claimed
    }

    async fn release(
        &self,
        space: &spacegate_proto::SpaceId,
        participant: &spacegate_proto::ParticipantId,
        connection: &spacegate_proto::ConnectionId,
    ) -> Result<bool, spacegate_session::ReserveError> {
        self.inner.release(space, participant, connection).await
    }

    async fn participants(
        &self,
        space: &spacegate_proto::SpaceId,
    ) -> Result<
        Vec<(
            spacegate_proto::ParticipantId,
            spacegate_proto::ConnectionId,
        )>,
        spacegate_session::ReserveError,
    > {
        self.inner.participants(space).await
    }

    async fn holder(
        &self,
        space: &spacegate_proto::SpaceId,
        participant: &spacegate_proto::ParticipantId,
    ) -> Result<Option<spacegate_proto::ConnectionId>, spacegate_session::ReserveError> {
        self.inner.holder(space, participant).await
    }

    async fn record_departure(
        &self,
        space: &spacegate_proto::SpaceId,
        participant: &spacegate_proto::ParticipantId,
        credential: &str,
        grace: Duration,
        now_ms: u64,
    ) -> Result<(), spacegate_session::ReserveError> {
        self.inner
            .record_departure(space, participant, credential, grace, now_ms)
            .await
    }

    async fn departed_recently(
        &self,
        space: &spacegate_proto::SpaceId,
        participant: &spacegate_proto::ParticipantId,
        credential: &str,
        now_ms: u64,
    ) -> Result<bool, spacegate_session::ReserveError> {
        self.inner
            .departed_recently(space, participant, credential, now_ms)
            .await
    }
}

#[tokio::test]
async fn an_admission_that_outlasts_its_timeout_is_told_to_try_again_and_leaves_no_claim() {
    let registry = std::sync::Arc::new(StallingRegistry::default());
    let fx = Fx::with_parts(
        GatewayConfig {
            admission_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        spacegate_store::SqliteOptions::default(),
        registry.clone(),
    )
    .await;
    registry
        .stall
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (kind, message) = refused(fx.try_join("alice").await);
    assert_eq!(kind, 7, "{message}");
    assert!(message.contains("try again"), "{message}");
    // The registry did make the claim before it stalled; the admission's guard released
    // it, so alice is not locked out once the registry answers again.
    registry
        .stall
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let space: spacegate_proto::SpaceId = fx.space.parse().expect("space id");
    let mut freed = false;
    for _ in 0..200 {
        if registry
            .inner
            .participants(&space)
            .await
            .expect("list")
            .is_empty()
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the stalled claim was released");
    fx.try_join("alice").await.expect("alice joins");
}
