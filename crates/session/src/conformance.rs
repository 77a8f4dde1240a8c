//! What every [`Registry`] backend must do. Backend tests call [`run_all`] with a `prefix`
//! that makes the space ids unique, so a shared Redis can run the suite concurrently.
//! Backends with several nodes (Redis) also run the checks below it that take two
//! registries.
//!
//! Test support only (cargo feature `conformance`): it panics on what it finds wrong, and
//! reads the wall clock for the departure records' `now_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};

use crate::{Registry, Reservation, ReserveError, ReserveMode, ReserveRequest};

fn space(prefix: &str, name: &str) -> SpaceId {
    format!("{prefix}{name}").parse().expect("valid space id")
}

fn pid(name: &str) -> ParticipantId {
    name.parse().expect("valid participant id")
}

fn conn(name: &str) -> ConnectionId {
    name.parse().expect("valid connection id")
}

async fn reserve(
    r: &dyn Registry,
    s: &SpaceId,
    p: &str,
    c: &str,
    credential: &str,
    mode: ReserveMode,
    max: u32,
) -> Result<Reservation, ReserveError> {
    r.reserve(ReserveRequest {
        space: s,
        participant: &pid(p),
        connection: &conn(c),
        credential,
        mode,
        max_participants: max,
    })
    .await
}

/// Milliseconds since the Unix epoch: the `now_ms` the server passes.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

async fn departed(r: &dyn Registry, s: &SpaceId, p: &str, credential: &str) -> bool {
    r.departed_recently(s, &pid(p), credential, now_ms())
        .await
        .expect("departed_recently")
}

async fn depart(r: &dyn Registry, s: &SpaceId, p: &str, credential: &str, grace: Duration) {
    r.record_departure(s, &pid(p), credential, grace, now_ms())
        .await
        .expect("record_departure");
}

async fn sorted_participants(r: &dyn Registry, s: &SpaceId) -> Vec<(ParticipantId, ConnectionId)> {
    let mut members = r.participants(s).await.expect("participants");
    members.sort();
    members
}

/// Every check that one registry (one node) can run.
pub async fn run_all(registry: Arc<dyn Registry>, prefix: &str) {
    duplicates_are_refused(registry.as_ref(), prefix).await;
    release_only_by_the_holder(registry.as_ref(), prefix).await;
    reconnect_replaces_a_stale_connection(registry.as_ref(), prefix).await;
    resume_takes_over_only_what_is_held(registry.as_ref(), prefix).await;
    spaces_have_a_cap(registry.as_ref(), prefix).await;
    holder_names_the_holding_connection(registry.as_ref(), prefix).await;
    departures_are_remembered_with_their_credential(registry.as_ref(), prefix).await;
    departures_expire_after_the_grace(registry.as_ref(), prefix).await;
    concurrent_duplicates_admit_exactly_one(registry, prefix).await;
}

pub async fn duplicates_are_refused(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "dup");
    let other = space(prefix, "dup-other");
    let first = reserve(r, &s, "alice", "c1", "t", ReserveMode::Fresh, 10)
        .await
        .expect("first");
    assert_eq!(
        first,
        Reservation {
            replaced: None,
            participants: 1
        }
    );
    assert_eq!(
        reserve(r, &s, "alice", "c2", "t", ReserveMode::Fresh, 10).await,
        Err(ReserveError::AlreadyJoined)
    );
    // The same participant id in another space is another participant.
    reserve(r, &other, "alice", "c3", "t", ReserveMode::Fresh, 10)
        .await
        .expect("other space");
    let bob = reserve(r, &s, "bob", "c4", "t", ReserveMode::Fresh, 10)
        .await
        .expect("bob");
    assert_eq!(bob.participants, 2);
    let mut members = r.participants(&s).await.expect("list");
    members.sort();
    assert_eq!(
        members,
        vec![(pid("alice"), conn("c1")), (pid("bob"), conn("c4"))]
    );
}

pub async fn release_only_by_the_holder(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "release");
    reserve(r, &s, "alice", "c1", "t", ReserveMode::Fresh, 10)
        .await
        .expect("reserve");
    assert!(
        !r.release(&s, &pid("alice"), &conn("c-other"))
            .await
            .expect("release")
    );
    assert_eq!(
        reserve(r, &s, "alice", "c2", "t", ReserveMode::Fresh, 10).await,
        Err(ReserveError::AlreadyJoined),
        "a release by another connection changed nothing"
    );
    assert!(
        r.release(&s, &pid("alice"), &conn("c1"))
            .await
            .expect("release")
    );
    assert!(
        !r.release(&s, &pid("alice"), &conn("c1"))
            .await
            .expect("release twice")
    );
    assert!(r.participants(&s).await.expect("list").is_empty());
    reserve(r, &s, "alice", "c2", "t", ReserveMode::Fresh, 10)
        .await
        .expect("again after leaving");
}

