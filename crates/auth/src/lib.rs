//! Join-token verification (and signing) for spacegate.
//!
//! Owns: the RS256 JWT rules of Mux Spaces tokens (see `mux-control-api.md` §7), parsing of
//! signing-key material, and the typed errors the join gateway maps onto the SDK's error
//! types. Refuses: IO and clocks. The caller passes `now` and the public key for the token's
//! `kid`, so the same code runs in the server, in tests in virtual time, and inside somebody
//! else's media server.
//!
//! Verification is two steps so the key lookup can be async and cached by the caller:
//! [`decode`] does the cheap structural work and names the `kid`; [`UnverifiedToken::verify`]
//! checks the signature against that key and then the claims.

mod error;
mod jwt;
mod keys;
pub mod pem;

pub use error::AuthError;
pub use jwt::{
    JoinClaims, KeyLookup, MAX_TOKEN_BYTES, SignOptions, UnverifiedToken, VerifyOptions, decode,
    sign, sign_raw, verify,
};
pub use keys::{KeyError, PrivateKey, PublicKey};
