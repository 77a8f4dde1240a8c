//! What happens to an accepted TCP connection: a join's WebSocket upgrade is answered here,
//! everything else goes to hyper and the router.
//!
//! A join is one TCP connection carrying one HTTP request, so what a generic HTTP stack
//! spends per connection is spent per join: hyper's connection task and dispatcher, the
//! upgrade hand-off, and a 101 response written on its own. Here the request head is read
//! into one buffer and parsed in place (`httparse`); a valid upgrade to `/v1` is admitted
//! without hyper, and its 101 goes out in the same write as `joined` (or as the refusal),
//! one TCP segment fewer. Any other request, or an upgrade we would refuse, is handed to
//! hyper with the bytes already read, so it is answered exactly as before.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::AppState;
use crate::gateway::{self, JoinParams};

/// A join's request head larger than this is left to hyper (which refuses it). A token is
/// about 1 KB; browsers add cookies and a dozen headers.
const MAX_JOIN_HEAD: usize = 64 * 1024;

/// Serves one accepted connection until it ends. `stopped` turns true at shutdown: plain
/// HTTP connections then finish their request and close (WebSockets are drained by the
/// gateway).
pub(crate) async fn connection<S>(
    state: AppState,
    router: axum::Router,
    mut tcp: S,
    peer: Option<IpAddr>,
    stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let started = Instant::now();
    let head_timeout = state.gateway.config.head_timeout;
    let mut buf = Vec::with_capacity(2048);
    let head = match tokio::time::timeout(head_timeout, read_head(&mut tcp, &mut buf)).await {
        Ok(Ok(head)) => head,
        // Gone, or too slow to say what it wants.
        Ok(Err(_)) | Err(_) => return,
    };
    // A join we admit here; anything else (not a join, or an upgrade we would refuse)
    // hyper answers as it would any request.
    let trust = state.gateway.config.trust_forwarded_for;
    if let Some((end, (response, params))) =
        head.and_then(|end| Some((end, join_upgrade(&buf[..end], peer, trust)?)))
    {
        drop(stopped);
        let read_ahead = buf.split_off(end);
        drop(buf);
        let socket = gateway::Ws::accepted(
            Box::new(tcp),
            response,
            read_ahead,
            gateway::MAX_FRAME_BYTES,
        )
        .await;
        gateway::join(state, params, socket, started).await;
        return;
    }
    let io = Prefixed {
        prefix: buf,
        at: 0,
        inner: tcp,
    };
    http(router, io, stopped, peer, head_timeout).await;
}

/// Reads until the request line shows whether this is a join. For a join, reads its whole
/// head and returns where it ends; for anything else returns `None` at once. Each read's
/// bytes are scanned once, so a client that sends its head a byte at a time costs no more
/// than one that sends it whole.
async fn read_head<S: AsyncRead + Unpin>(
    tcp: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    // Where the next search for a line end starts (a match may straddle two reads).
    let mut scanned: usize = 0;
    let mut join = false;
    loop {
        let from = scanned.saturating_sub(3);
        if !join {
            if let Some(line) = find(&buf[from..], b"\r\n") {
                if !is_join_line(&buf[..from + line]) {
                    return Ok(None);
                }
                join = true;
            }
        }
        if join {
            if let Some(end) = find(&buf[from..], b"\r\n\r\n") {
                return Ok(Some(from + end + 4));
            }
        }
        if buf.len() > MAX_JOIN_HEAD {
            return Ok(None);
        }
        scanned = buf.len();
        if tcp.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `GET /v1…` or `GET /pluto/v1…` (the SDK's join paths), with or without a query.
fn is_join_line(line: &[u8]) -> bool {
    let Some(target) = line.strip_prefix(b"GET ") else {
        return false;
    };
    let path_end = target
        .iter()
        .position(|&b| b == b'?' || b == b' ')
        .unwrap_or(target.len());
    matches!(&target[..path_end], b"/v1" | b"/pluto/v1")
}

/// A join request we answer ourselves: its 101 response and its query. `None` for
/// anything hyper should answer (malformed, not a valid upgrade).
fn join_upgrade(
    head: &[u8],
    peer: Option<IpAddr>,
    trust_forwarded_for: bool,
) -> Option<(Vec<u8>, JoinParams)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_)))
        || request.version != Some(1)
    {
        return None;
    }
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for h in request.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        map.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    let response = gateway::switching_protocols(&Method::GET, &map).ok()?;
    let uri: Uri = request.path?.parse().ok()?;
    // A malformed query still upgrades, and the missing token is refused in-protocol.
    let mut params = Query::<JoinParams>::try_from_uri(&uri)
        .map(|Query(p)| p)
        .unwrap_or_default();
    let forwarded = map.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    params.source = gateway::source_address(peer, forwarded, trust_forwarded_for);
    Some((response, params))
}