pub async fn reconnect_replaces_a_stale_connection(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "reconnect");
    reserve(r, &s, "alice", "c1", "cred-a", ReserveMode::Fresh, 10)
        .await
        .expect("first");
    let again = reserve(r, &s, "alice", "c2", "cred-a", ReserveMode::Reconnect, 10)
        .await
        .expect("reconnect");
    assert_eq!(again.replaced, Some(conn("c1")));
    assert_eq!(again.participants, 1);
    // The replaced connection's late release must not evict its successor.
    assert!(
        !r.release(&s, &pid("alice"), &conn("c1"))
            .await
            .expect("late release")
    );
    assert_eq!(
        r.participants(&s).await.expect("list"),
        vec![(pid("alice"), conn("c2"))]
    );
    // Someone else claiming to reconnect as alice is refused.
    assert_eq!(
        reserve(r, &s, "alice", "c3", "cred-b", ReserveMode::Reconnect, 10).await,
        Err(ReserveError::AlreadyJoined)
    );
    // A reconnect after the server noticed the drop is just a join.
    assert!(
        r.release(&s, &pid("alice"), &conn("c2"))
            .await
            .expect("release")
    );
    let fresh = reserve(r, &s, "alice", "c4", "cred-a", ReserveMode::Reconnect, 10)
        .await
        .expect("reconnect after release");
    assert_eq!(fresh.replaced, None);
}

/// `Resume` replaces a connection held with the same credential and never claims an
/// absent participant.
pub async fn resume_takes_over_only_what_is_held(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "resume");
    assert_eq!(
        reserve(r, &s, "host", "c1", "anon", ReserveMode::Resume, 10).await,
        Err(ReserveError::NotHeld)
    );
    assert!(r.participants(&s).await.expect("list").is_empty());
    reserve(r, &s, "host", "c2", "cred-host", ReserveMode::Fresh, 10)
        .await
        .expect("the real host");
    // Another credential cannot take it over.
    assert_eq!(
        reserve(r, &s, "host", "c3", "anon", ReserveMode::Resume, 10).await,
        Err(ReserveError::AlreadyJoined)
    );
    let resumed = reserve(r, &s, "host", "c4", "cred-host", ReserveMode::Resume, 10)
        .await
        .expect("the same credential resumes");
    assert_eq!(resumed.replaced, Some(conn("c2")));
    assert!(
        r.release(&s, &pid("host"), &conn("c4"))
            .await
            .expect("leave")
    );
    assert_eq!(
        reserve(r, &s, "host", "c5", "cred-host", ReserveMode::Resume, 10).await,
        Err(ReserveError::NotHeld)
    );
}

pub async fn spaces_have_a_cap(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "cap");
    for i in 0..3 {
        reserve(
            r,
            &s,
            &format!("p{i}"),
            &format!("c{i}"),
            "t",
            ReserveMode::Fresh,
            3,
        )
        .await
        .expect("under the cap");
    }
    assert_eq!(
        reserve(r, &s, "p3", "c3", "t", ReserveMode::Fresh, 3).await,
        Err(ReserveError::SpaceFull { max: 3 })
    );
    // Replacing a connection does not count twice.
    reserve(r, &s, "p0", "c9", "t", ReserveMode::Reconnect, 3)
        .await
        .expect("replace at the cap");
    assert!(r.release(&s, &pid("p1"), &conn("c1")).await.expect("leave"));
    reserve(r, &s, "p3", "c3", "t", ReserveMode::Fresh, 3)
        .await
        .expect("room again");
}

/// 1000 simultaneous joins with one participant id: exactly one wins.
pub async fn concurrent_duplicates_admit_exactly_one(r: Arc<dyn Registry>, prefix: &str) {
    race(&[r], &space(prefix, "race")).await;
}

/// 1000 simultaneous joins with one participant id, spread over the `nodes` (registries of
/// one cluster): exactly one wins, and every node sees the winner.
pub async fn concurrent_duplicates_across_nodes_admit_exactly_one(
    nodes: &[Arc<dyn Registry>],
    prefix: &str,
) {
    assert!(nodes.len() > 1, "several nodes");
    race(nodes, &space(prefix, "race-nodes")).await;
}

async fn race(nodes: &[Arc<dyn Registry>], s: &SpaceId) {
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let r = nodes[i % nodes.len()].clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            reserve(
                r.as_ref(),
                &s,
                "same",
                &format!("c{i}"),
                "t",
                ReserveMode::Fresh,
                10_000,
            )
            .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => wins += 1,
            Err(ReserveError::AlreadyJoined) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(wins, 1);
    for r in nodes {
        assert_eq!(r.participants(s).await.expect("list").len(), 1);
    }
}

