//! The registry on Redis, for cluster mode: every gateway node of a cluster reserves in one
//! Redis, so a participant is in a space once across the cluster.
//!
//! Layout (`C` is the cluster name; the braces are literal, a Redis Cluster hash tag, so
//! that every key a script touches is in one slot):
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `{C}:node:{node_id}:{incarnation}` | string, PX = lease | the node's lease; `owner` below is `{node_id}:{incarnation}` |
//! | `{C}:space:{space}` | hash | participant → `"{connection} {owner} {sha256 hex of credential}"` |
//! | `{C}:count:{space}` | hash | owner → how many entries of the space hash it owns |
//! | `{C}:departed:{space}:{participant}` | string, PX = grace | sha256 hex of the departed credential |
//!
//! An entry is live while its owner's lease key exists. The incarnation is random per
//! [`RedisRegistry`] (so per process start) and a lapsed lease is never renewed: an owner
//! whose lease key is gone is dead for good, which is what lets another node take over its
//! participants without the entries coming back to life when the node returns.
//!
//! The count hash is what keeps the cap check O(nodes) instead of O(participants): for
//! every owner, its count equals its number of entries in the space hash (each script
//! that adds or removes an entry adjusts it), and the live participants are the sum over
//! owners with a lease. When `reserve` meets a dead owner's count it removes it together
//! with that owner's entries in that space, once: one pass over the space per dead node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script, Value};
use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};

use crate::{
    Home, Registry, Reservation, ReserveError, ReserveMode, ReserveRequest, SpaceHomes, millis,
};

/// The longest a registry call waits for one Redis round trip. A join waits on the
/// registry, so a Redis that is gone or stuck must fail it fast, not hang it.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// One TCP connect attempt; the reconnects after a loss use it too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Leases outside this range are configuration mistakes: shorter ones cannot be renewed
/// reliably over a network, longer ones keep a dead node's participants locked out for
/// too long.
const MIN_LEASE: Duration = Duration::from_millis(100);
const MAX_LEASE: Duration = Duration::from_secs(600);
/// Redis refuses an expiry past the end of its clock; no grace is longer than ten years.
const MAX_GRACE_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
/// Longest cluster name or node id: they are in every key.
const MAX_NAME_LEN: usize = 64;

/// Reserve, atomically. KEYS: space hash, count hash, own lease key, departure key.
/// ARGV: participant, connection, credential digest, mode, max participants, lease key
/// prefix, own owner. Answers `{status, live participants, replaced connection or ''}`.
const RESERVE: &str = r#"
local members, counts, own_lease, departure = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local participant, connection, digest, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max, lease_prefix, owner = tonumber(ARGV[5]), ARGV[6], ARGV[7]

-- An entry written under a lapsed lease would be void at once; the caller renews first.
if redis.call('EXISTS', own_lease) == 0 then
  return {'lapsed', 0, ''}
end

-- Live participants: the counts of owners whose lease exists. A dead owner's count goes,
-- and with it its entries in this space (this happens once per dead owner and space).
local live = 0
local dead = {}
local any_dead = false
local owners = redis.call('HGETALL', counts)
for i = 1, #owners, 2 do
  local o = owners[i]
  if redis.call('EXISTS', lease_prefix .. o) == 1 then
    live = live + (tonumber(owners[i + 1]) or 0)
  else
    dead[o] = true
    any_dead = true
    redis.call('HDEL', counts, o)
  end
end
if any_dead then
  local entries = redis.call('HGETALL', members)
  for i = 1, #entries, 2 do
    local _, o = string.match(entries[i + 1], '^(%S+) (%S+) (%S+)$')
    if o == nil or dead[o] then
      redis.call('HDEL', members, entries[i])
    end
  end
end

