//! What the nodes of a cluster tell each other outside the registry: changes to what the
//! join check caches (a deleted signing key or space, a new key), on one Redis pub/sub
//! channel per cluster, so a key deleted through any node stops admitting joins on every
//! node within milliseconds instead of living on in their caches.
//!
//! Pub/sub delivers only to whoever is subscribed at that moment: a node whose
//! subscription dropped may have missed changes, so after every (re)subscription it
//! forgets everything it cached and asks the store again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;

use crate::keys::{Invalidation, KeyCache};

/// Changes waiting to be published; REST deletes are rare, so this only fills when Redis
/// is gone, and then the subscribers' forget-on-reconnect covers what is dropped.
const QUEUE: usize = 1024;
/// The longest one PUBLISH may take before it is given up.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts to (re)subscribe.
const RETRY: Duration = Duration::from_millis(500);

/// The channel of cluster `cluster` (same hash tag as the registry's keys).
pub fn channel(cluster: &str) -> String {
    format!("{{{cluster}}}:invalidate")
}

/// Connects `keys` to the other nodes of `cluster` through the Redis at `url`: this
/// node's changes are published, the others' applied. Runs until the process exits.
pub fn spawn_bus(url: &str, cluster: &str, keys: Arc<KeyCache>) -> anyhow::Result<()> {
    // The URL's own error text is left out: it may carry a password.
    let client =
        redis::Client::open(url).map_err(|_| anyhow::anyhow!("invalid redis URL (--redis-url)"))?;
    let channel = channel(cluster);
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    keys.connect_peers(tx);
    tokio::spawn(publish(client.clone(), channel.clone(), rx));
    tokio::spawn(subscribe(client, channel, keys));
    Ok(())
}

async fn publish(
    client: redis::Client,
    channel: String,
    mut changes: tokio::sync::mpsc::Receiver<Invalidation>,
) {
    let mut conn = None;
    while let Some(change) = changes.recv().await {
        let message = change.encode();
        for attempt in 0..2 {
            if conn.is_none() {
                conn = tokio::time::timeout(
                    PUBLISH_TIMEOUT,
                    client.get_multiplexed_async_connection(),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            let Some(c) = conn.as_mut() else { break };
            let sent = tokio::time::timeout(
                PUBLISH_TIMEOUT,
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&message)
                    .query_async::<i64>(c),
            )
            .await;
            match sent {
                Ok(Ok(_)) => break,
                _ => {
                    conn = None;
                    if attempt == 1 {
                        tracing::warn!(change = %message, "could not tell the other nodes; they forget their caches when their bus reconnects");
                    }
                }
            }
        }
    }
}

async fn subscribe(client: redis::Client, channel: String, keys: Arc<KeyCache>) {
    let mut first = true;
    loop {
        match listen(&client, &channel, &keys, first).await {
            Ok(()) => tracing::warn!("cluster channel closed; resubscribing"),
            Err(e) => tracing::warn!(error = %e, "cluster channel unavailable; retrying"),
        }
        first = false;
        tokio::time::sleep(RETRY).await;
    }
}

async fn listen(
    client: &redis::Client,
    channel: &str,
    keys: &KeyCache,
    first: bool,
) -> redis::RedisResult<()> {
    let mut pubsub = tokio::time::timeout(PUBLISH_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })??;
    pubsub.subscribe(channel).await?;
    if !first {
        // Changes made while this node was not listening are lost to it.
        keys.forget_everything();
    }
    let mut messages = pubsub.on_message();
    while let Some(m) = messages.next().await {
        let Ok(text) = m.get_payload::<String>() else {
            continue;
        };
        if let Some(change) = Invalidation::decode(&text) {
            keys.apply_remote(&change);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_the_wire_and_noise_is_ignored() {
        for change in [
            Invalidation::KeyDeleted("k1".parse().expect("id")),
            Invalidation::KeyCreated("k2".parse().expect("id")),
            Invalidation::SpaceDeleted("s1".parse().expect("id")),
        ] {
            assert_eq!(Invalidation::decode(&change.encode()), Some(change));
        }
        for noise in ["", "key-deleted", "what k1", "key-deleted bad/id"] {
            assert_eq!(Invalidation::decode(noise), None, "{noise:?}");
        }
    }
}
