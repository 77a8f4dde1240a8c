//! Typed identifiers. Each wraps a validated string so that a `SpaceId` can never be passed
//! where a `KeyId` is expected, and so that nothing unvalidated from a client reaches a store
//! query or a log line.

use serde::{Deserialize, Serialize};

/// Mux documents ids as opaque strings of at most 255 characters.
pub const MAX_ID_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} characters")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may only contain letters, digits and the characters {allowed}")]
    BadCharacter {
        kind: &'static str,
        allowed: &'static str,
    },
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $extra:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The characters besides ASCII letters and digits that this id may contain.
            pub const EXTRA_CHARS: &'static str = $extra;
            pub const MAX_LEN: usize = $max;

            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                if value.is_empty() {
                    return Err(IdError::Empty { kind: $kind });
                }
                if value.len() > $max {
                    return Err(IdError::TooLong { kind: $kind, max: $max });
                }
                if !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || $extra.as_bytes().contains(&b))
                {
                    return Err(IdError::BadCharacter { kind: $kind, allowed: $extra });
                }
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

// Server-generated ids are base62; the extra characters admit ids that users bring along
// (UUIDs, ids migrated from Mux) without admitting anything that needs escaping in a URL
// path, a log line or a Redis key.
string_id!(
    /// A space; the `sub` claim of join tokens.
    SpaceId, "space id", MAX_ID_LEN, "-_"
);
string_id!(
    /// A signing key; the `kid` of join tokens.
    KeyId, "signing key id", MAX_ID_LEN, "-_"
);
string_id!(
    /// An environment: the isolation boundary of spaces, keys and access tokens.
    EnvironmentId, "environment id", MAX_ID_LEN, "-_"
);
string_id!(
    /// The public half of an access token (the Basic-auth user name).
    AccessTokenId, "access token id", MAX_ID_LEN, "-_"
);
string_id!(
    /// A participant's identity within a space, from the token or server-generated. App
    /// servers often use e-mail addresses or `user:123` as identities, hence `@:.+`.
    ParticipantId, "participant id", 128, "-_.:@+="
);
string_id!(
    /// One WebSocket connection; fresh on every connect.
    ConnectionId, "connection id", 64, "-_"
);
string_id!(
    /// One idle→active period of a space (`active_session_id`).
    SessionId, "session id", 64, "-_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate_length_and_characters() {
        assert!(SpaceId::new("Sp4ce-01_x").is_ok());
        assert_eq!(SpaceId::new(""), Err(IdError::Empty { kind: "space id" }));
        assert!(matches!(
            SpaceId::new("a".repeat(256)),
            Err(IdError::TooLong { max: 255, .. })
        ));
        assert!(SpaceId::new("a".repeat(255)).is_ok());
        assert!(matches!(
            SpaceId::new("a/b"),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            KeyId::new("k\u{e9}y"),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(ParticipantId::new("user:alice@example.com").is_ok());
        assert!(ParticipantId::new("a b").is_err());
        assert!(ParticipantId::new("a".repeat(129)).is_err());
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let ok: SpaceId = serde_json::from_str("\"abc\"").expect("valid id");
        assert_eq!(ok.as_str(), "abc");
        assert!(serde_json::from_str::<SpaceId>("\"a b\"").is_err());
        assert_eq!(serde_json::to_string(&ok).expect("serialize"), "\"abc\"");
    }
}
