use spacegate_proto::{AccessTokenId, EnvironmentId, KeyId, SessionId, SpaceId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub id: EnvironmentId,
    pub name: String,
    pub created_at: i64,
}

/// What an access token may do. Mux splits permissions per product; spacegate has one
/// product, so read and write are all there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions {
    pub read: bool,
    pub write: bool,
}

impl Permissions {
    pub const READ_WRITE: Permissions = Permissions {
        read: true,
        write: true,
    };

    /// Parses a comma-separated list such as `read,write`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut p = Permissions::default();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "read" => p.read = true,
                "write" => p.write = true,
                other => return Err(format!("unknown permission {other:?} (read, write)")),
            }
        }
        if p == Permissions::default() {
            return Err("at least one permission (read, write) is needed".into());
        }
        Ok(p)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.read {
            v.push("read");
        }
        if self.write {
            v.push("write");
        }
        v
    }
}

impl std::fmt::Display for Permissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// An access token as stored: the secret itself is never kept, only its SHA-256. Secrets
/// are 256-bit random strings, so a fast hash is enough (no dictionary to attack) and keeps
/// Basic auth cheap on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessTokenRecord {
    pub id: AccessTokenId,
    pub environment: Environment,
    pub name: Option<String>,
    pub permissions: Permissions,
    pub secret_sha256: [u8; 32],
    pub created_at: i64,
}

/// A signing key as stored: the public half only (PKCS#1 `RSAPublicKey` DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub id: KeyId,
    pub environment_id: EnvironmentId,
    pub public_key_der: Vec<u8>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceStatus {
    Idle,
    Active,
}

impl SpaceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SpaceStatus::Idle => "idle",
            SpaceStatus::Active => "active",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceRecord {
    pub id: SpaceId,
    pub environment_id: EnvironmentId,
    pub passthrough: Option<String>,
    pub status: SpaceStatus,
    /// Set while active; new on every idle → active transition.
    pub active_session_id: Option<SessionId>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteSpaceOutcome {
    Deleted,
    NotFound,
    /// The space has participants; nothing was deleted.
    Active,
}

/// One page of a list, 1-based as in Mux's API. Lists are in creation order, so paging
/// through while others create objects never skips an old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub page: u32,
}

impl Page {
    pub fn offset(&self) -> i64 {
        i64::from(self.page.saturating_sub(1)) * i64::from(self.limit)
    }
}