/// Plain HTTP on hyper (HTTP/1.1, upgrades for the router's own `/v1`).
async fn http<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    router: axum::Router,
    io: Prefixed<S>,
    mut stopped: watch::Receiver<bool>,
    peer: Option<IpAddr>,
    head_timeout: Duration,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        let router = router.clone();
        if let Some(ip) = peer {
            request.extensions_mut().insert(gateway::PeerIp(ip));
        }
        async move { Ok::<_, std::convert::Infallible>(respond(router, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // Every request head, the first one included (its request line may have come in
        // alone), must arrive within the timeout (slowloris). Needs hyper's timer.
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stopped.wait_for(|stop| *stop) => {}
    }
    // Shutdown: finish the request in flight, take no more.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Through the router, built once (a join this listener did not take itself, such as an
/// upgrade it would refuse, reaches the gateway's `/v1` route there).
async fn respond(
    router: axum::Router,
    request: hyper::Request<hyper::body::Incoming>,
) -> axum::response::Response {
    use tower_service::Service as _;
    let mut router = router;
    match router.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The accepted stream with the bytes already read from it put back in front.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                // Read once: free it for the connection's remaining life.
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sdk_join_paths_are_taken_here() {
        for line in [
            "GET /v1?token=a HTTP/1.1",
            "GET /v1 HTTP/1.1",
            "GET /pluto/v1?token=a&x=y HTTP/1.1",
        ] {
            assert!(is_join_line(line.as_bytes()), "{line}");
        }
        for line in [
            "POST /v1?token=a HTTP/1.1",
            "GET /v10 HTTP/1.1",
            "GET /v1/spaces HTTP/1.1",
            "GET /video/v1/spaces HTTP/1.1",
            "GET /healthz HTTP/1.1",
            "GET",
        ] {
            assert!(!is_join_line(line.as_bytes()), "{line}");
        }
    }

    fn request(extra: &str) -> String {
        format!(
            "GET /v1?token=abc&display_name=Al%20ice HTTP/1.1\r\nHost: x\r\n\
             Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    }

    #[test]
    fn a_valid_upgrade_is_answered_here_with_the_rfc_accept_key() {
        let head = request("Sec-WebSocket-Version: 13\r\n");
        let (response, _params) = join_upgrade(head.as_bytes(), None, false).expect("taken");
        let response = String::from_utf8(response).expect("text");
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        // RFC 6455 §1.3's worked example.
        assert!(response.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(response.ends_with("\r\n\r\n"));
    }

    #[test]
    fn upgrades_we_would_refuse_are_left_to_hyper() {
        // Wrong version, missing headers, an unfinished head: hyper answers those (with
        // the same HTTP errors as before).
        assert!(
            join_upgrade(
                request("Sec-WebSocket-Version: 8\r\n").as_bytes(),
                None,
                false
            )
            .is_none()
        );
        assert!(join_upgrade(request("").as_bytes(), None, false).is_none());
        let head = request("Sec-WebSocket-Version: 13\r\n");
        assert!(join_upgrade(&head.as_bytes()[..head.len() - 2], None, false).is_none());
    }

    /// A connected (client, server) pair on loopback.
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// `read_head` on what a client sends in pieces of `chunk` bytes.
    async fn head_of(bytes: &[u8], chunk: usize) -> (Option<usize>, usize) {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, mut server) = tcp_pair().await;
        let _ = client.set_nodelay(true);
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(chunk) {
                client.write_all(piece).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = Vec::new();
        let head = read_head(&mut server, &mut buf).await.expect("read");
        drop(writer.await);
        (head, buf.len())
    }

    #[tokio::test]
    async fn a_join_head_is_found_however_it_is_split() {
        let head = request("Sec-WebSocket-Version: 13\r\n");
        let mut bytes = head.clone().into_bytes();
        // A frame pipelined behind the request stays after the head.
        bytes.extend_from_slice(&[0x81, 0x80, 0, 0, 0, 0]);
        for chunk in [1, 2, 3, 7, bytes.len()] {
            let (end, _) = head_of(&bytes, chunk).await;
            assert_eq!(end, Some(head.len()), "in pieces of {chunk}");
        }
        // Anything else is known from its request line, without waiting for the head.
        let (end, read) = head_of(b"GET /healthz HTTP/1.1\r\n", 1).await;
        assert_eq!((end, read), (None, 23));
    }

    #[tokio::test]
    async fn bytes_read_ahead_are_read_again_first() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, server) = tcp_pair().await;
        client.write_all(b" world").await.expect("write");
        drop(client);
        let mut io = Prefixed {
            prefix: b"hello".to_vec(),
            at: 0,
            inner: server,
        };
        let mut all = String::new();
        io.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
    }
}
