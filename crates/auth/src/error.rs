/// Why a join token was refused. Each variant is one rule, so tests assert the exact rule
/// that fired and the gateway can tell "expired" (the SDK asks the app for a fresh token)
/// from "invalid" (retrying cannot help).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is longer than {max} bytes")]
    TooLarge { max: usize },
    #[error("token is not a compact JWS (header.payload.signature)")]
    NotCompact,
    #[error("token {part} is not valid base64url")]
    BadBase64 { part: &'static str },
    #[error("token {part} is not a JSON object: {reason}")]
    BadJson { part: &'static str, reason: String },
    #[error("token algorithm {0:?} is not allowed; only RS256 is")]
    AlgorithmNotAllowed(String),
    #[error("token header lists critical extensions (crit), which are not supported")]
    UnsupportedHeader,
    #[error("token header has no alg")]
    MissingAlgorithm,
    #[error("token names no signing key (kid)")]
    MissingKeyId,
    #[error("token kid in header and payload differ")]
    KeyIdMismatch,
    #[error("token kid is not a valid key id")]
    BadKeyId,
    #[error("signing key is unknown or deleted")]
    UnknownKey,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token claim {claim} has the wrong type")]
    WrongClaimType { claim: &'static str },
    #[error("token has no {claim} claim")]
    MissingClaim { claim: &'static str },
    #[error("token audience must be \"rt\"")]
    WrongAudience,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("token sub is not a valid space id")]
    BadSpaceId,
    #[error("token role must be \"publisher\" or \"subscriber\"")]
    BadRole,
    #[error("token participant_id is empty, too long or has characters outside [A-Za-z0-9-_.:@+=]")]
    BadParticipantId,
    #[error("token is signed with a key of another environment than the space")]
    WrongEnvironment,
    #[error("token names a space that does not exist")]
    UnknownSpace,
}

impl AuthError {
    /// True when a fresh token from the app could succeed where this one failed, which is
    /// what the SDK's token-refresh path needs to know.
    pub fn is_expiry(&self) -> bool {
        matches!(self, AuthError::Expired)
    }
}
