//! Joins whose space lives on another node of the cluster: this node checked the token,
//! the space's home is elsewhere, so the client's WebSocket is carried to the home node's
//! `/v1` (its internal URL) message by message, close codes included. The home node does
//! the whole admission itself (it checks the token again and claims the participant in the
//! registry), and its join reply names its own media address, so the client's media goes
//! straight to the home node; only signaling passes through here.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::admission::JoinParams;
use super::ws::{Message, Ws};

/// Marks a join carried from another node: the receiver must host it or refuse it, never
/// carry it on (no loops between two nodes that disagree about a home for a moment).
pub(crate) const RELAYED_PARAM: &str = "relayed";

/// How long the home node may take to accept the carried WebSocket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The home node's join URL for this client's query.
pub(super) fn target(internal_url: &str, token: &str, p: &JoinParams) -> String {
    let mut url = format!(
        "{}/v1?{RELAYED_PARAM}=1&token={}",
        internal_url.trim_end_matches('/'),
        form_encode(token)
    );
    for (name, value) in [
        ("sdk_version", &p.sdk_version),
        ("managed_subscriptions", &p.managed_subscriptions),
        ("reconnect_id", &p.reconnect_id),
        ("display_name", &p.display_name),
    ] {
        if let Some(v) = value {
            url.push('&');
            url.push_str(name);
            url.push('=');
            url.push_str(&form_encode(v));
        }
    }
    url
}

fn form_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(char::from(b))
            }
            // Writing to a String cannot fail.
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Connects to the home node; `None` if it cannot be reached in time (the caller refuses
/// the join with "try again": the next attempt may find a new home).
pub(super) async fn connect(
    url: &str,
) -> Option<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    // TCP_NODELAY: signaling is small messages that must not wait for an ACK (Nagle) on
    // the hop between nodes.
    let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => Some(ws),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "home node refused a relayed join");
            None
        }
        Err(_) => {
            tracing::warn!("home node did not accept a relayed join in time");
            None
        }
    }
}

/// Carries messages both ways until either side closes; the other side gets the same
/// close code (4000 "do not reconnect", 1012 "reconnect", …), so the SDK acts on the home
/// node's decision as if it were connected to it.
pub(super) async fn pump(
    gw: &super::Gateway,
    mut client: Ws,
    mut home: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) {
    let drained = gw.draining();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            // This node shuts down: the client reconnects (through another node).
            () = &mut drained => {
                let _ = client.close(1012).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), home.close(None)).await;
                return;
            }
            m = client.recv() => match m {
                Some(Ok(Message::Close(frame))) => {
                    let _ = home.send(Message::Close(frame)).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), home.close(None)).await;
                    return;
                }
                // Pings are answered by each hop itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(m)) => {
                    if home.send(m).await.is_err() {
                        let _ = client.close(1012).await;
                        return;
                    }
                }
                Some(Err(_)) | None => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), home.close(None)).await;
                    return;
                }
            },
            m = home.next() => match m {
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map_or(1000, |f| u16::from(f.code));
                    let _ = client.close(code).await;
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(t))) => {
                    if client.send_text(t.as_str()).await.is_err() {
                        let _ = home.close(Some(CloseFrame { code: CloseCode::Away, reason: "".into() })).await;
                        return;
                    }
                }
                Some(Ok(m)) => {
                    if client.send(m).await.is_err() {
                        let _ = home.close(Some(CloseFrame { code: CloseCode::Away, reason: "".into() })).await;
                        return;
                    }
                }
                // The home node went away without a close: the SDK should reconnect (and
                // find the space re-homed).
                Some(Err(_)) | None => {
                    let _ = client.close(1012).await;
                    return;
                }
            },
        }
    }
}
