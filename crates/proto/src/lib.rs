//! Shared vocabulary of spacegate: typed identifiers and the small enums every layer speaks.
//!
//! This crate owns the types that cross crate boundaries on the join path (REST objects refer
//! to the same ids the signaling protocol carries). It does no IO, reads no clock and pulls in
//! no async runtime, so every other crate, including embedders' media servers, can depend on
//! it for free. [`signaling`] holds the WebSocket messages of `@mux/spaces-web` 1.2.0.

mod ids;
pub mod signaling;

pub use ids::{
    AccessTokenId, ConnectionId, EnvironmentId, IdError, KeyId, MAX_ID_LEN, ParticipantId,
    SessionId, SpaceId,
};

use serde::{Deserialize, Serialize};

/// What a participant may do in a space; carried in the `role` claim of the join token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May publish and subscribe. The default when a token names no role, as on Mux.
    #[default]
    Publisher,
    /// May only subscribe; publishing operations are refused.
    Subscriber,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "publisher" => Ok(Role::Publisher),
            "subscriber" => Ok(Role::Subscriber),
            _ => Err(UnknownRole),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("role must be \"publisher\" or \"subscriber\"")]
pub struct UnknownRole;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_parses_only_the_two_roles() {
        assert_eq!("publisher".parse(), Ok(Role::Publisher));
        assert_eq!("subscriber".parse(), Ok(Role::Subscriber));
        assert_eq!("Publisher".parse::<Role>(), Err(UnknownRole));
        assert_eq!("admin".parse::<Role>(), Err(UnknownRole));
        assert_eq!(Role::default(), Role::Publisher);
    }
}