local replaced = ''
local existing = redis.call('HGET', members, participant)
if existing then
  local c, o, d = string.match(existing, '^(%S+) (%S+) (%S+)$')
  if c == nil or redis.call('EXISTS', lease_prefix .. o) == 0 then
    -- Unreadable, or owned by a dead node without a count to sweep: absent.
    redis.call('HDEL', members, participant)
  else
    if mode == 'fresh' or d ~= digest then
      return {'joined', 0, ''}
    end
    replaced = c
    if redis.call('HINCRBY', counts, o, -1) <= 0 then
      redis.call('HDEL', counts, o)
    end
  end
end
if replaced == '' then
  if mode == 'resume' then
    return {'notheld', 0, ''}
  end
  if live >= max then
    return {'full', 0, ''}
  end
  live = live + 1
end
redis.call('HSET', members, participant, connection .. ' ' .. owner .. ' ' .. digest)
redis.call('HINCRBY', counts, owner, 1)
redis.call('DEL', departure)
return {'ok', live, replaced}
"#;

/// Release, atomically. KEYS: space hash, count hash. ARGV: participant, connection,
/// lease key prefix. Answers 1 if the connection held the participant under a live lease.
/// An entry of a dead owner is removed too (it was absent already), and answers 0.
const RELEASE: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return 0
end
local c, o = string.match(v, '^(%S+) (%S+) %S+$')
if c ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HEXISTS', KEYS[2], o) == 1 then
  if redis.call('HINCRBY', KEYS[2], o, -1) <= 0 then
    redis.call('HDEL', KEYS[2], o)
  end
end
return redis.call('EXISTS', ARGV[3] .. o)
"#;

/// KEYS: space hash. ARGV: participant, lease key prefix. Answers the live holder's
/// connection, or nil.
const HOLDER: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return false
end
local c, o = string.match(v, '^(%S+) (%S+) %S+$')
if c == nil or redis.call('EXISTS', ARGV[2] .. o) == 0 then
  return false
end
return c
"#;

/// KEYS: space hash. ARGV: lease key prefix. Answers `{participant, connection, ...}` of
/// the live entries; one lease lookup per owner.
const PARTICIPANTS: &str = r#"
local entries = redis.call('HGETALL', KEYS[1])
local alive = {}
local out = {}
for i = 1, #entries, 2 do
  local c, o = string.match(entries[i + 1], '^(%S+) (%S+) %S+$')
  if c ~= nil then
    local a = alive[o]
    if a == nil then
      a = redis.call('EXISTS', ARGV[1] .. o) == 1
      alive[o] = a
    end
    if a then
      out[#out + 1] = entries[i]
      out[#out + 1] = c
    end
  end
end
return out
"#;

/// What [`RedisRegistry::renew`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRenewal {
    /// The lease was there and now runs for another lease period.
    Renewed,
    /// The lease had lapsed (the node could not renew in time, or Redis lost its data):
    /// every entry this node registered before is void, and other nodes may have admitted
    /// the same participants since. A new lease is in place, under which new reservations
    /// work again. The connections of the old entries are unregistered: the server should
    /// close them, so that they come back through a reservation.
    Lapsed,
}

struct Scripts {
    reserve: Script,
    release: Script,
    holder: Script,
    participants: Script,
    home_claim: Script,
    home_release: Script,
    live_homes: Script,
    departed: Script,
}

/// The [`Registry`] on Redis for a cluster of gateway nodes, each with its own instance.
///
/// Every reservation belongs to this node's lease, which must be renewed within the lease
/// period ([`RedisRegistry::renew`], or [`RedisRegistry::spawn_lease_keeper`]); when a node
/// dies, its participants are free again once its lease runs out. Every Redis round trip
/// is bounded by a 2 s timeout and answers [`ReserveError::Backend`] past it; the
/// connection is re-established in the background when Redis is back.
pub struct RedisRegistry {
    conn: ConnectionManager,
    /// `{cluster}:`, the start of every key.
    prefix: String,
    /// `{cluster}:node:`, the start of every lease key.
    lease_prefix: String,
    node_id: String,
    lease: Duration,
    /// `{node_id}:{incarnation}`; replaced when the lease lapsed.
    owner: Mutex<Arc<str>>,
    /// One renewal at a time: two that both found the lease lapsed would start two
    /// incarnations, and reservations made under the first would die with it.
    renewing: tokio::sync::Mutex<()>,
    scripts: Scripts,
    /// This node's internal URL, the value of its lease key: how other nodes reach the
    /// spaces it is home to. Empty until [`RedisRegistry::advertise`].
    advertised: Mutex<String>,
    /// This node's load as last reported ([`RedisRegistry::set_load`]), published with
    /// every renewal for the choice of new spaces' homes.
    load: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RedisRegistry {
    // By hand: the connection's Debug shows the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .field("owner", &self.owner())
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> ReserveError {
    ReserveError::Backend(format!("redis {what}: {e}"))
}

/// `what` runs within [`OP_TIMEOUT`]; a Redis error or the timeout is a backend error.
async fn bounded<T>(
    what: &str,
    op: impl std::future::Future<Output = RedisResult<T>>,
) -> Result<T, ReserveError> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(backend(what, e)),
        Err(_) => Err(backend(
            what,
            format_args!("no answer within {} ms", OP_TIMEOUT.as_millis()),
        )),
    }
}

/// Cluster names and node ids go into every key: letters, digits, `-_.` only, so that
/// neither a `:` nor a brace nor a space (the entry separator) can make one key or entry
/// read as another.
fn check_name(kind: &str, name: &str) -> Result<(), ReserveError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ReserveError::Backend(format!(
            "{kind} must be 1 to {MAX_NAME_LEN} letters, digits or -_."
        )))
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// What Redis keeps of a credential: its SHA-256. Lua has no constant-time comparison;
/// comparing digests leaks nothing usable about the credential through timing.
fn digest(credential: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, credential.as_bytes()).as_ref())
}

