//! Nothing secret reaches the log at any level: the `spacegate` binary runs at
//! `--log trace` while a client uses the REST API (access token, signing key), joins with a
//! JWT, publishes and subscribes (ICE passwords and DTLS fingerprints on both sides); then
//! the whole log is searched for each of those values.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use spacegate_client::JoinOptions;
use spacegate_client::participant::{Participant, Synthetic, TrackSpec};
use spacegate_proto::Role;

const BIN: &str = env!("CARGO_BIN_EXE_spacegate");
const WAIT: Duration = Duration::from_secs(20);

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every `a=<attribute>:` value of `sdp` (ice-pwd, fingerprint).
fn sdp_values<'a>(sdp: &'a str, attribute: &str) -> Vec<&'a str> {
    let prefix = format!("a={attribute}:");
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_even_at_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("stderr.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env_remove("SPACEGATE_CONFIG")
        .env_remove("SPACEGATE_LOG")
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "trace"])
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("spawn spacegate");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    // The bootstrap token and the address, from stdout (where the secret is meant to go).
    let (url, token_id, token_secret) = tokio::task::spawn_blocking(move || {
        let (mut url, mut id, mut secret) = (None, None, None);
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("stdout line");
            let line = line.trim();
            if let Some(v) = line.strip_prefix("MUX_TOKEN_ID=") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("MUX_TOKEN_SECRET=") {
                secret = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("spacegate: listening on ") {
                url = Some(v.to_string());
            } else if line.starts_with("spacegate: media on ") {
                break;
            }
        }
        (
            url.expect("address"),
            id.expect("token id"),
            secret.expect("token secret"),
        )
    })
    .await
    .expect("stdout reader");

    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{url}{path}"))
            .basic_auth(&token_id, Some(&token_secret))
            .json(&body)
            .send()
    };
    let space: Value = post("/video/v1/spaces", json!({}))
        .await
        .expect("create space")
        .json()
        .await
        .expect("json");
    let space_id = space["data"]["id"].as_str().expect("space id").to_string();
    let key: Value = post("/system/v1/signing-keys", json!({}))
        .await
        .expect("create key")
        .json()
        .await
        .expect("json");
    let kid = key["data"]["id"].as_str().expect("kid").to_string();
    let private_key_b64 = key["data"]["private_key"]
        .as_str()
        .expect("private key")
        .to_string();
    // A failed Basic auth too: the wrong secret must not be echoed into the log either.
    let wrong_secret = format!("{token_secret}x");
    let refused = http
        .get(format!("{url}/video/v1/spaces"))
        .basic_auth(&token_id, Some(&wrong_secret))
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), 401);
    let listed = http
        .get(format!("{url}/video/v1/spaces"))
        .basic_auth(&token_id, Some(&token_secret))
        .send()
        .await
        .expect("send");
    assert_eq!(listed.status(), 200);

    let private_key = spacegate_auth::PrivateKey::parse(&private_key_b64).expect("key");
    let sign = |participant: &str| {
        spacegate_auth::sign(
            &private_key,
            &spacegate_auth::SignOptions {
                key_id: kid.parse().expect("kid"),
                space_id: space_id.parse().expect("space"),
                expires_at: u64::try_from(spacegate_server::now_secs() + 3600).expect("time"),
                role: Role::Publisher,
                participant_id: Some(participant.parse().expect("pid")),
            },
        )
        .expect("sign")
    };
    let ws = url.replacen("http://", "ws://", 1);
    let (alice_jwt, bob_jwt) = (sign("alice"), sign("bob"));
    let mut alice = Participant::join(&ws, &alice_jwt, &JoinOptions::default())
        .await
        .expect("alice joins");
    let pc = alice
        .publish(&[TrackSpec::audio("alice-a"), TrackSpec::video("alice-v")])
        .await
        .expect("publish");
    let (_media, _task) = Synthetic::start(
        pc,
        Some("alice-a".into()),
        Some(("alice-v".into(), Vec::new())),
        127,
    );
    let mut bob = Participant::join(&ws, &bob_jwt, &JoinOptions::default())
        .await
        .expect("bob joins");
    bob.pump_until(WAIT, |p| {
        p.sub.stats("alice-v").is_some_and(|s| s.packets >= 10)
    })
    .await
    .expect("bob receives alice's video");

    let mut secrets: Vec<(String, String)> = vec![
        ("access token secret".into(), token_secret.clone()),
        ("wrong access token secret".into(), wrong_secret),
        ("signing key (base64 PEM)".into(), private_key_b64.clone()),
    ];
    // The PEM body too, line by line, in case anything decodes and prints it.
    let pem = String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &private_key_b64)
            .expect("base64"),
    )
    .expect("pem");
    for line in pem.lines().filter(|l| l.len() >= 40) {
        secrets.push(("private key PEM line".into(), line.to_string()));
    }
    for (who, jwt) in [("alice", &alice_jwt), ("bob", &bob_jwt)] {
        secrets.push((format!("{who}'s JWT"), jwt.clone()));
        let signature = jwt.rsplit('.').next().expect("signature");
        secrets.push((format!("{who}'s JWT signature"), signature.to_string()));
    }
    for (what, sdp) in [
        ("alice's publisher offer", alice.last_offer()),
        ("the server's publisher answer", alice.last_answer()),
        ("bob's subscriber answer", bob.last_sub_answer()),
        (
            "the server's subscriber offer",
            &bob.sub.last_offer().unwrap_or_default(),
        ),
    ] {
        let pwds = sdp_values(sdp, "ice-pwd");
        assert!(!pwds.is_empty(), "{what} has an ice-pwd: {sdp}");
        for v in pwds {
            secrets.push((format!("ice-pwd of {what}"), v.to_string()));
        }
        for v in sdp_values(sdp, "fingerprint") {
            // "sha-256 AB:CD:…": the hex is what identifies the certificate.
            let hex = v.split_whitespace().last().unwrap_or(v);
            secrets.push((format!("DTLS fingerprint of {what}"), hex.to_string()));
        }
    }

    alice.close().await;
    bob.close().await;
    drop(server);
    let log = std::fs::read_to_string(&log_path).expect("read log");
    // The log really was at trace, and saw this traffic: otherwise the search proves nothing.
    assert!(
        log.contains("TRACE") && log.contains("media message"),
        "the server did not log at trace: {} bytes",
        log.len()
    );
    // Each leak with the first line that carries it, cut short: enough to find its source.
    let leaks: Vec<String> = secrets
        .iter()
        .filter_map(|(what, v)| {
            let line = log.lines().find(|l| l.contains(v.as_str()))?;
            Some(format!(
                "{what}: {}",
                line.chars().take(300).collect::<String>()
            ))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets in the trace log:\n{}",
        leaks.join("\n")
    );
}
