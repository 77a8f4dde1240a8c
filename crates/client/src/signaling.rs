use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use spacegate_proto::signaling::{
    ClientMessage, CustomEvent, CustomEventRequest, Envelope, ErrorBody, Joined, ParticipantUpdate,
    ServerMessage,
};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// What `new Space(token, options)` + `join()` put in the URL.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub sdk_version: String,
    /// 0 manual subscriptions; 1–20 automatic (the SDK's default is 16).
    pub managed_subscriptions: u8,
    pub display_name: Option<String>,
    /// The `participant_id` of the previous `joined`, on a reconnect.
    pub reconnect_id: Option<String>,
    pub reconnect_attempt: Option<u8>,
    pub timeout: Duration,
}

impl Default for JoinOptions {
    fn default() -> Self {
        JoinOptions {
            sdk_version: "web-1.2.0".into(),
            managed_subscriptions: 16,
            display_name: None,
            reconnect_id: None,
            reconnect_attempt: None,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting failed: {0}")]
    Connect(String),
    /// The server refused the join with the SDK's `error` message.
    #[error("join refused (type {}): {}", .error.kind, .error.message)]
    Rejected {
        error: ErrorBody,
        /// The close code that followed (4000: do not reconnect).
        close_code: Option<u16>,
    },
    #[error("connection closed (code {code:?})")]
    Closed { code: Option<u16> },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    /// A request was refused with a correlated `error`.
    #[error("request refused (type {}): {}", .0.kind, .0.message)]
    Request(ErrorBody),
}

/// Form encoding as `URLSearchParams` does it.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `<base>/v1?token=…&sdk_version=…&managed_subscriptions=…[&reconnect_id=…&reconnect_attempt=…][&display_name=…]`,
/// in the SDK's parameter order.
pub fn join_url(base: &str, token: &str, o: &JoinOptions) -> String {
    let mut url = format!(
        "{}/v1?token={}&sdk_version={}&managed_subscriptions={}",
        base.trim_end_matches('/'),
        form_encode(token),
        form_encode(&o.sdk_version),
        o.managed_subscriptions
    );
    if let Some(r) = &o.reconnect_id {
        url.push_str(&format!(
            "&reconnect_id={}&reconnect_attempt={}",
            form_encode(r),
            o.reconnect_attempt.unwrap_or(1)
        ));
    }
    if let Some(d) = o.display_name.as_deref().filter(|d| !d.is_empty()) {
        url.push_str(&format!("&display_name={}", form_encode(d)));
    }
    url
}

/// The WebSocket handshake over TCP, or over TLS for `wss://`.
async fn connect(url: &str) -> Result<(WebSocketStream<Box<dyn crate::tls::Io>>, ()), ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let request = url
        .into_client_request()
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let uri = request.uri();
    let tls = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| ClientError::Connect(format!("no host in {url}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let io = crate::tls::connect(&addr, &host, tls)
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let (ws, _) = tokio_tungstenite::client_async(request, io)
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    Ok((ws, ()))
}

/// A joined signaling session.
pub struct Session {
    ws: WebSocketStream<Box<dyn crate::tls::Io>>,
    joined: Joined,
    /// Messages read while waiting for a specific reply, handed out by [`Session::next`].
    backlog: VecDeque<Envelope<ServerMessage>>,
    timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("connection_id", &self.joined.connection_id)
            .field("participant_id", &self.joined.participant_id)
            .finish_non_exhaustive()
    }
}

fn close_code(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

impl Session {
    /// Connects and waits for `joined`, or for the `error` that refuses the join.
    pub async fn join(
        base: &str,
        token: &str,
        options: &JoinOptions,
    ) -> Result<Session, ClientError> {
        let url = join_url(base, token, options);
        let connect = connect(&url);
        let (mut ws, ()) = tokio::time::timeout(options.timeout, connect)
            .await
            .map_err(|_| ClientError::Timeout)??;
        let first = tokio::time::timeout(options.timeout, read(&mut ws))
            .await
            .map_err(|_| ClientError::Timeout)??;
        match first.message {
            ServerMessage::Joined(joined) => Ok(Session {
                ws,
                joined: *joined,
                backlog: VecDeque::new(),
                timeout: options.timeout,
            }),
            ServerMessage::Error(error) => {
                // The server closes after a refusal; report its close code too.
                let close_code = match tokio::time::timeout(options.timeout, read(&mut ws)).await {
                    Ok(Err(ClientError::Closed { code })) => code,
                    _ => None,
                };
                Err(ClientError::Rejected { error, close_code })
            }
            other => Err(ClientError::Protocol(format!(
                "expected joined first, got {other:?}"
            ))),
        }
    }

    pub fn joined(&self) -> &Joined {
        &self.joined
    }

    pub async fn send(
        &mut self,
        message: ClientMessage,
        request_id: Option<String>,
    ) -> Result<(), ClientError> {
        let text = Envelope::with_request_id(message, request_id).to_json();
        self.send_raw(Message::Text(text.into())).await
    }

    /// Sends any frame, e.g. for tests of hostile input.
    pub async fn send_raw(&mut self, m: Message) -> Result<(), ClientError> {
        self.ws
            .send(m)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))
    }

    /// The next message from the server.
    pub async fn next(&mut self) -> Result<Envelope<ServerMessage>, ClientError> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        tokio::time::timeout(self.timeout, read(&mut self.ws))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// The next message within `d`, or `None`.
    pub async fn next_within(
        &mut self,
        d: Duration,
    ) -> Result<Option<Envelope<ServerMessage>>, ClientError> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(Some(m));
        }
        match tokio::time::timeout(d, read(&mut self.ws)).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Reads until the reply carrying `request_id` (or a correlated error), keeping the
    /// rest for [`Session::next`].
    async fn reply(&mut self, request_id: &str) -> Result<ServerMessage, ClientError> {
        loop {
            let m = tokio::time::timeout(self.timeout, read(&mut self.ws))
                .await
                .map_err(|_| ClientError::Timeout)??;
            if m.request_id.as_deref() == Some(request_id) {
                return Ok(m.message);
            }
            if let ServerMessage::Error(e) = &m.message
                && e.request_error
                    .as_ref()
                    .is_some_and(|r| r.correlator.split(',').any(|c| c == request_id))
            {
                return Err(ClientError::Request(e.clone()));
            }
            self.backlog.push_back(m);
        }
    }

