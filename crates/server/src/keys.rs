//! The join path's view of signing keys: `kid` → parsed public key and its environment.
//!
//! Parsing an RSA key costs about a third of a verification, so parsed keys are cached.
//! Correctness rules: a created key is visible at once (a miss always asks the store; there
//! is no negative caching), and a deleted key is refused at once (the API handler removes it
//! from the cache right after the store delete, and a lookup racing with that delete cannot
//! put it back: see `epoch`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use spacegate_auth::PublicKey;
use spacegate_proto::{EnvironmentId, KeyId};
use spacegate_store::{Store, StoreError};

#[derive(Debug)]
pub struct CachedKey {
    pub environment_id: EnvironmentId,
    pub key: PublicKey,
}

#[derive(Debug, Default)]
pub struct KeyCache {
    map: RwLock<HashMap<KeyId, Arc<CachedKey>>>,
    /// Bumped on every invalidation. A lookup that read the store before an invalidation
    /// and finishes after it must not insert what it read: the row may be deleted by now.
    epoch: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored public key of {0} does not parse")]
    BadStoredKey(KeyId),
}

impl KeyCache {
    pub async fn get(
        &self,
        store: &dyn Store,
        kid: &KeyId,
    ) -> Result<Option<Arc<CachedKey>>, KeyLookupError> {
        if let Some(hit) = self.read_map().get(kid) {
            return Ok(Some(hit.clone()));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(record) = store.signing_key_any_environment(kid).await? else {
            return Ok(None);
        };
        let key = PublicKey::from_der(&record.public_key_der)
            .map_err(|_| KeyLookupError::BadStoredKey(kid.clone()))?;
        let cached = Arc::new(CachedKey {
            environment_id: record.environment_id,
            key,
        });
        let mut map = self.write_map();
        if self.epoch.load(Ordering::Acquire) == epoch {
            map.insert(kid.clone(), cached.clone());
        }
        Ok(Some(cached))
    }

    /// Forgets `kid`. Call after the store delete has committed.
    pub fn invalidate(&self, kid: &KeyId) {
        let mut map = self.write_map();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        map.remove(kid);
    }

    pub fn len(&self) -> usize {
        self.read_map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means another thread panicked mid-update of a plain map; the map
    // is still consistent, so keep serving.
    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<KeyId, Arc<CachedKey>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<KeyId, Arc<CachedKey>>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}
