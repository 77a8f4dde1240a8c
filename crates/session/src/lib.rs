//! Session registry of the join gateway (filled by the join-gateway issue).
//!
//! Will own: the backend-neutral registry trait (one atomic reserve of a `participant_id` in
//! a space, returning a fresh `connection_id` or "already joined"), the in-memory
//! implementation, and the conformance suite the Redis implementation must also pass.
//! Refuses: sockets, clocks, JWTs.
