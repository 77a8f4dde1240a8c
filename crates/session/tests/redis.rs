//! `RedisRegistry` against a real Redis: the conformance suite and the cluster checks on
//! the shared one at 127.0.0.1:6379 (each test in a cluster of its own, named at random,
//! its keys deleted at the end), and the loss of Redis on a `redis-server` child of its
//! own. Without a Redis or a `redis-server` the tests say SKIP and pass, unless
//! `SPACEGATE_REQUIRE_ALL=1`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};
use spacegate_session::{
    LeaseRenewal, RedisRegistry, Registry, ReserveError, ReserveMode, ReserveRequest, conformance,
};
use tokio::process::{Child, Command};

const SHARED: &str = "redis://127.0.0.1:6379";

/// Says why the test cannot run here; under `SPACEGATE_REQUIRE_ALL=1`, fails it instead.
fn skip(reason: &str) {
    if std::env::var("SPACEGATE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("SPACEGATE_REQUIRE_ALL=1, but {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// A cluster name no other run (or test) uses.
fn unique_cluster(tag: &str) -> String {
    let mut bytes = [0u8; 6];
    aws_lc_rs::rand::fill(&mut bytes).expect("randomness");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sgtest-{tag}-{}-{hex}", std::process::id())
}

/// Deletes a cluster's keys from the shared Redis when the test ends, even by a panic.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(SHARED) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let pattern = format!("{{{}}}:*", self.0);
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// Whether the shared Redis takes connections; if not, the test is skipped.
async fn shared_redis_is_up() -> bool {
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect("127.0.0.1:6379"),
    )
    .await;
    match probe {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            skip(&format!("no Redis at 127.0.0.1:6379 ({e})"));
            false
        }
        Err(_) => {
            skip("no Redis at 127.0.0.1:6379 (connect timed out)");
            false
        }
    }
}

async fn node(url: &str, cluster: &str, node_id: &str, lease: Duration) -> Arc<RedisRegistry> {
    Arc::new(
        RedisRegistry::connect(url, cluster, node_id, lease)
            .await
            .expect("connect"),
    )
}

fn space(name: &str) -> SpaceId {
    name.parse().expect("space id")
}

fn pid(name: &str) -> ParticipantId {
    name.parse().expect("participant id")
}

fn conn(name: &str) -> ConnectionId {
    name.parse().expect("connection id")
}

async fn fresh(r: &dyn Registry, s: &SpaceId, p: &str, c: &str) -> Result<u32, ReserveError> {
    r.reserve(ReserveRequest {
        space: s,
        participant: &pid(p),
        connection: &conn(c),
        credential: "cred",
        mode: ReserveMode::Fresh,
        max_participants: 100,
    })
    .await
    .map(|r| r.participants)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_registry_passes_the_conformance_suite() {
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("suite");
    let _cleanup = Cleanup(cluster.clone());
    let registry = node(SHARED, &cluster, "n1", RedisRegistry::DEFAULT_LEASE).await;
    let keeper = registry.spawn_lease_keeper(Duration::MAX);
    conformance::run_all(registry.clone(), "t-").await;
    keeper.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_admit_one_of_concurrent_duplicates() {
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("race");
    let _cleanup = Cleanup(cluster.clone());
    let a = node(SHARED, &cluster, "a", RedisRegistry::DEFAULT_LEASE).await;
    let b = node(SHARED, &cluster, "b", RedisRegistry::DEFAULT_LEASE).await;
    conformance::concurrent_duplicates_across_nodes_admit_exactly_one(&[a, b], "t-").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_participants_are_free_after_its_lease() {
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("death");
    let _cleanup = Cleanup(cluster.clone());
    let lease = Duration::from_millis(500);
    let a = node(SHARED, &cluster, "a", lease).await;
    let b = node(SHARED, &cluster, "b", lease).await;
    let keeper_a = a.spawn_lease_keeper(Duration::MAX);
    let keeper_b = b.spawn_lease_keeper(Duration::MAX);
    // Node a "crashes": its lease keeper stops, as it would with the process.
    let stop_a = move || keeper_a.abort();
    conformance::node_death_frees_its_participants(a, b, stop_a, lease, "t-").await;
    keeper_b.abort();
}

/// A node whose lease lapsed (it stalled longer than the lease) does not get its old
/// entries back when it renews: others may have taken its participants over meanwhile.
/// It reserves again under a new lease, by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_is_replaced_not_revived() {
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("lapse");
    let _cleanup = Cleanup(cluster.clone());
    let lease = Duration::from_millis(300);
    let a = node(SHARED, &cluster, "a", lease).await;
    let b = node(SHARED, &cluster, "b", lease).await;
    let keeper_b = b.spawn_lease_keeper(Duration::MAX);
    let s = space("lapse");
    fresh(a.as_ref(), &s, "alice", "a1").await.expect("alice");
    fresh(a.as_ref(), &s, "dave", "a2").await.expect("dave");
    assert_eq!(a.renew().await, Ok(LeaseRenewal::Renewed));

    // Node a stalls past its lease; alice goes to node b.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    fresh(b.as_ref(), &s, "alice", "b1")
        .await
        .expect("alice is free");

    // The stalled node's renewal finds the lease gone and takes a new one.
    assert_eq!(a.renew().await, Ok(LeaseRenewal::Lapsed));
    assert_eq!(a.renew().await, Ok(LeaseRenewal::Renewed));
    assert_eq!(
        b.holder(&s, &pid("alice")).await.expect("holder"),
        Some(conn("b1"))
    );
    assert_eq!(
        b.holder(&s, &pid("dave")).await.expect("holder"),
        None,
        "the old lease's entries stay void"
    );
    assert_eq!(fresh(a.as_ref(), &s, "erin", "a3").await, Ok(2));
    assert_eq!(
        b.holder(&s, &pid("erin")).await.expect("holder"),
        Some(conn("a3"))
    );

    // A reserve that finds its node's lease lapsed takes a new one and goes through.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(fresh(a.as_ref(), &s, "frank", "a4").await, Ok(2));
    assert_eq!(
        b.participants(&s).await.expect("participants").len(),
        2,
        "alice on b and frank on a; erin lapsed with a's second lease"
    );
    // The reserves that met dead owners removed their entries and counts from Redis.
    let mut raw = redis::Client::open(SHARED)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("raw connection");
    let stored: usize = redis::cmd("HLEN")
        .arg(format!("{{{cluster}}}:space:lapse"))
        .query(&mut raw)
        .expect("HLEN");
    assert_eq!(stored, 2, "dave and erin are gone, not just hidden");
    let owners: usize = redis::cmd("HLEN")
        .arg(format!("{{{cluster}}}:count:lapse"))
        .query(&mut raw)
        .expect("HLEN");
    assert_eq!(
        owners, 2,
        "one count for node b, one for node a's third lease"
    );
    keeper_b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_on_one_redis_do_not_see_each_other() {
    if !shared_redis_is_up().await {
        return;
    }
    let (one, two) = (unique_cluster("one"), unique_cluster("two"));
    let _cleanup = (Cleanup(one.clone()), Cleanup(two.clone()));
    let a = node(SHARED, &one, "n", RedisRegistry::DEFAULT_LEASE).await;
    let b = node(SHARED, &two, "n", RedisRegistry::DEFAULT_LEASE).await;
    conformance::clusters_do_not_see_each_other(a.as_ref(), b.as_ref(), "t-").await;
}

#[tokio::test]
async fn bad_settings_are_refused_and_errors_keep_the_password_out() {
    for (cluster, node_id, lease) in [
        ("a:b", "n", RedisRegistry::DEFAULT_LEASE),
        ("{a}", "n", RedisRegistry::DEFAULT_LEASE),
        ("c", "n 1", RedisRegistry::DEFAULT_LEASE),
        ("c", "", RedisRegistry::DEFAULT_LEASE),
        ("c", "n", Duration::from_millis(10)),
        ("c", "n", Duration::from_secs(3600)),
    ] {
        assert!(
            matches!(
                RedisRegistry::connect(SHARED, cluster, node_id, lease).await,
                Err(ReserveError::Backend(_))
            ),
            "{cluster:?} {node_id:?} {lease:?}"
        );
    }
    // Port 1 refuses at once; the URL's password is not in the answer.
    let started = Instant::now();
    let err = RedisRegistry::connect(
        "redis://:hunter2@127.0.0.1:1",
        "c",
        "n",
        RedisRegistry::DEFAULT_LEASE,
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let err = RedisRegistry::connect("http://:hunter2@x", "c", "n", RedisRegistry::DEFAULT_LEASE)
        .await
        .expect_err("not a redis URL");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

/// A `redis-server` of the test's own, on a free port, without persistence.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// None (after saying why) if there is no `redis-server` to run.
    async fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut own = Self { port, child: None };
        match own.spawn() {
            Ok(()) => Some(own),
            Err(e) => {
                skip(&format!("cannot run redis-server ({e})"));
                None
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until it takes connections.
    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// SIGSTOP or SIGCONT: a Redis that keeps its connections but answers nothing.
    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("redis-server runs");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {signal}");
    }
}

/// Reserves a new participant and answers how long that took; every failure must be
/// `Backend`.
async fn timed_reserve(r: &RedisRegistry, p: &str) -> (Result<u32, ReserveError>, Duration) {
    let started = Instant::now();
    let outcome = fresh(r, &space("loss"), p, &format!("c-{p}")).await;
    if let Err(e) = &outcome {
        assert!(matches!(e, ReserveError::Backend(_)), "{e:?}");
    }
    (outcome, started.elapsed())
}

async fn until_reserved(r: &RedisRegistry, p: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match timed_reserve(r, p).await.0 {
            Ok(_) => return started.elapsed(),
            Err(e) => {
                assert!(started.elapsed() < within, "not back after {within:?}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A Redis that hangs or goes away fails joins within the timeout, never hangs them; the
/// registry is back by itself when Redis is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_fails_fast_and_recovers() {
    let Some(mut redis) = OwnRedis::start().await else {
        return;
    };
    redis.ready().await;
    let registry = node(&redis.url(), "loss", "n", RedisRegistry::DEFAULT_LEASE).await;
    assert_eq!(timed_reserve(&registry, "p0").await.0, Ok(1));

    // Hung: the connection stays open, nothing answers.
    redis.signal("-STOP");
    for p in ["p1", "p2"] {
        let (outcome, took) = timed_reserve(&registry, p).await;
        assert!(outcome.is_err(), "a stopped Redis answered");
        assert!(
            took < Duration::from_secs(3),
            "a hung Redis held a join {took:?}"
        );
    }
    assert!(registry.ping().await.is_err());
    redis.signal("-CONT");
    let back = until_reserved(&registry, "p3", Duration::from_secs(10)).await;
    eprintln!("back {back:?} after SIGCONT");

    // Gone: connections refused.
    redis.kill().await;
    for p in ["p4", "p5", "p6"] {
        let (outcome, took) = timed_reserve(&registry, p).await;
        assert!(outcome.is_err(), "a dead Redis answered");
        assert!(
            took < Duration::from_secs(3),
            "a dead Redis held a join {took:?}"
        );
    }
    assert!(matches!(
        registry.holder(&space("loss"), &pid("p0")).await,
        Err(ReserveError::Backend(_))
    ));
    assert!(registry.ping().await.is_err());

    // Back, empty (no persistence): the lease is gone too, and the registry takes a new
    // one by itself.
    redis.spawn().expect("restart redis-server");
    redis.ready().await;
    let back = until_reserved(&registry, "p7", Duration::from_secs(10)).await;
    eprintln!("back {back:?} after the restart");
    registry.ping().await.expect("ping");
    assert_eq!(registry.renew().await, Ok(LeaseRenewal::Renewed));
    assert_eq!(
        registry
            .holder(&space("loss"), &pid("p7"))
            .await
            .expect("holder"),
        Some(conn("c-p7"))
    );
    redis.kill().await;
}

/// One home per space: the first node to ask claims it, every other node is told where it
/// is (with the URL it advertised), only the holder can release it, and when the holder
/// dies the next node to ask takes it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_has_one_home_which_moves_only_when_its_node_dies() {
    use spacegate_session::{Home, SpaceHomes};
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("home");
    let _cleanup = Cleanup(cluster.clone());
    let lease = Duration::from_millis(500);
    let a = node(SHARED, &cluster, "a", lease).await;
    let b = node(SHARED, &cluster, "b", lease).await;
    a.advertise("ws://a.internal:1").await.expect("advertise a");
    b.advertise("ws://b.internal:2").await.expect("advertise b");
    let keeper_a = a.spawn_lease_keeper(Duration::MAX);
    let keeper_b = b.spawn_lease_keeper(Duration::MAX);
    let s = space("homed");

    // Both ask at once: exactly one gets it.
    let (ha, hb) = tokio::join!(a.claim_home(&s), b.claim_home(&s));
    let (ha, hb) = (ha.expect("a asks"), hb.expect("b asks"));
    let (holder, other, other_home) = match (&ha, &hb) {
        (Home::Claimed, there @ Home::There { .. }) => (&a, &b, there.clone()),
        (there @ Home::There { .. }, Home::Claimed) => (&b, &a, there.clone()),
        _ => panic!("not exactly one home: {ha:?} {hb:?}"),
    };
    let holder_name = holder.node_id().to_string();
    assert_eq!(
        other_home,
        Home::There {
            node: holder_name.clone(),
            url: format!(
                "ws://{holder_name}.internal:{}",
                if holder_name == "a" { 1 } else { 2 }
            ),
        }
    );
    assert_eq!(holder.claim_home(&s).await.expect("again"), Home::Here);
    assert!(
        !other.release_home(&s).await.expect("release"),
        "not its claim"
    );
    assert_eq!(
        other
            .live_homes(&[s.clone(), space("never-homed")])
            .await
            .expect("live homes"),
        vec![true, false]
    );
    assert_eq!(other.claim_home(&s).await.expect("still"), other_home);

    // Released by its holder, the home goes to whoever asks next.
    assert!(holder.release_home(&s).await.expect("release"));
    assert_eq!(other.claim_home(&s).await.expect("claim"), Home::Claimed);
    assert!(other.release_home(&s).await.expect("release"));

    // a holds it and dies: once its lease has run out, b takes the space over.
    assert_eq!(a.claim_home(&s).await.expect("a claims"), Home::Claimed);
    keeper_a.abort();
    tokio::time::sleep(lease * 2).await;
    assert_eq!(
        b.live_homes(std::slice::from_ref(&s)).await.expect("live"),
        vec![false],
        "a dead node's home is no home"
    );
    let started = Instant::now();
    loop {
        match b.claim_home(&s).await.expect("b asks") {
            Home::Claimed => break,
            Home::Here => panic!("b never held it"),
            Home::There { node, .. } => {
                assert_eq!(node, "a");
                assert!(
                    started.elapsed() < lease * 4,
                    "still homed on a dead node after {:?}",
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    keeper_b.abort();
}

/// A space without a home goes to the live node with the least load, whichever node asks;
/// a tie keeps it on the node that asks; a dead node's load does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_spaces_are_homed_on_the_least_loaded_live_node() {
    use spacegate_session::{Home, SpaceHomes};
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("load");
    let _cleanup = Cleanup(cluster.clone());
    let lease = Duration::from_millis(500);
    let a = node(SHARED, &cluster, "a", lease).await;
    let b = node(SHARED, &cluster, "b", lease).await;
    a.advertise("ws://a.internal:1").await.expect("advertise a");
    b.advertise("ws://b.internal:2").await.expect("advertise b");
    let keeper_a = a.spawn_lease_keeper(Duration::MAX);
    let keeper_b = b.spawn_lease_keeper(Duration::MAX);

    // Equal loads: the asking node keeps it.
    assert_eq!(
        a.claim_home(&space("tie")).await.expect("claim"),
        Home::Claimed
    );

    // a is busy: a's next new space goes to b, and b hosts it when asked itself.
    a.set_load(50);
    b.set_load(3);
    a.renew().await.expect("renew a");
    b.renew().await.expect("renew b");
    let busy = space("busy");
    assert_eq!(
        a.claim_home(&busy).await.expect("claim"),
        Home::There {
            node: "b".into(),
            url: "ws://b.internal:2".into()
        }
    );
    // Assigned by a, taken up by b: a fresh claim for b, then held.
    assert_eq!(b.claim_home(&busy).await.expect("claim"), Home::Claimed);
    assert_eq!(b.claim_home(&busy).await.expect("claim"), Home::Here);

    // b dies: its low load no longer attracts spaces.
    keeper_b.abort();
    tokio::time::sleep(lease * 2).await;
    assert_eq!(
        a.claim_home(&space("after")).await.expect("claim"),
        Home::Claimed
    );
    keeper_a.abort();
}

/// A node that resigns (a clean shutdown) frees everything it held at once: its
/// participants and its space homes go to the next node that asks, without waiting for
/// the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resigned_node_frees_its_participants_and_homes_at_once() {
    use spacegate_session::{Home, SpaceHomes};
    if !shared_redis_is_up().await {
        return;
    }
    let cluster = unique_cluster("resign");
    let _cleanup = Cleanup(cluster.clone());
    let lease = Duration::from_secs(60);
    let a = node(SHARED, &cluster, "a", lease).await;
    let b = node(SHARED, &cluster, "b", lease).await;
    a.advertise("ws://a.internal:1").await.expect("advertise");
    let s = space("resigned");
    fresh(a.as_ref(), &s, "alice", "c1")
        .await
        .expect("alice on a");
    assert_eq!(a.claim_home(&s).await.expect("claim"), Home::Claimed);
    assert!(matches!(
        fresh(b.as_ref(), &s, "alice", "c2").await,
        Err(ReserveError::AlreadyJoined)
    ));
    a.resign().await.expect("resign");
    fresh(b.as_ref(), &s, "alice", "c2")
        .await
        .expect("alice is free at once");
    assert_eq!(b.claim_home(&s).await.expect("claim"), Home::Claimed);
}
