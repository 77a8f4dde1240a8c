//! The join path's caches: `kid` → parsed public key and its environment, and space id →
//! environment. Every join needs both; asking SQLite each time cost more than the RSA
//! verification itself (a thread hop per query).
//!
//! Correctness rules: a created key or space is visible at once (a miss always asks the
//! store; there is no negative caching), and a deleted one is refused at once (the API
//! handler invalidates right after the store delete, and a lookup racing with that delete
//! cannot put it back: see [`Cache::epoch`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use spacegate_auth::PublicKey;
use spacegate_proto::{EnvironmentId, KeyId, SpaceId};
use spacegate_store::{Store, StoreError};

/// A positive cache with race-free invalidation.
#[derive(Debug)]
pub struct Cache<K, V> {
    map: RwLock<HashMap<K, Arc<V>>>,
    /// Bumped on every invalidation. A lookup that read the store before an invalidation
    /// and finishes after it must not insert what it read: the row may be deleted by now.
    epoch: AtomicU64,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache {
            map: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }
}

impl<K: Hash + Eq + Clone, V> Cache<K, V> {
    /// The cached value, or `load()`'s, which is cached if it exists.
    pub async fn get_or_load<E, F, Fut>(&self, key: &K, load: F) -> Result<Option<Arc<V>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        if let Some(hit) = self.read_map().get(key) {
            return Ok(Some(hit.clone()));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(value) = load().await? else {
            return Ok(None);
        };
        let value = Arc::new(value);
        let mut map = self.write_map();
        if self.epoch.load(Ordering::Acquire) == epoch {
            map.insert(key.clone(), value.clone());
        }
        Ok(Some(value))
    }

    /// Forgets `key`. Call after the store delete has committed.
    pub fn invalidate(&self, key: &K) {
        let mut map = self.write_map();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.read_map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means another thread panicked mid-update of a plain map; the map
    // is still consistent, so keep serving.
    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<K, Arc<V>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<K, Arc<V>>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
pub struct CachedKey {
    pub environment_id: EnvironmentId,
    pub key: PublicKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored public key of {0} does not parse")]
    BadStoredKey(KeyId),
}

/// Everything the join check looks up, cached.
#[derive(Debug, Default)]
pub struct KeyCache {
    pub keys: Cache<KeyId, CachedKey>,
    pub spaces: Cache<SpaceId, EnvironmentId>,
}

impl KeyCache {
    pub async fn get(
        &self,
        store: &dyn Store,
        kid: &KeyId,
    ) -> Result<Option<Arc<CachedKey>>, KeyLookupError> {
        self.keys
            .get_or_load(kid, || async {
                let Some(record) = store.signing_key_any_environment(kid).await? else {
                    return Ok(None);
                };
                let key = PublicKey::from_der(&record.public_key_der)
                    .map_err(|_| KeyLookupError::BadStoredKey(kid.clone()))?;
                Ok(Some(CachedKey {
                    environment_id: record.environment_id,
                    key,
                }))
            })
            .await
    }

    /// The environment of an existing space.
    pub async fn space_environment(
        &self,
        store: &dyn Store,
        space: &SpaceId,
    ) -> Result<Option<Arc<EnvironmentId>>, StoreError> {
        self.spaces
            .get_or_load(space, || async {
                Ok(store
                    .space_any_environment(space)
                    .await?
                    .map(|s| s.environment_id))
            })
            .await
    }

    pub fn invalidate(&self, kid: &KeyId) {
        self.keys.invalidate(kid);
    }

    pub fn invalidate_space(&self, space: &SpaceId) {
        self.spaces.invalidate(space);
    }

    /// Parsed keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}
