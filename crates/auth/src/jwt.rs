use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;
use spacegate_proto::{KeyId, ParticipantId, Role, SpaceId};

use crate::error::AuthError;
use crate::keys::{KeyError, PrivateKey, PublicKey};

/// Tokens are capped before any decoding: a Mux join token is ~600 bytes, so 8 KiB leaves
/// room for app claims while bounding the work an attacker can make us do.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Tunables of claim checking. Time is always passed in, never read.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// Extra seconds past `exp` (and only `exp`) that a token stays acceptable: the
    /// reconnect grace, for an SDK that reconnects with the token it joined with.
    pub expiry_grace_secs: u64,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            leeway_secs: 30,
            expiry_grace_secs: 0,
        }
    }
}

/// The header fields we read. Every field is a raw `Value` so that a wrong type is reported
/// as exactly that, and derive(Deserialize) rejects a duplicated field for us.
#[derive(Debug, Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RawClaims {
    sub: Option<Value>,
    aud: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
    iat: Option<Value>,
    kid: Option<Value>,
    role: Option<Value>,
    participant_id: Option<Value>,
}

/// A token whose structure has been checked but whose signature has not. Its only use is to
/// name the key to verify it with.
#[derive(Debug)]
pub struct UnverifiedToken<'a> {
    kid: KeyId,
    claims: RawClaims,
    signing_input: &'a [u8],
    signature: Vec<u8>,
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinClaims {
    pub space_id: SpaceId,
    pub key_id: KeyId,
    pub role: Role,
    pub participant_id: Option<ParticipantId>,
    /// `exp`, in Unix seconds.
    pub expires_at: u64,
}

fn b64(part: &'static str, text: &str) -> Result<Vec<u8>, AuthError> {
    // The engine refuses padding and non-canonical trailing bits, so one base64 string maps
    // to one byte string and a flipped character can never decode to the same token.
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| AuthError::BadBase64 { part })
}

fn json<T: serde::de::DeserializeOwned>(part: &'static str, bytes: &[u8]) -> Result<T, AuthError> {
    serde_json::from_slice(bytes).map_err(|e| AuthError::BadJson {
        part,
        reason: e.to_string(),
    })
}

/// Checks a token's structure and names its signing key. No cryptography happens here.
pub fn decode(token: &str) -> Result<UnverifiedToken<'_>, AuthError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::TooLarge {
            max: MAX_TOKEN_BYTES,
        });
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::NotCompact);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(AuthError::NotCompact);
    }
    let header: RawHeader = json("header", &b64("header", h)?)?;
    match &header.alg {
        None => return Err(AuthError::MissingAlgorithm),
        Some(Value::String(alg)) if alg == "RS256" => {}
        Some(Value::String(alg)) => return Err(AuthError::AlgorithmNotAllowed(alg.clone())),
        Some(other) => return Err(AuthError::AlgorithmNotAllowed(other.to_string())),
    }
    // RFC 7515 §4.1.11: a header that lists extensions we do not implement must be refused.
    if header.crit.is_some() {
        return Err(AuthError::UnsupportedHeader);
    }
    let claims: RawClaims = json("payload", &b64("payload", p)?)?;
    let header_kid = opt_string("kid", &header.kid)?;
    let payload_kid = opt_string("kid", &claims.kid)?;
    let kid = match (header_kid, payload_kid) {
        (Some(a), Some(b)) if a != b => return Err(AuthError::KeyIdMismatch),
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => return Err(AuthError::MissingKeyId),
    };
    let kid = KeyId::new(kid).map_err(|_| AuthError::BadKeyId)?;
    let signature = b64("signature", s)?;
    let signing_input = &token.as_bytes()[..h.len() + 1 + p.len()];
    Ok(UnverifiedToken {
        kid,
        claims,
        signing_input,
        signature,
    })
}

fn opt_string<'v>(claim: &'static str, v: &'v Option<Value>) -> Result<Option<&'v str>, AuthError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AuthError::WrongClaimType { claim }),
    }
}

fn opt_time(claim: &'static str, v: &Option<Value>) -> Result<Option<f64>, AuthError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or(AuthError::WrongClaimType { claim }),
        Some(_) => Err(AuthError::WrongClaimType { claim }),
    }
}

impl<'a> UnverifiedToken<'a> {
    /// The signing key this token claims to be signed with.
    pub fn kid(&self) -> &KeyId {
        &self.kid
    }

