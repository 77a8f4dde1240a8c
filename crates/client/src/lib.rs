//! Native spacegate client: the REST control plane and the signaling WebSocket, speaking
//! exactly what `@mux/spaces-web` 1.2.0 speaks (URL, query parameters, frames). Used by the
//! end-to-end tests, bots and the `spacegate-load` generator. Media (webrtc-rs) arrives
//! with the media issue.

pub mod media;
mod rest;
mod signaling;

pub use rest::{RestClient, RestError};
pub use signaling::{ClientError, JoinOptions, Session, join_url};
