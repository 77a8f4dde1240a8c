//! The join path's caches: `kid` → parsed public key and its environment, and space id →
//! environment. Every join needs both; asking SQLite each time cost more than the RSA
//! verification itself (a thread hop per query).
//!
//! Correctness rules: a created key or space is visible at once, and a deleted one is
//! refused at once (the API handler invalidates right after the store delete, and a lookup
//! racing with that delete cannot put it back: see [`Cache::epoch`]).
//!
//! Unknown `kid`s: a stranger can put any `kid` in a token, and each new one would be a
//! store query. So a `kid` the store did not have is remembered as missing for
//! [`MISSING_KID_TTL`] (a key created on this node clears that at once; one created on
//! another node of a cluster is seen after at most the TTL), and lookups of `kid`s not
//! cached either way are capped at [`KID_LOOKUPS_PER_SECOND`]: beyond, the join is refused
//! with "try again" without a query, so random `kid`s cannot turn joins into store load.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

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

    /// Forgets everything, with the same guarantee as [`Cache::invalidate`].
    pub fn clear(&self) {
        let mut map = self.write_map();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        map.clear();
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
    /// Too many lookups of uncached `kid`s this second.
    #[error("too many lookups of unknown signing keys")]
    Busy,
}

/// How long a `kid` the store did not have is answered "unknown" without asking again.
pub const MISSING_KID_TTL: Duration = Duration::from_secs(10);
/// Store lookups per second for `kid`s not cached (burst: the same number).
pub const KID_LOOKUPS_PER_SECOND: u32 = 50;
/// Most `kid`s remembered as missing; past it the expired ones are swept, and if none
/// were, the oldest half goes.
const MAX_MISSING_KIDS: usize = 10_000;

/// Everything the join check looks up, cached.
#[derive(Debug)]
pub struct KeyCache {
    pub keys: Cache<KeyId, CachedKey>,
    pub spaces: Cache<SpaceId, EnvironmentId>,
    /// `kid` → when it was found missing.
    missing: Mutex<HashMap<KeyId, Instant>>,
    lookups: Mutex<spacegate_signaling::TokenBucket>,
    in_flight: Mutex<HashMap<KeyId, Arc<tokio::sync::Mutex<()>>>>,
    started: Instant,
    /// Store queries made for `kid`s, for tests and metrics.
    store_lookups: AtomicU64,
    /// The other nodes of a cluster (see `cluster::Bus`): every change made here is sent
    /// to them, so a deleted key or space stops admitting joins on every node at once.
    peers: std::sync::OnceLock<tokio::sync::mpsc::Sender<Invalidation>>,
}

/// A change of what the join check caches, as told to the other nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    KeyDeleted(KeyId),
    KeyCreated(KeyId),
    SpaceDeleted(SpaceId),
}

impl Invalidation {
    /// One line on the cluster's channel: a tag and the id.
    pub fn encode(&self) -> String {
        match self {
            Invalidation::KeyDeleted(k) => format!("key-deleted {k}"),
            Invalidation::KeyCreated(k) => format!("key-created {k}"),
            Invalidation::SpaceDeleted(s) => format!("space-deleted {s}"),
        }
    }