/// The point query agrees with the list: the current connection, none after it left.
pub async fn holder_names_the_holding_connection(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "holder");
    let other = space(prefix, "holder-other");
    let alice = pid("alice");
    assert_eq!(r.holder(&s, &alice).await.expect("holder"), None);
    reserve(r, &s, "alice", "c1", "t", ReserveMode::Fresh, 10)
        .await
        .expect("reserve");
    assert_eq!(
        r.holder(&s, &alice).await.expect("holder"),
        Some(conn("c1"))
    );
    assert_eq!(r.holder(&s, &pid("bob")).await.expect("holder"), None);
    assert_eq!(r.holder(&other, &alice).await.expect("holder"), None);
    reserve(r, &s, "alice", "c2", "t", ReserveMode::Reconnect, 10)
        .await
        .expect("reconnect");
    assert_eq!(
        r.holder(&s, &alice).await.expect("holder"),
        Some(conn("c2"))
    );
    assert!(!r.release(&s, &alice, &conn("c1")).await.expect("late"));
    assert_eq!(
        r.holder(&s, &alice).await.expect("holder"),
        Some(conn("c2"))
    );
    assert!(r.release(&s, &alice, &conn("c2")).await.expect("leave"));
    assert_eq!(r.holder(&s, &alice).await.expect("holder"), None);
}

/// A departure record answers only for its space, participant and credential; the latest
/// departure replaces it, a successful reserve consumes it, a failed one does not.
pub async fn departures_are_remembered_with_their_credential(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "departed");
    let other = space(prefix, "departed-other");
    let long = Duration::from_secs(600);
    assert!(
        !departed(r, &s, "alice", "cred-a").await,
        "nothing recorded"
    );
    depart(r, &s, "alice", "cred-a", long).await;
    assert!(departed(r, &s, "alice", "cred-a").await);
    assert!(
        !departed(r, &s, "alice", "cred-b").await,
        "another credential"
    );
    assert!(!departed(r, &s, "alice", "cred-").await, "a prefix of it");
    assert!(
        !departed(r, &s, "alice", "cred-aa").await,
        "an extension of it"
    );
    assert!(
        !departed(r, &s, "bob", "cred-a").await,
        "another participant"
    );
    assert!(
        !departed(r, &other, "alice", "cred-a").await,
        "another space"
    );

    depart(r, &s, "alice", "cred-b", long).await;
    assert!(!departed(r, &s, "alice", "cred-a").await, "replaced");
    assert!(departed(r, &s, "alice", "cred-b").await);

    // A refused claim leaves the record; the participant coming back consumes it.
    assert_eq!(
        reserve(r, &s, "alice", "c0", "cred-b", ReserveMode::Resume, 10).await,
        Err(ReserveError::NotHeld)
    );
    assert!(
        departed(r, &s, "alice", "cred-b").await,
        "kept after a refusal"
    );
    reserve(r, &s, "alice", "c1", "cred-b", ReserveMode::Reconnect, 10)
        .await
        .expect("back within the grace");
    assert!(
        !departed(r, &s, "alice", "cred-b").await,
        "consumed by the return"
    );
    assert!(
        r.release(&s, &pid("alice"), &conn("c1"))
            .await
            .expect("leave")
    );

    // A zero grace records nothing, and forgets what was recorded.
    depart(r, &s, "alice", "cred-b", long).await;
    depart(r, &s, "alice", "cred-b", Duration::ZERO).await;
    assert!(!departed(r, &s, "alice", "cred-b").await, "zero grace");
}