    /// `LocalParticipant.setDisplayName`: resolves with the echoed update.
    pub async fn set_display_name(
        &mut self,
        name: &str,
        request_id: &str,
    ) -> Result<ParticipantUpdate, ClientError> {
        self.send(
            ClientMessage::SetDisplayName(name.into()),
            Some(request_id.into()),
        )
        .await?;
        match self.reply(request_id).await? {
            ServerMessage::ParticipantUpdate(u) => Ok(u),
            other => Err(ClientError::Protocol(format!(
                "expected participant_update, got {other:?}"
            ))),
        }
    }

    /// `LocalParticipant.publishCustomEvent`: resolves with the server's echo.
    pub async fn publish_custom_event(
        &mut self,
        id: &str,
        payload: &str,
    ) -> Result<CustomEvent, ClientError> {
        let event = CustomEventRequest {
            id: id.into(),
            payload: payload.into(),
            scope: 1,
        };
        self.send(ClientMessage::CustomEvent(event), Some(id.into()))
            .await?;
        match self.reply(id).await? {
            ServerMessage::CustomEvent(e) => Ok(e),
            other => Err(ClientError::Protocol(format!(
                "expected custom_event, got {other:?}"
            ))),
        }
    }

    /// `space.leave()`: closes without a code, as the browser does (the server sees 1005).
    pub async fn leave(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Sends a close frame and drops the connection without waiting for the server's
    /// reply: a client that leaves and moves on.
    pub async fn abort_with_close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
    }

    /// Drops the TCP connection without a close handshake (a crashed client).
    pub fn abort(self) {
        drop(self.ws);
    }

    /// Waits for the server to close; returns its close code.
    pub async fn closed(&mut self) -> Result<Option<u16>, ClientError> {
        loop {
            match self.next().await {
                Err(ClientError::Closed { code }) => return Ok(code),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }
}

async fn read(
    ws: &mut WebSocketStream<Box<dyn crate::tls::Io>>,
) -> Result<Envelope<ServerMessage>, ClientError> {
    loop {
        match ws.next().await {
            None => return Err(ClientError::Closed { code: None }),
            Some(Err(e)) => return Err(ClientError::Connect(e.to_string())),
            Some(Ok(Message::Text(text))) => {
                return Envelope::decode_server(&text)
                    .map_err(|e| ClientError::Protocol(e.to_string()));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(ClientError::Closed {
                    code: close_code(&frame),
                });
            }
            // Pings are answered by tungstenite on the next write or read.
            Some(Ok(_)) => {}
        }
    }
}
