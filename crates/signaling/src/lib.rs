//! Per-space signaling state machine (filled by the join-gateway issue).
//!
//! Will own: admitted connections, `@mux/spaces-web` messages and timer ticks in; messages
//! out. Sans-IO: no sockets, no clock, no randomness, so it is tested in virtual time.