fn new_owner(node_id: &str) -> Result<Arc<str>, ReserveError> {
    let mut incarnation = [0u8; 16];
    aws_lc_rs::rand::fill(&mut incarnation)
        .map_err(|_| ReserveError::Backend("no randomness for the node incarnation".into()))?;
    Ok(format!("{node_id}:{}", hex(&incarnation)).into())
}

fn stored<T: std::str::FromStr>(kind: &str, value: &str) -> Result<T, ReserveError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| ReserveError::Backend(format!("redis holds an invalid {kind}: {e}")))
}

impl RedisRegistry {
    /// A lease that survives one lost renewal (they run every third of it) and a Redis
    /// round trip at its timeout, and frees a dead node's participants within seconds.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(6);

    /// Connects to the Redis at `url` (`redis://[:password@]host:port[/db]`) and takes a
    /// lease for this node. `cluster` names the cluster (nodes of one cluster see each
    /// other's participants; another cluster on the same Redis sees none of them),
    /// `node_id` this node (for operators: two nodes with the same id do not clash, each
    /// process has a random incarnation of its own). Both: 1 to 64 letters, digits or
    /// `-_.`. `lease`: 100 ms to 10 min, see [`Self::DEFAULT_LEASE`].
    pub async fn connect(
        url: &str,
        cluster: &str,
        node_id: &str,
        lease: Duration,
    ) -> Result<Self, ReserveError> {
        check_name("cluster name", cluster)?;
        check_name("node id", node_id)?;
        if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
            return Err(ReserveError::Backend(format!(
                "the lease must be {} ms to {} s",
                MIN_LEASE.as_millis(),
                MAX_LEASE.as_secs()
            )));
        }
        // The URL's own error text is left out: the URL may carry a password.
        let client = redis::Client::open(url)
            .map_err(|_| ReserveError::Backend("invalid redis URL".to_string()))?;
        // Reconnects retry briefly; a join never waits for them longer than OP_TIMEOUT,
        // and the next command after a failed reconnect starts another.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = bounded(
            "connect",
            ConnectionManager::new_with_config(client, config),
        )
        .await?;
        let prefix = format!("{{{cluster}}}:");
        let registry = Self {
            conn,
            lease_prefix: format!("{prefix}node:"),
            advertised: Mutex::new(String::new()),
            load: std::sync::atomic::AtomicU64::new(0),
            prefix,
            node_id: node_id.to_string(),
            lease,
            owner: Mutex::new(new_owner(node_id)?),
            renewing: tokio::sync::Mutex::new(()),
            scripts: Scripts {
                reserve: Script::new(RESERVE),
                release: Script::new(RELEASE),
                holder: Script::new(HOLDER),
                participants: Script::new(PARTICIPANTS),
                home_claim: Script::new(HOME_CLAIM),
                home_release: Script::new(HOME_RELEASE),
                live_homes: Script::new(LIVE_HOMES),
                departed: Script::new(DEPARTED),
            },
        };
        registry.take_lease(&registry.owner()).await?;
        Ok(registry)
    }

    /// This node's id, as given to [`Self::connect`].
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The lease period.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether Redis answers, within the timeout: for readiness checks.
    pub async fn ping(&self) -> Result<(), ReserveError> {
        let mut conn = self.conn.clone();
        bounded("ping", redis::cmd("PING").query_async::<String>(&mut conn)).await?;
        Ok(())
    }

    /// Extends this node's lease by a lease period. Must succeed at least once per lease
    /// period, or the node's reservations lapse; see [`LeaseRenewal::Lapsed`] for what
    /// then happens. An error (Redis unreachable) leaves the lease running out.
    pub async fn renew(&self) -> Result<LeaseRenewal, ReserveError> {
        let _one = self.renewing.lock().await;
        let owner = self.owner();
        let mut conn = self.conn.clone();
        // XX: only an existing lease is extended. Reviving a lapsed one would revive
        // entries other nodes already took over or stopped counting.
        let renewed: Value = bounded(
            "renew",
            redis::cmd("SET")
                .arg(self.lease_key(&owner))
                .arg(self.advertised())
                .arg("PX")
                .arg(millis(self.lease))
                .arg("XX")
                .query_async(&mut conn),
        )
        .await?;
        if renewed != Value::Nil {
            self.publish_load(&owner).await?;
            return Ok(LeaseRenewal::Renewed);
        }
        let fresh = new_owner(&self.node_id)?;
        self.take_lease(&fresh).await?;
        *self.owner.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        tracing::warn!(
            node = %self.node_id,
            "registry lease had lapsed: this node's earlier reservations are void; new lease taken"
        );
        Ok(LeaseRenewal::Lapsed)
    }

    /// Renews the lease on a task of its own, every `every` but at least every third of
    /// the lease, until the task is aborted or the registry dropped (it holds a weak
    /// reference). Failures are logged with the node id and the error, nothing else.
    pub fn spawn_lease_keeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let every = every.min(self.lease / 3).max(Duration::from_millis(10));
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate; the lease is fresh from `connect`.
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                if let Err(e) = registry.renew().await {
                    tracing::warn!(node = %registry.node_id, error = %e, "registry lease renewal failed");
                }
            }
        })
    }

    fn owner(&self) -> Arc<str> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn take_lease(&self, owner: &str) -> Result<(), ReserveError> {
        let mut conn = self.conn.clone();
        bounded(
            "lease",
            redis::cmd("SET")
                .arg(self.lease_key(owner))
                .arg(self.advertised())
                .arg("PX")
                .arg(millis(self.lease))
                .query_async::<()>(&mut conn),
        )
        .await?;
        self.publish_load(owner).await
    }

    fn advertised(&self) -> String {
        self.advertised
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Tells the other nodes where this one takes relayed joins (`url`, its internal URL):
    /// stored in the lease key at once and with every renewal.
    pub async fn advertise(&self, url: &str) -> Result<(), ReserveError> {
        *self.advertised.lock().unwrap_or_else(|p| p.into_inner()) = url.to_string();
        match self.renew().await? {
            LeaseRenewal::Renewed | LeaseRenewal::Lapsed => Ok(()),
        }
    }

    /// Gives up this node's lease at once (a clean shutdown): whatever it still holds
    /// (participants, space homes) is free for the other nodes now, not when the lease
    /// would have run out.
    pub async fn resign(&self) -> Result<(), ReserveError> {
        let owner = self.owner();
        let mut conn = self.conn.clone();
        bounded(
            "resign",
            redis::pipe()
                .cmd("DEL")
                .arg(self.lease_key(&owner))
                .ignore()
                .cmd("HDEL")
                .arg(self.load_key())
                .arg(&*owner)
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// This node's load (its connected participants) for the choice of homes: new spaces
    /// go to the live node with the least. Published with the next renewal.
    pub fn set_load(&self, participants: u64) {
        self.load
            .store(participants, std::sync::atomic::Ordering::Relaxed);
    }

    async fn publish_load(&self, owner: &str) -> Result<(), ReserveError> {
        let mut conn = self.conn.clone();
        bounded(
            "load",
            redis::cmd("HSET")
                .arg(self.load_key())
                .arg(owner)
                .arg(self.load.load(std::sync::atomic::Ordering::Relaxed))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    fn load_key(&self) -> String {
        format!("{}load", self.prefix)
    }

    fn home_key(&self, space: &SpaceId) -> String {
        format!("{}home:{space}", self.prefix)
    }

    fn lease_key(&self, owner: &str) -> String {
        format!("{}{owner}", self.lease_prefix)
    }

    fn members_key(&self, space: &SpaceId) -> String {
        format!("{}space:{space}", self.prefix)
    }

    fn counts_key(&self, space: &SpaceId) -> String {
        format!("{}count:{space}", self.prefix)
    }

    /// Space ids have no `:`, so the participant (which may) is unambiguous after it.
    fn departure_key(&self, space: &SpaceId, participant: &ParticipantId) -> String {
        format!("{}departed:{space}:{participant}", self.prefix)
    }
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn ping(&self) -> Result<(), ReserveError> {
        RedisRegistry::ping(self).await
    }

    async fn reserve(&self, r: ReserveRequest<'_>) -> Result<Reservation, ReserveError> {
        let credential = digest(r.credential);
        let mode = match r.mode {
            ReserveMode::Fresh => "fresh",
            ReserveMode::Reconnect => "reconnect",
            ReserveMode::Resume => "resume",
        };
        // A second attempt only after the script found this node's lease lapsed and it was
        // taken anew.
        let mut renewed = false;
        loop {
            let owner = self.owner();
            let mut invocation = self.scripts.reserve.prepare_invoke();
            invocation
                .key(self.members_key(r.space))
                .key(self.counts_key(r.space))
                .key(self.lease_key(&owner))
                .key(self.departure_key(r.space, r.participant))
                .arg(r.participant.as_str())
                .arg(r.connection.as_str())
                .arg(&credential)
                .arg(mode)
                .arg(r.max_participants)
                .arg(&self.lease_prefix)
                .arg(&*owner);
            let mut conn = self.conn.clone();
            let (status, live, replaced): (String, i64, String) =
                bounded("reserve", invocation.invoke_async(&mut conn)).await?;
            return match status.as_str() {
                "ok" => Ok(Reservation {
                    replaced: if replaced.is_empty() {
                        None
                    } else {
                        Some(stored("connection id", &replaced)?)
                    },
                    participants: u32::try_from(live).unwrap_or(u32::MAX),
                }),
                "joined" => Err(ReserveError::AlreadyJoined),
                "notheld" => Err(ReserveError::NotHeld),
                "full" => Err(ReserveError::SpaceFull {
                    max: r.max_participants,
                }),
                "lapsed" if !renewed => {
                    self.renew().await?;
                    renewed = true;
                    continue;
                }
                "lapsed" => Err(ReserveError::Backend(
                    "this node's registry lease lapsed again right after renewal".into(),
                )),
                other => Err(backend(
                    "reserve",
                    format_args!("unexpected answer {other:?}"),
                )),
            };
        }
    }

    async fn release(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        connection: &ConnectionId,
    ) -> Result<bool, ReserveError> {
        let mut invocation = self.scripts.release.prepare_invoke();
        invocation
            .key(self.members_key(space))
            .key(self.counts_key(space))
            .arg(participant.as_str())
            .arg(connection.as_str())
            .arg(&self.lease_prefix);
        let mut conn = self.conn.clone();
        let released: i64 = bounded("release", invocation.invoke_async(&mut conn)).await?;
        Ok(released == 1)
    }

    async fn participants(
        &self,
        space: &SpaceId,
    ) -> Result<Vec<(ParticipantId, ConnectionId)>, ReserveError> {
        let mut invocation = self.scripts.participants.prepare_invoke();
        invocation
            .key(self.members_key(space))
            .arg(&self.lease_prefix);
        let mut conn = self.conn.clone();
        let flat: Vec<String> = bounded("participants", invocation.invoke_async(&mut conn)).await?;
        flat.chunks(2)
            .map(|pair| match pair {
                [p, c] => Ok((stored("participant id", p)?, stored("connection id", c)?)),
                _ => Err(backend("participants", "odd-length answer")),
            })
            .collect()
    }

    async fn holder(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
    ) -> Result<Option<ConnectionId>, ReserveError> {
        let mut invocation = self.scripts.holder.prepare_invoke();
        invocation
            .key(self.members_key(space))
            .arg(participant.as_str())
            .arg(&self.lease_prefix);
        let mut conn = self.conn.clone();
        let holder: Option<String> = bounded("holder", invocation.invoke_async(&mut conn)).await?;
        holder.map(|c| stored("connection id", &c)).transpose()
    }

    async fn record_departure(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
        grace: Duration,
        _now_ms: u64,
    ) -> Result<(), ReserveError> {
        // Redis' key expiry is the clock: the record is gone when the grace is over.
        let key = self.departure_key(space, participant);
        let grace_ms = millis(grace).min(MAX_GRACE_MS);
        let mut command = if grace_ms == 0 {
            redis::cmd("DEL")
        } else {
            redis::cmd("SET")
        };
        command.arg(key);
        if grace_ms > 0 {
            command.arg(digest(credential)).arg("PX").arg(grace_ms);
        }
        let mut conn = self.conn.clone();
        bounded("record departure", command.query_async::<()>(&mut conn)).await
    }

    async fn departed_recently(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
        _now_ms: u64,
    ) -> Result<bool, ReserveError> {
        let mut conn = self.conn.clone();
        let found: i64 = bounded(
            "departed",
            self.scripts
                .departed
                .key(self.departure_key(space, participant))
                .key(self.members_key(space))
                .arg(participant.as_str())
                .arg(digest(credential))
                .arg(&self.lease_prefix)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(found == 1)
    }
}

/// Whether a participant left recently with this credential. KEYS: departure key, space
/// hash. ARGV: participant, credential digest, lease key prefix. 1 if the departure record
/// holds the digest, or if the participant's entry is still there under a dead node (it
/// crashed: nobody wrote a departure, yet the participant left with it). The token's own
/// expiry grace bounds how old such a departure can be.
const DEPARTED: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[2] then
  return 1
end
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry then
  local _, o, d = string.match(entry, '^(%S+) (%S+) (%S+)$')
  if o and d == ARGV[2] and redis.call('EXISTS', ARGV[3] .. o) == 0 then
    return 1
  end
end
return 0
"#;

/// Claim a space's home. KEYS: home key, own lease key, load hash. ARGV: lease key prefix,
/// own owner, own load. Answers `{owner, url}`: a live home's owner and advertised URL; or,
/// when the home was absent or its node dead, the live node with the least load (this one
/// on a tie), now holding the claim. Dead nodes' loads are dropped on the way.
const HOME_CLAIM: &str = r#"
local home, own_lease, loads = KEYS[1], KEYS[2], KEYS[3]
local lease_prefix, owner, own_load = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- A home assigned by another node and not taken up yet reads '{owner} new'.
local value = redis.call('GET', home)
local current, unused = nil, false
if value then
  current = string.match(value, '^(%S+) new$')
  if current then unused = true else current = value end
end
if current and current ~= owner then
  local url = redis.call('GET', lease_prefix .. current)
  if url then
    return {current, url}
  end
end
if redis.call('EXISTS', own_lease) == 0 then
  return {'', 'lapsed'}
end
if current == owner then
  if unused then
    redis.call('SET', home, owner)
    return {owner, 'claimed'}
  end
  return {owner, 'held'}
end
local best, best_load, best_url = owner, own_load, ''
local all = redis.call('HGETALL', loads)
for i = 1, #all, 2 do
  local o, l = all[i], tonumber(all[i + 1]) or 0
  if o ~= owner then
    local url = redis.call('GET', lease_prefix .. o)
    if not url then
      redis.call('HDEL', loads, o)
    elseif url ~= '' and l < best_load then
      best, best_load, best_url = o, l, url
    end
  end
end
if best == owner then
  redis.call('SET', home, owner)
  return {owner, 'claimed'}
end
redis.call('SET', home, best .. ' new')
return {best, best_url}
"#;

/// Which spaces have a live home. KEYS: home keys. ARGV: lease key prefix. Answers 1 or
/// 0 per key.
const LIVE_HOMES: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local owner = value and (string.match(value, '^(%S+) new$') or value)
  if owner and redis.call('EXISTS', ARGV[1] .. owner) == 1 then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// Release a space's home if this node holds it. KEYS: home key. ARGV: own owner.
const HOME_RELEASE: &str = r#"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. ' new' then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

#[async_trait]
impl SpaceHomes for RedisRegistry {
    async fn claim_home(&self, space: &SpaceId) -> Result<Home, ReserveError> {
        for _ in 0..2 {
            let owner = self.owner();
            let mut conn = self.conn.clone();
            let (home, url): (String, String) = bounded(
                "home claim",
                self.scripts
                    .home_claim
                    .key(self.home_key(space))
                    .key(self.lease_key(&owner))
                    .key(self.load_key())
                    .arg(&self.lease_prefix)
                    .arg(&*owner)
                    .arg(self.load.load(std::sync::atomic::Ordering::Relaxed))
                    .invoke_async(&mut conn),
            )
            .await?;
            if home.is_empty() {
                // This node's lease lapsed: renew (a new incarnation) and try once more.
                self.renew().await?;
                continue;
            }
            if home == *owner {
                return Ok(if url == "held" {
                    Home::Here
                } else {
                    Home::Claimed
                });
            }
            let node = home.split(':').next().unwrap_or_default().to_string();
            return Ok(Home::There { node, url });
        }
        Err(ReserveError::Backend("node lease keeps lapsing".into()))
    }

    async fn live_homes(&self, spaces: &[SpaceId]) -> Result<Vec<bool>, ReserveError> {
        if spaces.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.scripts.live_homes.prepare_invoke();
        for s in spaces {
            invocation.key(self.home_key(s));
        }
        invocation.arg(&self.lease_prefix);
        let mut conn = self.conn.clone();
        let live: Vec<i64> = bounded("live homes", invocation.invoke_async(&mut conn)).await?;
        Ok(live.into_iter().map(|l| l == 1).collect())
    }

    async fn release_home(&self, space: &SpaceId) -> Result<bool, ReserveError> {
        let owner = self.owner();
        let mut conn = self.conn.clone();
        let released: i64 = bounded(
            "home release",
            self.scripts
                .home_release
                .key(self.home_key(space))
                .arg(&*owner)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(released == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_alias_keys_are_refused() {
        for ok in ["prod", "eu-west_1.a", &"a".repeat(64)] {
            assert!(check_name("x", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a:b", "{a}", "a b", "a*", &"a".repeat(65)] {
            assert!(check_name("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_stored_as_sha256_hex() {
        // The SHA-256 test vector for "abc" (FIPS 180-2).
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
