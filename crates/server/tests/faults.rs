//! A store that is slow or full under a running server: REST requests get a prompt 503 or
//! 507 that says whether retrying helps, `/readyz` answers instead of hanging, joins with
//! cached keys go on, and nothing acknowledged is lost.

mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use common::Fx;
use reqwest::Method;
use serde_json::{Value, json};
use spacegate_client::{JoinOptions, Session};
use spacegate_proto::Role;
use spacegate_server::gateway::GatewayConfig;
use spacegate_store::SqliteOptions;
use sqlx::ConnectOptions as _;

async fn create_space(fx: &Fx, passthrough: &str) -> reqwest::Response {
    fx.s.req(Method::POST, "/video/v1/spaces")
        .json(&json!({ "passthrough": passthrough }))
        .send()
        .await
        .expect("send")
}

async fn join(fx: &Fx, participant: &str) -> Session {
    Session::join(
        &fx.s.ws_base(),
        &fx.token(Some(participant), Role::Publisher),
        &JoinOptions::default(),
    )
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_gets_prompt_503s_and_joins_with_cached_keys_go_on() {
    let fx = Fx::with_store(
        GatewayConfig {
            request_timeout: Duration::from_millis(500),
            ..Default::default()
        },
        SqliteOptions {
            busy_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    // Acknowledged before the fault: must survive it.
    let kept = create_space(&fx, "before").await;
    assert_eq!(kept.status(), 201);
    let kept: Value = kept.json().await.expect("json");
    // The key and the space are cached by a first join.
    join(&fx, "warm").await.leave().await;

    // Another process takes the database's write lock and holds it (a backup tool, a
    // stuck CLI, a stalled disk look the same from here).
    let db = fx.s.dir.path().join("spacegate.db");
    let mut holder = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite:")
        .expect("options")
        .filename(&db)
        .connect()
        .await
        .expect("second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("write lock");

    let started = Instant::now();
    let res = create_space(&fx, "during").await;
    let took = started.elapsed();
    assert_eq!(res.status(), 503);
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    assert_eq!(
        res.headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("true"),
        "a busy store is worth retrying"
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"]["type"], "service_unavailable");
    // Reads still work, and a join with a cached key goes through.
    let got =
        fx.s.req(
            Method::GET,
            &format!(
                "/video/v1/spaces/{}",
                kept["data"]["id"].as_str().expect("id")
            ),
        )
        .send()
        .await
        .expect("get");
    assert_eq!(got.status(), 200);
    let during = join(&fx, "during").await;
    // The writer of space status cannot write: /readyz says so, promptly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        let ready =
            fx.s.http
                .get(fx.s.url("/readyz"))
                .send()
                .await
                .expect("readyz");
        assert!(started.elapsed() < Duration::from_secs(3), "readyz hung");
        if ready.status() == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never reported the stuck store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The lock goes: everything catches up, and the status the join made is written.
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release");
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value =
            fx.s.req(Method::GET, &format!("/video/v1/spaces/{}", fx.space))
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
        let ready =
            fx.s.http
                .get(fx.s.url("/readyz"))
                .send()
                .await
                .expect("readyz");
        if v["data"]["status"] == "active" && ready.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never caught up: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(create_space(&fx, "after").await.status(), 201);
    during.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_answers_507_not_worth_retrying_and_reads_and_joins_go_on() {
    let fx = Fx::with_store(
        GatewayConfig::default(),
        SqliteOptions {
            max_bytes: Some(256 * 1024),
            ..Default::default()
        },
    )
    .await;
    join(&fx, "warm").await.leave().await;
    let mut created = Vec::new();
    let full = loop {
        let res = create_space(&fx, &"x".repeat(255)).await;
        match res.status().as_u16() {
            201 => {
                let v: Value = res.json().await.expect("json");
                created.push(v["data"]["id"].as_str().expect("id").to_string());
                assert!(created.len() < 20_000, "the cap never bit");
            }
            _ => break res,
        }
    };
    assert_eq!(full.status(), 507);
    assert_eq!(
        full.headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    let body: Value = full.json().await.expect("json");
    assert_eq!(body["error"]["type"], "insufficient_storage");
    // Every acknowledged space is there; joins with cached keys go on.
    for id in created.iter().step_by(50) {
        let got =
            fx.s.req(Method::GET, &format!("/video/v1/spaces/{id}"))
                .send()
                .await
                .expect("get");
        assert_eq!(got.status(), 200, "{id}");
    }
    join(&fx, "still").await.leave().await;
}
