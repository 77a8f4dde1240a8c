//! `/metrics` on its own listener: scraped over HTTP, and the figures follow what happens.

mod common;

use std::time::Duration;

use common::Fx;
use spacegate_client::{ClientError, JoinOptions, Session};
use spacegate_proto::Role;

/// The value of one sample (`name` may include labels) in a metrics text; 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(url: &str) -> String {
    let res = reqwest::get(url).await.expect("scrape");
    assert_eq!(res.status(), 200);
    let content_type = res.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    res.text().await.expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_joins_refusals_and_leaves() {
    let fx = Fx::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/metrics", listener.local_addr().expect("addr"));
    let gateway = fx.s.state.gateway.clone();
    tokio::spawn(async move {
        spacegate_server::metrics::serve(&gateway, listener, std::future::pending())
            .await
            .expect("metrics listener");
    });

    let before = scrape(&url).await;
    assert_eq!(sample(&before, "spacegate_connected_participants"), 0.0);
    assert!(
        sample(&before, "process_resident_memory_bytes") > 0.0,
        "{before}"
    );
    let joined = "spacegate_joins_total{outcome=\"joined\"}";
    let duplicate = "spacegate_joins_total{outcome=\"duplicate\"}";
    let invalid = "spacegate_joins_total{outcome=\"invalid_token\"}";

    let options = JoinOptions::default();
    let token = fx.token(Some("alice"), Role::Publisher);
    let alice = Session::join(&fx.s.ws_base(), &token, &options)
        .await
        .expect("alice joins");
    let again = Session::join(&fx.s.ws_base(), &token, &options).await;
    assert!(matches!(again, Err(ClientError::Rejected { .. })));
    let bad = Session::join(&fx.s.ws_base(), "not-a-jwt", &options).await;
    assert!(matches!(bad, Err(ClientError::Rejected { .. })));

    let during = scrape(&url).await;
    assert_eq!(
        sample(&during, joined) - sample(&before, joined),
        1.0,
        "{during}"
    );
    assert_eq!(sample(&during, duplicate) - sample(&before, duplicate), 1.0);
    assert_eq!(sample(&during, invalid) - sample(&before, invalid), 1.0);
    assert_eq!(sample(&during, "spacegate_connected_participants"), 1.0);
    assert_eq!(sample(&during, "spacegate_live_spaces"), 1.0);
    assert_eq!(
        sample(&during, "spacegate_join_duration_seconds_count")
            - sample(&before, "spacegate_join_duration_seconds_count"),
        1.0
    );
    for stage in ["verify", "registry", "space"] {
        let name = format!("spacegate_join_stage_seconds_count{{stage=\"{stage}\"}}");
        assert!(
            sample(&during, &name) >= 1.0,
            "no {stage} stage in {during}"
        );
    }
    // A participant of a space without media is not in the media plane at all.
    assert_eq!(sample(&during, "spacegate_sfu_members"), 0.0, "{during}");
    assert_eq!(
        sample(&during, "spacegate_media_queue_wait_seconds_count"),
        0.0
    );
    assert!(sample(&during, "process_cpu_seconds_total") > 0.0);

    alice.abort_with_close().await;
    // The leave and the space going idle are asynchronous; wait for them (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let after = scrape(&url).await;
        let settled = sample(&after, "spacegate_connected_participants") == 0.0
            && sample(&after, "spacegate_live_spaces") == 0.0
            && sample(&after, "spacegate_sfu_members") == 0.0
            // At least one batch: the join's activation and the leave's idling may share
            // one when they fall in the same gathering window.
            && sample(&after, "spacegate_store_write_seconds_count") >= 1.0;
        if settled {
            assert_eq!(sample(&after, "spacegate_store_write_errors_total"), 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled: {after}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
