//! Per-space signaling state machine of the join gateway.
//!
//! Owns: who is in a space and what each participant has told the others (display names,
//! custom events, published-track metadata, mute state), and the ordering rules of the
//! `@mux/spaces-web` protocol (`joined` first; `participant_connected` before anything that
//! names a connection; never echo what the SDK cannot take back). Sans-IO: inputs are
//! joins, leaves, decoded client messages and the current time in milliseconds; outputs
//! are frames addressed to connections plus space-level events. No sockets, no clock, no
//! randomness (session ids are passed in), so tests drive it in virtual time.
//!
//! Driving contract: the caller owns one [`Space`] per active space and calls it from one
//! task at a time (or under one lock). For every call it delivers the returned
//! [`Output`]s in order: frames to the named connections' outbound queues, and
//! [`Output::Activated`] / [`Output::Idle`] to the control plane, in order.
//! [`Output::Media`] carries messages for the media plane (SFU), which answers through
//! later inputs.

mod limiter;
mod liveness;
mod space;

pub use limiter::TokenBucket;
pub use liveness::{FloodGuard, Liveness, LivenessAction};
pub use space::{Joiner, Output, Space, SpaceConfig};
