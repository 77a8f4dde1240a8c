//! Benchmarks live in this crate's bench targets; see `auth_verify.rs`.