/// A departure is recent for its grace, and then no longer.
pub async fn departures_expire_after_the_grace(r: &dyn Registry, prefix: &str) {
    let s = space(prefix, "departed-expiry");
    let grace = Duration::from_millis(400);
    let recorded = Instant::now();
    depart(r, &s, "carol", "cred-c", grace).await;
    assert!(departed(r, &s, "carol", "cred-c").await, "within the grace");
    let deadline = recorded + grace + Duration::from_secs(2);
    while departed(r, &s, "carol", "cred-c").await {
        assert!(
            Instant::now() < deadline,
            "still recent {:?} after a grace of {grace:?}",
            recorded.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not before the grace was over (less the wall clock's jitter against Instant).
    assert!(
        recorded.elapsed() + Duration::from_millis(50) >= grace,
        "expired after {:?} of a {grace:?} grace",
        recorded.elapsed()
    );
}

/// Two nodes `a` and `b` of one cluster with a lease of `lease`: `a`'s participants are
/// held across the cluster for as long as `a` renews its lease (longer than one lease);
/// a reconnect may move one to `b`; once `stop_a` has made `a` stop renewing (as a crashed
/// node does), its participants are free on `b` within the lease and a margin, and count
/// no more toward the cap.
pub async fn node_death_frees_its_participants(
    a: Arc<dyn Registry>,
    b: Arc<dyn Registry>,
    stop_a: impl FnOnce(),
    lease: Duration,
    prefix: &str,
) {
    let s = space(prefix, "node-death");
    let (a, b) = (a.as_ref(), b.as_ref());
    for (p, c) in [("alice", "a1"), ("bob", "a2"), ("dave", "a3")] {
        reserve(a, &s, p, c, &format!("cred-{p}"), ReserveMode::Fresh, 3)
            .await
            .expect("node a admits");
    }
    assert_eq!(
        b.holder(&s, &pid("alice")).await.expect("holder"),
        Some(conn("a1"))
    );
    assert_eq!(
        reserve(b, &s, "alice", "b1", "cred-alice", ReserveMode::Fresh, 3).await,
        Err(ReserveError::AlreadyJoined),
        "node b sees node a's participant"
    );
    assert_eq!(
        reserve(b, &s, "carol", "b2", "cred-carol", ReserveMode::Fresh, 3).await,
        Err(ReserveError::SpaceFull { max: 3 }),
        "node a's participants count toward the cap on node b"
    );
    // A reconnect that lands on the other node takes the participant over.
    let moved = reserve(b, &s, "bob", "b3", "cred-bob", ReserveMode::Reconnect, 3)
        .await
        .expect("reconnect on node b");
    assert_eq!(
        moved,
        Reservation {
            replaced: Some(conn("a2")),
            participants: 3
        }
    );
    assert!(
        !a.release(&s, &pid("bob"), &conn("a2"))
            .await
            .expect("late release"),
        "node a's late release of the replaced connection evicts nothing"
    );

    // While node a renews, its participants outlive one lease.
    tokio::time::sleep(lease + lease / 2).await;
    assert_eq!(
        reserve(b, &s, "alice", "b4", "cred-alice", ReserveMode::Fresh, 3).await,
        Err(ReserveError::AlreadyJoined),
        "a live node's lease is renewed"
    );

    stop_a();
    let died = Instant::now();
    let deadline = died + lease + Duration::from_secs(2);
    // The reads see the dead node's participants gone, before any write has cleaned up
    // after it.
    loop {
        let members = sorted_participants(b, &s).await;
        if members == vec![(pid("bob"), conn("b3"))] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{:?} after node a stopped, node b still lists {members:?}",
            died.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in ["alice", "dave"] {
        assert_eq!(b.holder(&s, &pid(p)).await.expect("holder"), None, "{p}");
    }
    let freed = reserve(b, &s, "alice", "b5", "someone-else", ReserveMode::Fresh, 3)
        .await
        .expect("alice is free");
    // Alice and bob, both on node b; dave died with node a.
    assert_eq!(
        freed,
        Reservation {
            replaced: None,
            participants: 2
        }
    );
    assert_eq!(
        sorted_participants(b, &s).await,
        vec![(pid("alice"), conn("b5")), (pid("bob"), conn("b3"))]
    );
    assert_eq!(b.holder(&s, &pid("dave")).await.expect("holder"), None);
    reserve(b, &s, "carol", "b6", "cred-carol", ReserveMode::Fresh, 3)
        .await
        .expect("a dead node's participants leave room");
    assert_eq!(
        reserve(b, &s, "erin", "b7", "cred-erin", ReserveMode::Fresh, 3).await,
        Err(ReserveError::SpaceFull { max: 3 }),
        "the cap counts the live participants exactly"
    );
}

/// Two registries of different clusters sharing one backend: neither sees the other's
/// participants or departures.
pub async fn clusters_do_not_see_each_other(a: &dyn Registry, b: &dyn Registry, prefix: &str) {
    let s = space(prefix, "clusters");
    reserve(a, &s, "alice", "a1", "t", ReserveMode::Fresh, 1)
        .await
        .expect("cluster a");
    reserve(b, &s, "alice", "b1", "t", ReserveMode::Fresh, 1)
        .await
        .expect("cluster b: same space and participant, and its own cap");
    assert_eq!(
        sorted_participants(a, &s).await,
        vec![(pid("alice"), conn("a1"))]
    );
    assert_eq!(
        sorted_participants(b, &s).await,
        vec![(pid("alice"), conn("b1"))]
    );
    assert_eq!(
        b.holder(&s, &pid("alice")).await.expect("holder"),
        Some(conn("b1"))
    );
    assert!(
        !b.release(&s, &pid("alice"), &conn("a1"))
            .await
            .expect("release")
    );
    depart(a, &s, "carol", "c", Duration::from_secs(600)).await;
    assert!(departed(a, &s, "carol", "c").await);
    assert!(!departed(b, &s, "carol", "c").await);
}
