//! Media plane (filled by the media issue): publisher and subscriber negotiation and RTP
//! forwarding over str0m, sans-IO, one UDP socket for all peers.
//!
//! Refuses any knowledge of JWTs, WebSockets or spaces-web messages, so it can be embedded
//! in another media server.
