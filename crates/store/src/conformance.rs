//! The behaviour every [`Store`] backend must show, as one suite. A backend's tests call
//! [`run_all`] with a fresh `prefix` so the suite can share a database with other runs: every
//! id and environment name it creates starts with that prefix.

use spacegate_proto::{AccessTokenId, EnvironmentId, SessionId, SpaceId};

use crate::{
    AccessTokenRecord, DeleteSpaceOutcome, Environment, Page, Permissions, SigningKeyRecord,
    SpaceRecord, SpaceStatus, Store, StoreError,
};

fn id<T: std::str::FromStr>(prefix: &str, name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    format!("{prefix}{name}")
        .parse()
        .expect("suite ids are valid")
}

/// Runs every check of the suite against `store`.
pub async fn run_all(store: &dyn Store, prefix: &str) {
    environments(store, prefix).await;
    access_tokens(store, prefix).await;
    signing_keys(store, prefix).await;
    spaces(store, prefix).await;
    space_activity(store, prefix).await;
    space_activity_batches(store, prefix).await;
    sweeping_active_spaces(store, prefix).await;
    all_spaces_idle(store, prefix).await;
}

/// What a single node does on start: every active space becomes idle, sessions cleared,
/// and a deletable space again. Runs last: it touches every space of the store.
pub async fn all_spaces_idle(store: &dyn Store, prefix: &str) {
    let a = env(store, prefix, "restart").await;
    let (s1, s2) = (
        space(prefix, "left-active-1", &a.id, 1),
        space(prefix, "left-active-2", &a.id, 2),
    );
    let idle = space(prefix, "was-idle", &a.id, 3);
    for s in [&s1, &s2, &idle] {
        store.insert_space(s).await.expect("insert");
    }
    for s in [&s1, &s2] {
        assert!(
            store
                .mark_space_active(&s.id, &id(prefix, &format!("session-{}", s.id)))
                .await
                .expect("activate")
        );
    }
    assert!(store.mark_all_spaces_idle().await.expect("all idle") >= 2);
    for s in [&s1, &s2, &idle] {
        let got = store
            .space(&a.id, &s.id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(got.status, SpaceStatus::Idle);
        assert_eq!(got.active_session_id, None);
    }
    assert_eq!(store.mark_all_spaces_idle().await.expect("again"), 0);
    assert_eq!(
        store.delete_space(&a.id, &s1.id).await.expect("delete"),
        DeleteSpaceOutcome::Deleted
    );
}

async fn env(store: &dyn Store, prefix: &str, name: &str) -> Environment {
    store
        .ensure_environment(
            &id(prefix, &format!("env-{name}")),
            &format!("{prefix}{name}"),
            100,
        )
        .await
        .expect("ensure environment")
}

pub async fn environments(store: &dyn Store, prefix: &str) {
    store.ping().await.expect("ping");
    let a = env(store, prefix, "a").await;
    assert_eq!(a.name, format!("{prefix}a"));
    // A second ensure with another new id returns the existing environment unchanged.
    let again = store
        .ensure_environment(&id(prefix, "other-id"), &format!("{prefix}a"), 200)
        .await
        .expect("ensure again");
    assert_eq!(again, a);
}

pub async fn access_tokens(store: &dyn Store, prefix: &str) {
    let e = env(store, prefix, "tokens").await;
    let tok = AccessTokenRecord {
        id: id(prefix, "tok1"),
        environment: e.clone(),
        name: Some("ci".into()),
        permissions: Permissions {
            read: true,
            write: false,
        },
        secret_sha256: [7; 32],
        created_at: 1_700_000_000,
    };
    store.insert_access_token(&tok).await.expect("insert token");
    assert_eq!(
        store.access_token(&tok.id).await.expect("get"),
        Some(tok.clone())
    );
    assert!(matches!(
        store.insert_access_token(&tok).await,
        Err(StoreError::Conflict(_))
    ));
    let listed = store.list_access_tokens().await.expect("list");
    assert!(listed.contains(&tok));
    let missing: AccessTokenId = id(prefix, "nope");
    assert_eq!(
        store.access_token(&missing).await.expect("get missing"),
        None
    );
    assert!(store.revoke_access_token(&tok.id).await.expect("revoke"));
    assert!(
        !store
            .revoke_access_token(&tok.id)
            .await
            .expect("revoke twice")
    );
    assert_eq!(
        store.access_token(&tok.id).await.expect("get revoked"),
        None
    );
}

pub async fn signing_keys(store: &dyn Store, prefix: &str) {
    let a = env(store, prefix, "keys-a").await;
    let b = env(store, prefix, "keys-b").await;
    let mut keys = Vec::new();
    for i in 0..5 {
        let k = SigningKeyRecord {
            id: id(prefix, &format!("key{i}")),
            environment_id: a.id.clone(),
            public_key_der: vec![i; 10],
            created_at: 1_700_000_000 + i64::from(i),
        };
        store.insert_signing_key(&k).await.expect("insert key");
        keys.push(k);
    }
    let k0 = &keys[0];
    assert_eq!(
        store.signing_key(&a.id, &k0.id).await.expect("get"),
        Some(k0.clone())
    );
    assert_eq!(
        store.signing_key(&b.id, &k0.id).await.expect("other env"),
        None
    );
    assert_eq!(
        store
            .signing_key_any_environment(&k0.id)
            .await
            .expect("any env"),
        Some(k0.clone())
    );
    assert!(matches!(
        store.insert_signing_key(k0).await,
        Err(StoreError::Conflict(_))
    ));

    let page = |limit, page| Page { limit, page };
    let p1 = store
        .list_signing_keys(&a.id, page(2, 1))
        .await
        .expect("p1");
    let p3 = store
        .list_signing_keys(&a.id, page(2, 3))
        .await
        .expect("p3");
    let p4 = store
        .list_signing_keys(&a.id, page(2, 4))
        .await
        .expect("p4");
    assert_eq!(p1, keys[0..2].to_vec(), "pages are in creation order");
    assert_eq!(p3, keys[4..5].to_vec());
    assert!(p4.is_empty(), "past the end is empty, not an error");
    assert!(
        store
            .list_signing_keys(&b.id, page(10, 1))
            .await
            .expect("b")
            .is_empty()
    );

    assert!(
        !store
            .delete_signing_key(&b.id, &k0.id)
            .await
            .expect("delete from other env")
    );
    assert!(
        store
            .delete_signing_key(&a.id, &k0.id)
            .await
            .expect("delete")
    );
    assert_eq!(
        store
            .signing_key_any_environment(&k0.id)
            .await
            .expect("gone"),
        None
    );
    assert!(
        !store
            .delete_signing_key(&a.id, &k0.id)
            .await
            .expect("delete twice")
    );
}

fn space(prefix: &str, name: &str, env: &EnvironmentId, at: i64) -> SpaceRecord {
    SpaceRecord {
        id: id(prefix, name),
        environment_id: env.clone(),
        passthrough: Some(format!("pt-{name}")),
        status: SpaceStatus::Idle,
        active_session_id: None,
        created_at: at,
    }
}

pub async fn spaces(store: &dyn Store, prefix: &str) {
    let a = env(store, prefix, "spaces-a").await;
    let b = env(store, prefix, "spaces-b").await;
    let mut all = Vec::new();
    for i in 0..3 {
        let s = space(prefix, &format!("sp{i}"), &a.id, 1_700_000_000);
        store.insert_space(&s).await.expect("insert space");
        all.push(s);
    }
    let plain = SpaceRecord {
        passthrough: None,
        ..space(prefix, "plain", &a.id, 5)
    };
    store.insert_space(&plain).await.expect("insert plain");
    all.push(plain.clone());
    assert_eq!(
        store.space(&a.id, &plain.id).await.expect("get"),
        Some(plain.clone())
    );
    assert_eq!(
        store.space(&b.id, &plain.id).await.expect("other env"),
        None
    );
    assert!(matches!(
        store.insert_space(&plain).await,
        Err(StoreError::Conflict(_))
    ));
    let listed = store
        .list_spaces(&a.id, Page { limit: 3, page: 1 })
        .await
        .expect("list");
    assert_eq!(
        listed,
        all[0..3].to_vec(),
        "creation order, not created_at order"
    );
    let second = store
        .list_spaces(&a.id, Page { limit: 3, page: 2 })
        .await
        .expect("list 2");
    assert_eq!(second, vec![plain.clone()]);
    let past = store
        .list_spaces(
            &a.id,
            Page {
                limit: 3,
                page: 1000,
            },
        )
        .await
        .expect("past end");
    assert!(past.is_empty());

    assert_eq!(
        store
            .delete_space(&b.id, &plain.id)
            .await
            .expect("delete other env"),
        DeleteSpaceOutcome::NotFound
    );
    assert_eq!(
        store.delete_space(&a.id, &plain.id).await.expect("delete"),
        DeleteSpaceOutcome::Deleted
    );
    assert_eq!(
        store
            .delete_space(&a.id, &plain.id)
            .await
            .expect("delete twice"),
        DeleteSpaceOutcome::NotFound
    );
    assert_eq!(
        store.space_any_environment(&plain.id).await.expect("gone"),
        None
    );
}

pub async fn space_activity(store: &dyn Store, prefix: &str) {
    let a = env(store, prefix, "activity").await;
    let s = space(prefix, "busy", &a.id, 1);
    store.insert_space(&s).await.expect("insert");
    let s1: SessionId = id(prefix, "session1");
    let s2: SessionId = id(prefix, "session2");

    assert!(store.mark_space_active(&s.id, &s1).await.expect("activate"));
    assert!(
        !store
            .mark_space_active(&s.id, &s2)
            .await
            .expect("activate twice"),
        "an active space keeps its session"
    );
    let got = store
        .space(&a.id, &s.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got.status, SpaceStatus::Active);
    assert_eq!(got.active_session_id, Some(s1.clone()));
    assert_eq!(
        store
            .delete_space(&a.id, &s.id)
            .await
            .expect("delete active"),
        DeleteSpaceOutcome::Active
    );
    assert!(
        store
            .space(&a.id, &s.id)
            .await
            .expect("still there")
            .is_some()
    );

    assert!(store.mark_space_idle(&s.id).await.expect("idle"));
    assert!(!store.mark_space_idle(&s.id).await.expect("idle twice"));
    let got = store
        .space(&a.id, &s.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got.status, SpaceStatus::Idle);
    assert_eq!(got.active_session_id, None);

    assert!(
        store
            .mark_space_active(&s.id, &s2)
            .await
            .expect("reactivate")
    );
    let got = store
        .space(&a.id, &s.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        got.active_session_id,
        Some(s2),
        "a new session per activation"
    );

    let missing: SpaceId = id(prefix, "missing");
    assert!(
        !store
            .mark_space_active(&missing, &s1)
            .await
            .expect("missing")
    );
}

pub async fn space_activity_batches(store: &dyn Store, prefix: &str) {
    let a = env(store, prefix, "batches").await;
    let one = space(prefix, "batch-one", &a.id, 1);
    let two = space(prefix, "batch-two", &a.id, 2);
    store.insert_space(&one).await.expect("insert");
    store.insert_space(&two).await.expect("insert");
    let s1: SessionId = id(prefix, "batch-s1");
    let s2: SessionId = id(prefix, "batch-s2");
    let s3: SessionId = id(prefix, "batch-s3");
    let missing: SpaceId = id(prefix, "batch-missing");
    store
        .record_space_activity(&[
            (one.id.clone(), Some(s1.clone())),
            // Already active: keeps its first session, as mark_space_active would.
            (one.id.clone(), Some(s2.clone())),
            (two.id.clone(), Some(s3.clone())),
            (two.id.clone(), None),
            (missing, Some(s1.clone())),
        ])
        .await
        .expect("batch");
    let got = |s: &SpaceRecord| (s.status, s.active_session_id.clone());
    let one_now = store
        .space(&a.id, &one.id)
        .await
        .expect("get")
        .expect("one");
    let two_now = store
        .space(&a.id, &two.id)
        .await
        .expect("get")
        .expect("two");
    assert_eq!(got(&one_now), (SpaceStatus::Active, Some(s1)));
    assert_eq!(got(&two_now), (SpaceStatus::Idle, None), "applied in order");
    // Idle and active again within one batch is a new session; of two activations of an
    // idle space, the first wins.
    let s4: SessionId = id(prefix, "batch-s4");
    let s5: SessionId = id(prefix, "batch-s5");
    let s6: SessionId = id(prefix, "batch-s6");
    store
        .record_space_activity(&[
            (one.id.clone(), None),
            (two.id.clone(), Some(s5.clone())),
            (one.id.clone(), Some(s4.clone())),
            (two.id.clone(), Some(s6)),
        ])
        .await
        .expect("second batch");
    let now = |space: &SpaceRecord| {
        let (env, id) = (a.id.clone(), space.id.clone());
        async move { store.space(&env, &id).await.expect("get").expect("exists") }
    };
    assert_eq!(got(&now(&one).await), (SpaceStatus::Active, Some(s4)));
    assert_eq!(got(&now(&two).await), (SpaceStatus::Active, Some(s5)));
    store
        .record_space_activity(&[])
        .await
        .expect("an empty batch is fine");
}

/// A cluster's sweep: active spaces are listed in pages with their sessions, and a space is
/// ended only in the session the sweep saw, never in a newer one.
pub async fn sweeping_active_spaces(store: &dyn Store, prefix: &str) {
    let a = env(store, prefix, "sweep").await;
    let names = ["sweep-1", "sweep-2", "sweep-3"];
    let spaces: Vec<SpaceRecord> = names
        .iter()
        .enumerate()
        .map(|(i, n)| space(prefix, n, &a.id, i as i64))
        .collect();
    for s in &spaces {
        store.insert_space(s).await.expect("insert");
    }
    let (s1, s2): (SessionId, SessionId) = (id(prefix, "sweep-s1"), id(prefix, "sweep-s2"));
    assert!(
        store
            .mark_space_active(&spaces[0].id, &s1)
            .await
            .expect("activate")
    );
    assert!(
        store
            .mark_space_active(&spaces[2].id, &s2)
            .await
            .expect("activate")
    );

    // Paged by id; only these spaces are ours (others may be active in a shared store).
    let mut ours = Vec::new();
    let mut after: Option<SpaceId> = None;
    loop {
        let page = store
            .active_spaces(after.as_ref(), 1)
            .await
            .expect("active spaces");
        assert!(page.len() <= 1, "the limit holds");
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        ours.extend(
            page.into_iter()
                .filter(|(id, _)| spaces.iter().any(|s| &s.id == id)),
        );
    }
    assert_eq!(
        ours,
        vec![
            (spaces[0].id.clone(), Some(s1.clone())),
            (spaces[2].id.clone(), Some(s2.clone()))
        ],
        "active ones only, in id order, with their sessions"
    );

    // Another session's end changes nothing; the seen one ends it, once.
    assert!(
        !store
            .end_space_session(&spaces[0].id, Some(&s2))
            .await
            .expect("cas")
    );
    assert!(
        !store
            .end_space_session(&spaces[0].id, None)
            .await
            .expect("cas")
    );
    assert_eq!(
        store
            .space(&a.id, &spaces[0].id)
            .await
            .expect("get")
            .expect("there")
            .status,
        SpaceStatus::Active
    );
    assert!(
        store
            .end_space_session(&spaces[0].id, Some(&s1))
            .await
            .expect("cas")
    );
    assert!(
        !store
            .end_space_session(&spaces[0].id, Some(&s1))
            .await
            .expect("again")
    );
    let ended = store
        .space(&a.id, &spaces[0].id)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(
        (ended.status, ended.active_session_id),
        (SpaceStatus::Idle, None)
    );
    // An idle space has no session to end.
    assert!(
        !store
            .end_space_session(&spaces[1].id, None)
            .await
            .expect("idle")
    );
    assert!(
        store
            .end_space_session(&spaces[2].id, Some(&s2))
            .await
            .expect("cas")
    );
}
