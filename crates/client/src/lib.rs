//! Native spacegate client: the REST control plane and the signaling WebSocket, speaking
//! exactly what `@mux/spaces-web` 1.2.0 speaks (URL, query parameters, frames). Used by the
//! end-to-end tests, bots and the `spacegate-load` generator. Media runs on webrtc-rs
//! (`media`: the peer connections; `participant`: a joined client with them), so native
//! tests pit it against the server's str0m.

pub mod media;
pub mod participant;
mod rest;
mod signaling;
pub mod tls;

pub use rest::{RestClient, RestError, http_client};
pub use signaling::{ClientError, JoinOptions, Session, join_url};