    /// `None` for anything else (a newer node's message, noise on the channel).
    pub fn decode(text: &str) -> Option<Invalidation> {
        let (tag, id) = text.split_once(' ')?;
        match tag {
            "key-deleted" => id.parse().ok().map(Invalidation::KeyDeleted),
            "key-created" => id.parse().ok().map(Invalidation::KeyCreated),
            "space-deleted" => id.parse().ok().map(Invalidation::SpaceDeleted),
            _ => None,
        }
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache {
            keys: Cache::default(),
            spaces: Cache::default(),
            missing: Mutex::new(HashMap::new()),
            lookups: Mutex::new(spacegate_signaling::TokenBucket::new(
                KID_LOOKUPS_PER_SECOND,
                KID_LOOKUPS_PER_SECOND,
                0,
            )),
            in_flight: Mutex::new(HashMap::new()),
            started: Instant::now(),
            store_lookups: AtomicU64::new(0),
            peers: std::sync::OnceLock::new(),
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyCache {
    pub async fn get(
        &self,
        store: &dyn Store,
        kid: &KeyId,
    ) -> Result<Option<Arc<CachedKey>>, KeyLookupError> {
        if let Some(hit) = self.keys.read_map().get(kid) {
            return Ok(Some(hit.clone()));
        }
        // One lookup per kid at a time: a crowd joining with a key not cached yet (after a
        // restart) waits for the first one's answer instead of each asking the store (and
        // using up the lookup cap meant for strangers' random kids).
        let gate = locked(&self.in_flight)
            .entry(kid.clone())
            .or_default()
            .clone();
        let found = {
            let _turn = gate.lock().await;
            self.lookup(store, kid).await
        };
        let mut in_flight = locked(&self.in_flight);
        // The last one out removes the gate (the map holds one reference, `gate` another).
        if Arc::strong_count(&gate) == 2 {
            in_flight.remove(kid);
        }
        found
    }

    async fn lookup(
        &self,
        store: &dyn Store,
        kid: &KeyId,
    ) -> Result<Option<Arc<CachedKey>>, KeyLookupError> {
        if let Some(hit) = self.keys.read_map().get(kid) {
            return Ok(Some(hit.clone()));
        }
        let now = Instant::now();
        if locked(&self.missing)
            .get(kid)
            .is_some_and(|at| now.duration_since(*at) < MISSING_KID_TTL)
        {
            return Ok(None);
        }
        let ms = u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        if !locked(&self.lookups).try_take(ms) {
            return Err(KeyLookupError::Busy);
        }
        self.store_lookups.fetch_add(1, Ordering::Relaxed);
        let found = self
            .keys
            .get_or_load(kid, || async {
                let Some(record) = store.signing_key_any_environment(kid).await? else {
                    return Ok::<_, KeyLookupError>(None);
                };
                let key = PublicKey::from_der(&record.public_key_der)
                    .map_err(|_| KeyLookupError::BadStoredKey(kid.clone()))?;
                Ok(Some(CachedKey {
                    environment_id: record.environment_id,
                    key,
                }))
            })
            .await?;
        if found.is_none() {
            self.remember_missing(kid, now);
        }
        Ok(found)
    }

    fn remember_missing(&self, kid: &KeyId, now: Instant) {
        let mut missing = locked(&self.missing);
        if missing.len() >= MAX_MISSING_KIDS {
            missing.retain(|_, at| now.duration_since(*at) < MISSING_KID_TTL);
            if missing.len() >= MAX_MISSING_KIDS / 2 {
                // All fresh: a flood of random kids. Forgetting is safe (it only costs a
                // lookup, which the rate cap still bounds).
                missing.clear();
            }
        }
        missing.insert(kid.clone(), now);
    }

    /// A key was just created on this node (and committed): cached at once, so its first
    /// joins need no lookup (none is needed, and under a flood of random kids one might be
    /// refused), and never "unknown" from an earlier miss.
    pub fn created(&self, record: &spacegate_store::SigningKeyRecord) {
        self.tell_peers(Invalidation::KeyCreated(record.id.clone()));
        locked(&self.missing).remove(&record.id);
        if let Ok(key) = PublicKey::from_der(&record.public_key_der) {
            self.keys.write_map().insert(
                record.id.clone(),
                Arc::new(CachedKey {
                    environment_id: record.environment_id.clone(),
                    key,
                }),
            );
        }
    }

    /// Store queries made for `kid`s so far.
    pub fn store_lookups(&self) -> u64 {
        self.store_lookups.load(Ordering::Relaxed)
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

    /// A key was deleted (and committed): forgotten here and on the other nodes.
    pub fn invalidate(&self, kid: &KeyId) {
        self.keys.invalidate(kid);
        self.tell_peers(Invalidation::KeyDeleted(kid.clone()));
    }

    /// A space was deleted (and committed): forgotten here and on the other nodes.
    pub fn invalidate_space(&self, space: &SpaceId) {
        self.spaces.invalidate(space);
        self.tell_peers(Invalidation::SpaceDeleted(space.clone()));
    }

    /// Sends this node's changes to `peers` from now on (once; cluster mode).
    pub fn connect_peers(&self, peers: tokio::sync::mpsc::Sender<Invalidation>) {
        let _ = self.peers.set(peers);
    }

    fn tell_peers(&self, change: Invalidation) {
        if let Some(peers) = self.peers.get()
            && peers.try_send(change).is_err()
        {
            // Deletes are REST calls, a handful per second at most; a full queue means
            // the bus is stuck, and the bus forgets every cache when it reconnects.
            tracing::warn!(
                "cluster invalidation queue full; other nodes may keep a deleted key or space until the bus reconnects"
            );
        }
    }

    /// A change another node made: applied here only.
    pub fn apply_remote(&self, change: &Invalidation) {
        match change {
            Invalidation::KeyDeleted(k) => self.keys.invalidate(k),
            // The key is in the store now: no longer "unknown" here either.
            Invalidation::KeyCreated(k) => {
                locked(&self.missing).remove(k);
            }
            Invalidation::SpaceDeleted(s) => self.spaces.invalidate(s),
        }
    }

    /// Everything cached is forgotten: changes may have been missed (the bus was
    /// disconnected), so the store is asked again.
    pub fn forget_everything(&self) {
        self.keys.clear();
        self.spaces.clear();
        locked(&self.missing).clear();
    }

    /// Parsed keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}
