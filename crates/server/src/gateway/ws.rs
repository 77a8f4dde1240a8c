//! The WebSocket of a joined connection: our own HTTP upgrade on hyper, and tungstenite for
//! the framing, so that we decide what an idle connection holds.
//!
//! tungstenite formats a whole outgoing frame into its write buffer and keeps that buffer's
//! capacity for the connection's life: a 100-person space's `joined` (~7 KB) left every
//! idle participant holding it (heaptrack: 20 MB for 3 000 connections). Messages larger
//! than [`FRAGMENT`] are therefore sent as a fragmented message (RFC 6455 §5.4), so the
//! buffer never grows past one fragment. Browsers and every WebSocket client reassemble
//! fragments; the SDK sees one message.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

pub(super) use tokio_tungstenite::tungstenite::Message;

/// Largest frame we send, and the read buffer: tungstenite keeps both buffers at the
/// largest size they reached for the connection's life. The SDK's frames are small; a
/// larger one (an SDP offer) takes a few more reads.
pub(super) const FRAGMENT: usize = 256;

/// A joined connection's socket.
pub(super) struct Ws(WebSocketStream<TokioIo<Upgraded>>);

pub(super) type WsError = tokio_tungstenite::tungstenite::Error;

impl Ws {
    pub(super) async fn from_upgrade(on_upgrade: OnUpgrade, max_message: usize) -> Option<Ws> {
        let upgraded = on_upgrade.await.ok()?;
        let config = WebSocketConfig::default()
            .read_buffer_size(FRAGMENT)
            .write_buffer_size(0)
            .max_write_buffer_size(max_message * 4)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        Some(Ws(WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(config),
        )
        .await))
    }

    pub(super) async fn recv(&mut self) -> Option<Result<Message, WsError>> {
        self.0.next().await
    }

    pub(super) async fn send(&mut self, m: Message) -> Result<(), WsError> {
        self.0.send(m).await
    }

    /// A text message, fragmented when it is larger than [`FRAGMENT`].
    pub(super) async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        if text.len() <= FRAGMENT {
            return self.0.send(Message::text(text)).await;
        }
        // Fragment boundaries need not fall on UTF-8 boundaries: only the reassembled
        // message must be valid UTF-8 (RFC 6455 §5.6).
        let mut chunks = text.as_bytes().chunks(FRAGMENT).peekable();
        let mut opcode = OpCode::Data(Data::Text);
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let frame = Frame::message(bytes_of(chunk), opcode, last);
            self.0.feed(Message::Frame(frame)).await?;
            opcode = OpCode::Data(Data::Continue);
        }
        self.0.flush().await
    }

    pub(super) async fn close(&mut self, code: u16) -> Result<(), WsError> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.0.send(Message::Close(Some(frame))).await
    }
}

fn bytes_of(chunk: &[u8]) -> tokio_tungstenite::tungstenite::Bytes {
    tokio_tungstenite::tungstenite::Bytes::copy_from_slice(chunk)
}

/// Why an upgrade request was refused: an HTTP status and a reason.
#[derive(Debug)]
pub(super) struct Refused(pub StatusCode, pub &'static str);

impl Refused {
    pub(super) fn into_response(self) -> Response<Body> {
        let mut r = Response::new(Body::from(self.1));
        *r.status_mut() = self.0;
        if self.0 == StatusCode::UPGRADE_REQUIRED {
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        r
    }
}

/// Checks a WebSocket upgrade request (RFC 6455 §4.2.1) and builds the 101 response.
/// Anything else gets 400 (or 426 without `Upgrade: websocket`), as a plain HTTP error:
/// only a client that is not a WebSocket client sees it.
pub(super) fn handshake(method: &Method, headers: &HeaderMap) -> Result<Response<Body>, Refused> {
    let refuse = |status: StatusCode, why: &'static str| Refused(status, why);
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if method != Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket upgrades use GET",
        ));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "expected a WebSocket upgrade",
        ));
    }
    if !has_token(header::CONNECTION, "upgrade") {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "Connection header must include upgrade",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h
    }

    #[test]
    fn a_valid_upgrade_gets_the_rfc_accept_key() {
        let r = handshake(&Method::GET, &upgrade_headers()).expect("valid upgrade");
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        // The worked example of RFC 6455 §1.3.
        assert_eq!(
            r.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn requests_that_are_not_upgrades_get_http_errors() {
        let status = |m: Method, edit: &dyn Fn(&mut HeaderMap)| {
            let mut h = upgrade_headers();
            edit(&mut h);
            handshake(&m, &h)
                .expect_err("refused")
                .into_response()
                .status()
        };
        assert_eq!(
            status(Method::POST, &|_| {}),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Method::GET, &|h| {
                h.remove(header::UPGRADE);
            }),
            StatusCode::UPGRADE_REQUIRED
        );
        assert_eq!(
            status(Method::GET, &|h| {
                h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
            }),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(Method::GET, &|h| {
                h.remove(header::SEC_WEBSOCKET_KEY);
            }),
            StatusCode::BAD_REQUEST
        );
    }
}
