//! Native spacegate client (filled by the join-gateway and media issues): REST, signaling
//! with exactly the browser SDK's protocol, media on webrtc-rs, and the load generator.
