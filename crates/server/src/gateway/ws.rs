//! The WebSocket of a joined connection: our own HTTP upgrade on hyper, tungstenite for
//! reading frames, and our own writer for the messages we send.
//!
//! tungstenite formats a whole outgoing frame into its write buffer and keeps that buffer's
//! capacity for the connection's life: a 100-person space's `joined` (~7 KB) left every
//! idle participant holding it (heaptrack: 20 MB for 3 000 connections). And it writes
//! each frame with its own system call. So text messages bypass it: each is framed into a
//! buffer that lives only for the write and goes out in one write, one TCP segment, however
//! large (sending `joined` as 256-byte fragments cost a segment each, and on loopback the
//! sender pays for the receiver's TCP processing too). tungstenite still writes what it
//! answers by itself (pongs, the close reply) and our pings and closes; its buffer is
//! flushed before each of our writes, so frames never interleave.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

pub(super) use tokio_tungstenite::tungstenite::Message;

/// The read buffer: tungstenite keeps it at the largest size it reached for the
/// connection's life. The SDK's frames are small; a larger one (an SDP offer) takes a few
/// more reads.
pub(super) const READ_BUFFER: usize = 256;

/// What a WebSocket runs over: the TCP stream our listener accepted, or a connection hyper
/// upgraded (the router's `/v1`).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A joined connection's socket.
pub(crate) struct Ws {
    stream: WebSocketStream<Box<dyn Io>>,
    /// Our 101 response, not yet written: it goes out with the first frame, in one write
    /// (one TCP segment fewer per join).
    head: Option<Box<[u8]>>,
}

pub(super) type WsError = tokio_tungstenite::tungstenite::Error;

fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message * 4)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

impl Ws {
    pub(super) async fn from_upgrade(on_upgrade: OnUpgrade, max_message: usize) -> Option<Ws> {
        let upgraded = on_upgrade.await.ok()?;
        let io: Box<dyn Io> = Box::new(TokioIo::new(upgraded));
        Some(Ws {
            stream: WebSocketStream::from_raw_socket(io, Role::Server, Some(config(max_message)))
                .await,
            head: None,
        })
    }

    /// A connection whose upgrade request our listener read itself: `head` is the 101
    /// response still to send, `read_ahead` what the client sent after its request.
    pub(crate) async fn accepted(
        io: Box<dyn Io>,
        head: Vec<u8>,
        read_ahead: Vec<u8>,
        max_message: usize,
    ) -> Ws {
        let config = Some(config(max_message));
        let stream = if read_ahead.is_empty() {
            WebSocketStream::from_raw_socket(io, Role::Server, config).await
        } else {
            WebSocketStream::from_partially_read(io, read_ahead, Role::Server, config).await
        };
        Ws {
            stream,
            head: Some(head.into_boxed_slice()),
        }
    }

    /// Writes the 101 response if it is still pending.
    async fn write_head(&mut self) -> Result<(), WsError> {
        if let Some(head) = self.head.take() {
            use tokio::io::AsyncWriteExt as _;
            self.stream.get_mut().write_all(&head).await?;
        }
        Ok(())
    }

    pub(super) async fn recv(&mut self) -> Option<Result<Message, WsError>> {
        self.stream.next().await
    }

    pub(super) async fn send(&mut self, m: Message) -> Result<(), WsError> {
        self.write_head().await?;
        self.stream.send(m).await
    }

    /// A text message, as one frame in one write (with the 101 response if that is still
    /// pending).
    pub(super) async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        use tokio::io::AsyncWriteExt as _;
        // Whatever tungstenite queued itself (a pong, a close reply) goes out first, whole.
        self.stream.flush().await?;
        let frame = match self.head.take() {
            Some(head) => {
                let mut out = Vec::with_capacity(head.len() + text.len() + 10);
                out.extend_from_slice(&head);
                push_text_frame(&mut out, text);
                out
            }
            None => text_frame(text),
        };
        let io = self.stream.get_mut();
        io.write_all(&frame).await?;
        io.flush().await?;
        Ok(())
    }

    pub(super) async fn close(&mut self, code: u16) -> Result<(), WsError> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.send(Message::Close(Some(frame))).await
    }
}

/// An unmasked (server-to-client) text frame holding all of `text` (RFC 6455 §5.2).
fn text_frame(text: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(text.len() + 10);
    push_text_frame(&mut frame, text);
    frame
}

fn push_text_frame(frame: &mut Vec<u8>, text: &str) {
    let n = text.len();
    // FIN, opcode 1 (text).
    frame.push(0x81);
    match n {
        0..=125 => frame.push(n as u8),
        126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(text.as_bytes());
}

/// Why an upgrade request was refused: an HTTP status and a reason.
#[derive(Debug)]
pub(crate) struct Refused(pub StatusCode, pub &'static str);

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
    let accept = accept_key(method, headers)?;
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

/// The 101 response of [`handshake`] as bytes, for a connection our listener answers
/// itself.
pub(crate) fn switching_protocols(
    method: &Method,
    headers: &HeaderMap,
) -> Result<Vec<u8>, Refused> {
    let accept = accept_key(method, headers)?;
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    )
    .into_bytes())
}

/// The `Sec-WebSocket-Accept` of a valid upgrade request.
fn accept_key(method: &Method, headers: &HeaderMap) -> Result<String, Refused> {
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
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
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
    fn text_frames_carry_every_length_form() {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        // The three length encodings and their edges, read back by tungstenite's parser.
        for n in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 300_000] {
            let text = "é".repeat(n / 2) + &"x".repeat(n % 2);
            let frame = text_frame(&text);
            let mut cursor = std::io::Cursor::new(&frame[..]);
            let (header, length) = FrameHeader::parse(&mut cursor)
                .expect("parses")
                .expect("complete header");
            assert!(
                header.is_final && !header.rsv1 && header.mask.is_none(),
                "{n}"
            );
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(length, text.len() as u64, "{n}");
            let body = &frame[usize::try_from(cursor.position()).expect("fits")..];
            assert_eq!(body, text.as_bytes(), "{n}");
        }
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
