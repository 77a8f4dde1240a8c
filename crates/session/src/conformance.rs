//! What every [`Registry`] backend must do. Backend tests call [`run_all`] with a `prefix`
//! that makes the space ids unique, so a shared Redis can run the suite concurrently.

use std::sync::Arc;

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

pub async fn run_all(registry: Arc<dyn Registry>, prefix: &str) {
    duplicates_are_refused(registry.as_ref(), prefix).await;
    release_only_by_the_holder(registry.as_ref(), prefix).await;
    reconnect_replaces_a_stale_connection(registry.as_ref(), prefix).await;
    resume_takes_over_only_what_is_held(registry.as_ref(), prefix).await;
    spaces_have_a_cap(registry.as_ref(), prefix).await;
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
    let s = space(prefix, "race");
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let r = r.clone();
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
    assert_eq!(r.participants(&s).await.expect("list").len(), 1);
}