    /// Verifies the signature with `key` (the public key stored for [`Self::kid`]) and then
    /// every claim rule, at time `now` (Unix seconds).
    pub fn verify(
        self,
        key: &PublicKey,
        now: u64,
        options: &VerifyOptions,
    ) -> Result<JoinClaims, AuthError> {
        if !key.verify(self.signing_input, &self.signature) {
            return Err(AuthError::BadSignature);
        }
        let c = self.claims;
        match &c.aud {
            None => return Err(AuthError::MissingClaim { claim: "aud" }),
            Some(Value::String(a)) if a == "rt" => {}
            Some(Value::String(_)) => return Err(AuthError::WrongAudience),
            // RFC 7519 §4.1.3: with several audiences, the recipient must find itself
            // among them. Every member must still be a string: a malformed list is not
            // read past.
            Some(Value::Array(list)) => {
                if !list.iter().all(Value::is_string) {
                    return Err(AuthError::WrongClaimType { claim: "aud" });
                }
                if !list.iter().any(|a| a == "rt") {
                    return Err(AuthError::WrongAudience);
                }
            }
            Some(_) => return Err(AuthError::WrongClaimType { claim: "aud" }),
        }
        let now_f = now as f64;
        let leeway = options.leeway_secs as f64;
        let exp = opt_time("exp", &c.exp)?.ok_or(AuthError::MissingClaim { claim: "exp" })?;
        // The reconnect grace stretches `exp` only: a token that is not valid yet is no
        // more valid for being a reconnect.
        if exp + leeway + options.expiry_grace_secs as f64 <= now_f {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = opt_time("nbf", &c.nbf)?
            && nbf > now_f + leeway
        {
            return Err(AuthError::NotYetValid);
        }
        if let Some(iat) = opt_time("iat", &c.iat)?
            && iat > now_f + leeway
        {
            return Err(AuthError::IssuedInFuture);
        }
        let sub = opt_string("sub", &c.sub)?.ok_or(AuthError::MissingClaim { claim: "sub" })?;
        let space_id = SpaceId::new(sub).map_err(|_| AuthError::BadSpaceId)?;
        let role = match opt_string("role", &c.role)? {
            None => Role::Publisher,
            Some(r) => r.parse().map_err(|_| AuthError::BadRole)?,
        };
        let participant_id = opt_string("participant_id", &c.participant_id)?
            .map(|p| ParticipantId::new(p).map_err(|_| AuthError::BadParticipantId))
            .transpose()?;
        Ok(JoinClaims {
            space_id,
            key_id: self.kid,
            role,
            participant_id,
            // Saturating float-to-int: a millisecond `exp` is just a far-future time.
            expires_at: exp.max(0.0) as u64,
        })
    }
}

/// Where [`verify`] finds public keys: any snapshot of `kid` → key. The server uses its own
/// async cache with [`decode`] + [`UnverifiedToken::verify`] instead; embedders with keys in
/// memory use this.
pub trait KeyLookup {
    fn public_key(&self, kid: &KeyId) -> Option<&PublicKey>;
}

impl KeyLookup for std::collections::HashMap<KeyId, PublicKey> {
    fn public_key(&self, kid: &KeyId) -> Option<&PublicKey> {
        self.get(kid)
    }
}

/// Decodes and verifies `token` in one call, with keys from a snapshot.
pub fn verify(
    token: &str,
    keys: &impl KeyLookup,
    now: u64,
    options: &VerifyOptions,
) -> Result<JoinClaims, AuthError> {
    let unverified = decode(token)?;
    let key = keys
        .public_key(unverified.kid())
        .ok_or(AuthError::UnknownKey)?;
    unverified.verify(key, now, options)
}

/// What `spacegate sign` (and `mux spaces:sign`) put in a token.
#[derive(Debug, Clone)]
pub struct SignOptions {
    pub key_id: KeyId,
    pub space_id: SpaceId,
    pub expires_at: u64,
    pub role: Role,
    pub participant_id: Option<ParticipantId>,
}

/// Signs a join token with `kid` in both header and payload, so that verifiers reading
/// either place (mux-node 7 style or 8 style) find it.
pub fn sign(key: &PrivateKey, options: &SignOptions) -> Result<String, KeyError> {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": options.key_id});
    let mut claims = serde_json::json!({
        "sub": options.space_id,
        "aud": "rt",
        "exp": options.expires_at,
        "kid": options.key_id,
        "role": options.role,
    });
    if let Some(p) = &options.participant_id {
        claims["participant_id"] = Value::String(p.to_string());
    }
    sign_raw(key, &header.to_string(), &claims.to_string())
}

/// Signs arbitrary header and payload text with RS256. For tests and tools that need tokens
/// no well-behaved signer would make (duplicate fields, wrong types, non-JSON).
pub fn sign_raw(key: &PrivateKey, header: &str, claims: &str) -> Result<String, KeyError> {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let sig = key.sign_rs256(token.as_bytes())?;
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig));
    Ok(token)
}
