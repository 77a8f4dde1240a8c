//! The `spacegate` binary as a user runs it: first start, config sources, signals, crash
//! safety, and the `tokens`, `sign` and `verify` commands.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_spacegate");

struct Running {
    child: Child,
    url: String,
    /// `(MUX_TOKEN_ID, MUX_TOKEN_SECRET)` when this start created the bootstrap token.
    token: Option<(String, String)>,
    /// The "media on udp://…" line.
    media: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spacegate(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("SPACEGATE_CONFIG")
        .env_remove("SPACEGATE_DATA_DIR")
        .env_remove("SPACEGATE_LISTEN")
        .env_remove("MUX_SIGNING_KEY")
        .env_remove("MUX_PRIVATE_KEY");
    cmd
}

/// Starts `cmd` and reads its stdout up to the "listening on" line.
fn start(mut cmd: Command) -> Running {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spacegate");
    // Owned by `Running` from here on, so a failed wait below still kills it.
    let mut running = Running {
        child,
        url: String::new(),
        token: None,
        media: String::new(),
    };
    let stdout = running.child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut id, mut secret) = (None, None);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server printed its address in time");
        if let Some(v) = line.trim().strip_prefix("MUX_TOKEN_ID=") {
            id = Some(v.to_string());
        } else if let Some(v) = line.trim().strip_prefix("MUX_TOKEN_SECRET=") {
            secret = Some(v.to_string());
        } else if let Some(url) = line.strip_prefix("spacegate: listening on ") {
            running.url = url.trim().to_string();
            running.token = id.take().zip(secret.take());
        } else if let Some(media) = line.strip_prefix("spacegate: media on ") {
            running.media = media.trim().to_string();
            return running;
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run spacegate");
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run spacegate");
    assert!(!out.status.success(), "command should have failed");
    String::from_utf8(out.stderr).expect("utf8")
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

fn create(r: &Running, token: &(String, String), path: &str) -> Value {
    let res = http()
        .post(format!("{}{path}", r.url))
        .basic_auth(&token.0, Some(&token.1))
        .json(&json!({}))
        .send()
        .expect("send");
    assert_eq!(res.status(), 201, "POST {path}");
    res.json::<Value>().expect("json")["data"].take()
}

/// A join token for a new space of `r`, signed with a new key by `spacegate sign`.
fn join_token(r: &Running, dir: &Path) -> String {
    let token = r.token.clone().expect("bootstrap token");
    let space = create(r, &token, "/video/v1/spaces")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let key = create(r, &token, "/system/v1/signing-keys");
    run_ok(spacegate(dir).args([
        "sign",
        &space,
        "--key-id",
        key["id"].as_str().expect("kid"),
        "--private-key",
        key["private_key"].as_str().expect("key"),
    ]))
}

fn status(r: &Running, token: &(String, String), path: &str) -> u16 {
    http()
        .get(format!("{}{path}", r.url))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("send")
        .status()
        .as_u16()
}

#[test]
fn first_start_creates_a_token_once_and_data_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No flags at all: only the port comes from the environment, so tests run in parallel.
    let mut cmd = spacegate(dir.path());
    cmd.env("SPACEGATE_LISTEN", "127.0.0.1:0");
    let r = start(cmd);
    assert!(
        r.url.starts_with("http://127.0.0.1:"),
        "loopback: {}",
        r.url
    );
    let token = r.token.clone().expect("first start prints a token");
    let space = create(&r, &token, "/video/v1/spaces");
    assert!(
        dir.path().join("spacegate-data/spacegate.db").exists(),
        "default data dir"
    );
    drop(r);

    let mut cmd = spacegate(dir.path());
    cmd.env("SPACEGATE_LISTEN", "127.0.0.1:0");
    let r = start(cmd);
    assert!(
        r.token.is_none(),
        "the token is printed on the first start only"
    );
    let id = space["id"].as_str().expect("id");
    assert_eq!(status(&r, &token, &format!("/video/v1/spaces/{id}")), 200);
}

#[test]
fn config_file_flags_and_env_set_the_same_things() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("spacegate.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"from-file\"\nenvironment = \"prod\"\n",
    )
    .expect("write config");
    let mut cmd = spacegate(dir.path());
    cmd.args(["serve", "--config"]).arg(&cfg);
    let r = start(cmd);
    assert!(r.token.is_some());
    assert!(dir.path().join("from-file/spacegate.db").exists());
    drop(r);

    // --data-dir beats the file; SPACEGATE_DATA_DIR is beaten by the flag.
    let mut cmd = spacegate(dir.path());
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .args(["--data-dir", "from-flag"])
        .env("SPACEGATE_DATA_DIR", "from-env");
    let _r = start(cmd);
    assert!(dir.path().join("from-flag/spacegate.db").exists());
    assert!(!dir.path().join("from-env").exists());

    // A typo in the file is an error, not a silent default.
    std::fs::write(&cfg, "lisen = \"127.0.0.1:0\"\n").expect("write");
    let err = run_err(spacegate(dir.path()).args(["serve", "--config"]).arg(&cfg));
    assert!(err.contains("lisen"), "{err}");
}

#[cfg(unix)]
#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut r = start(cmd);
    let pid = r.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = r.child.try_wait().expect("wait") {
            assert!(status.success(), "graceful exit, got {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut r = start(cmd);
    let token = r.token.clone().expect("token");
    let ids: Vec<String> = (0..20)
        .map(|_| {
            create(&r, &token, "/video/v1/spaces")["id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    let key = create(&r, &token, "/system/v1/signing-keys");
    // SIGKILL right after the last acknowledgement: no shutdown path runs.
    r.child.kill().expect("kill -9");
    r.child.wait().expect("reap");

    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0"]);
    let r = start(cmd);
    for id in &ids {
        assert_eq!(
            status(&r, &token, &format!("/video/v1/spaces/{id}")),
            200,
            "space {id} lost"
        );
    }
    let kid = key["id"].as_str().expect("kid");
    assert_eq!(
        status(&r, &token, &format!("/system/v1/signing-keys/{kid}")),
        200
    );
}

#[test]
fn tokens_commands_work_while_the_server_is_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = run_ok(
        spacegate(dir.path())
            .args(["tokens", "create", "--data-dir"])
            .arg(&data)
            .args([
                "--environment",
                "staging",
                "--permissions",
                "read",
                "--json",
            ]),
    );
    let created: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(created["environment"], "staging");
    assert_eq!(created["permissions"], json!(["read"]));
    let ro = (
        created["id"].as_str().expect("id").to_string(),
        created["secret"].as_str().expect("secret").to_string(),
    );

    let listed: Value = serde_json::from_str(
        run_ok(
            spacegate(dir.path())
                .args(["tokens", "list", "--json", "--data-dir"])
                .arg(&data),
        )
        .trim(),
    )
    .expect("json");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], created["id"]);
    assert!(
        listed[0].get("secret").is_none(),
        "secrets are never listed"
    );

    // The database holds only a hash of the secret.
    let db = std::fs::read(data.join("spacegate.db")).expect("db");
    let wal = std::fs::read(data.join("spacegate.db-wal")).unwrap_or_default();
    let needle = ro.1.as_bytes();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "secret stored in clear"
        );
    }

    // A store that has a token gets no bootstrap token; the CLI token works.
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data);
    let r = start(cmd);
    assert!(r.token.is_none());
    assert_eq!(status(&r, &ro, "/video/v1/spaces"), 200);
    let res = http()
        .post(format!("{}/video/v1/spaces", r.url))
        .basic_auth(&ro.0, Some(&ro.1))
        .send()
        .expect("send");
    assert_eq!(res.status(), 403, "read-only");

    // Revoking while the server runs takes effect on the next request.
    let out = run_ok(
        spacegate(dir.path())
            .args(["tokens", "revoke", &ro.0, "--data-dir"])
            .arg(&data),
    );
    assert!(out.contains("revoked"));
    assert_eq!(status(&r, &ro, "/video/v1/spaces"), 401);
    let err = run_err(
        spacegate(dir.path())
            .args(["tokens", "revoke", &ro.0, "--data-dir"])
            .arg(&data),
    );
    assert!(err.contains("no access token"), "{err}");

    let err = run_err(
        spacegate(dir.path())
            .args(["tokens", "create", "--permissions", "admin", "--data-dir"])
            .arg(&data),
    );
    assert!(err.contains("unknown permission"), "{err}");
}

#[test]
fn sign_makes_tokens_that_verify_against_the_stored_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data);
    let r = start(cmd);
    let token = r.token.clone().expect("token");
    let space = create(&r, &token, "/video/v1/spaces")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let key = create(&r, &token, "/system/v1/signing-keys");
    let kid = key["id"].as_str().expect("kid");
    let private = key["private_key"].as_str().expect("private key");

    let verify = |jwt: &str| -> Value {
        let out = run_ok(
            spacegate(dir.path())
                .args(["verify", jwt.trim(), "--data-dir"])
                .arg(&data),
        );
        serde_json::from_str(out.trim()).expect("json")
    };

    // Flags, with a participant and a role.
    let jwt = run_ok(spacegate(dir.path()).args([
        "sign",
        &space,
        "--key-id",
        kid,
        "--private-key",
        private,
        "--role",
        "subscriber",
        "--participant-id",
        "bob",
        "--expires-in",
        "1h",
    ]));
    let claims = verify(&jwt);
    assert_eq!(claims["space_id"], space.as_str());
    assert_eq!(claims["key_id"], kid);
    assert_eq!(claims["role"], "subscriber");
    assert_eq!(claims["participant_id"], "bob");
    let exp = claims["expires_at"].as_i64().expect("exp");
    let now = spacegate_server::now_secs();
    assert!((exp - now - 3600).abs() < 60, "expires in an hour");

    // The header carries kid too, for verifiers that only look there.
    let header = jwt.trim().split('.').next().expect("header");
    let header: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(header, json!({"alg": "RS256", "typ": "JWT", "kid": kid}));

    // Environment variables, as `mux spaces:sign` read them; a PEM file via @.
    let jwt = run_ok(
        spacegate(dir.path())
            .args(["sign", &space])
            .env("MUX_SIGNING_KEY", kid)
            .env("MUX_PRIVATE_KEY", private),
    );
    let claims = verify(&jwt);
    assert_eq!(claims["role"], "publisher");
    assert_eq!(claims["participant_id"], Value::Null);
    let pem =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, private).expect("b64");
    let pem_file = dir.path().join("key.pem");
    std::fs::write(&pem_file, pem).expect("write pem");
    let jwt = run_ok(
        spacegate(dir.path())
            .args(["sign", &space, "--key-id", kid])
            .arg(format!("--private-key=@{}", pem_file.display())),
    );
    verify(&jwt);

    // Bad input: clear errors, no token.
    let err = run_err(spacegate(dir.path()).args([
        "sign",
        &space,
        "--key-id",
        kid,
        "--private-key",
        private,
        "--role",
        "admin",
    ]));
    assert!(err.contains("role"), "{err}");
    let err = run_err(spacegate(dir.path()).args([
        "sign",
        &space,
        "--key-id",
        kid,
        "--private-key",
        private,
        "--expires-in",
        "3600",
    ]));
    assert!(err.contains("unit"), "{err}");
    let err = run_err(spacegate(dir.path()).args([
        "sign",
        &space,
        "--key-id",
        kid,
        "--private-key",
        "not a key",
    ]));
    assert!(err.contains("--private-key"), "{err}");

    // Once the key is deleted, verify refuses the token.
    let res = http()
        .delete(format!("{}/system/v1/signing-keys/{kid}", r.url))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("delete");
    assert_eq!(res.status(), 204);
    let err = run_err(
        spacegate(dir.path())
            .args(["verify", jwt.trim(), "--data-dir"])
            .arg(&data),
    );
    assert!(err.contains("unknown or deleted"), "{err}");
}

#[test]
fn media_shares_the_port_number_and_takes_public_ip_and_ice_servers_from_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("spacegate.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\n[[ice_servers]]\nurls = [\"turn:turn.example.org:3478\"]\nusername = \"u\"\ncredential = \"c\"\n",
    )
    .expect("write config");
    let mut cmd = spacegate(dir.path());
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .args(["--media-public-ip", "203.0.113.7"]);
    let r = start(cmd);
    // "udp://127.0.0.1:P (clients are told 203.0.113.7:P)", P = the HTTP port.
    let port = r.url.rsplit(':').next().expect("port").to_string();
    assert_eq!(
        r.media,
        format!("udp://127.0.0.1:{port} (clients are told 203.0.113.7:{port})")
    );

    // The configured TURN server reaches the SDK in `joined.ice_servers`.
    let jwt = join_token(&r, dir.path());
    let ws = r.url.replace("http://", "ws://");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let joined = rt.block_on(async {
        spacegate_client::Session::join(&ws, jwt.trim(), &Default::default())
            .await
            .expect("join")
            .joined()
            .clone()
    });
    assert_eq!(joined.ice_servers.len(), 1);
    assert_eq!(joined.ice_servers[0].urls, ["turn:turn.example.org:3478"]);
    assert_eq!(joined.ice_servers[0].username.as_deref(), Some("u"));
}

#[test]
fn the_media_plane_answers_from_the_first_moment_even_on_one_core() {
    // Regression: the media task was once spawned before the gateway it serves existed;
    // when the scheduler ran it first (likely on one core) it found no gateway and
    // stopped, and no offer was ever answered. Pinned to one core where `taskset` exists.
    let pinned = Command::new("taskset").arg("-V").output().is_ok();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for attempt in 0..16 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = if pinned {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", BIN]);
            c
        } else {
            Command::new(BIN)
        };
        cmd.current_dir(dir.path())
            .env_remove("SPACEGATE_CONFIG")
            .env_remove("SPACEGATE_DATA_DIR")
            .env_remove("SPACEGATE_LISTEN")
            .args(["serve", "--listen", "127.0.0.1:0"]);
        let r = start(cmd);
        let jwt = join_token(&r, dir.path());
        let ws = r.url.replace("http://", "ws://");
        let reply = rt.block_on(async {
            let mut s = spacegate_client::Session::join(&ws, jwt.trim(), &Default::default())
                .await
                .expect("join");
            // Only the media plane answers an offer, even a malformed one.
            s.send(
                spacegate_proto::signaling::ClientMessage::Offer("not sdp".into()),
                None,
            )
            .await
            .expect("send");
            s.next().await
        });
        let Ok(m) = reply else {
            panic!("attempt {attempt}: no answer to an offer: {reply:?}");
        };
        assert!(
            matches!(&m.message, spacegate_proto::signaling::ServerMessage::Error(e) if e.message.contains("offer refused")),
            "{m:?}"
        );
    }
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 it signed, as PEM files in
/// `dir` (`<name>-cert.pem`, `<name>-key.pem`); returns the CA's DER, to trust.
fn test_certificate(dir: &Path, name: &str) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf cert");
    std::fs::write(dir.join(format!("{name}-cert.pem")), leaf_cert.pem()).expect("write");
    std::fs::write(
        dir.join(format!("{name}-key.pem")),
        leaf_key.serialize_pem(),
    )
    .expect("write");
    ca_cert.der().to_vec()
}

/// Connects over TLS trusting `roots`; the certificate the server presented and the stream.
async fn tls_connect(
    addr: &str,
    roots: &[Vec<u8>],
) -> (
    Vec<u8>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(r.clone()))
            .expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .to_vec();
    (presented, tls)
}

#[cfg(unix)]
#[test]
fn tls_serves_https_and_wss_and_reloads_on_sighup() {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("tempdir");
    // A space and a key, made over plain HTTP, then the same store served over TLS.
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0"]);
    let plain = start(cmd);
    let jwt = join_token(&plain, dir.path());
    drop(plain);
    let ca_a = test_certificate(dir.path(), "a");
    let ca_b = test_certificate(dir.path(), "b");
    let (cert, key) = (
        dir.path().join("live-cert.pem"),
        dir.path().join("live-key.pem"),
    );
    std::fs::copy(dir.path().join("a-cert.pem"), &cert).expect("copy");
    std::fs::copy(dir.path().join("a-key.pem"), &key).expect("copy");
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    let r = start(cmd);
    let addr = r
        .url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("an https URL: {}", r.url))
        .to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // HTTPS: the API answers.
        let (presented, mut tls) = tls_connect(&addr, std::slice::from_ref(&ca_a)).await;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        tls.read_to_string(&mut response).await.ok();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        // WSS: a join gets `joined`.
        let (_, tls) = tls_connect(&addr, std::slice::from_ref(&ca_a)).await;
        let url = format!("wss://localhost/v1?token={}", jwt.trim());
        let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("WebSocket over TLS");
        let first = ws.next().await.expect("a frame").expect("frame");
        assert!(
            first.to_text().expect("text").contains("\"joined\""),
            "{first:?}"
        );

        // SIGHUP with new files: new connections get the new certificate.
        std::fs::copy(dir.path().join("b-cert.pem"), &cert).expect("copy");
        std::fs::copy(dir.path().join("b-key.pem"), &key).expect("copy");
        let hup = |pid: u32| {
            let status = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
        };
        hup(r.child.id());
        let both = [ca_a.clone(), ca_b.clone()];
        let mut reloaded = None;
        for _ in 0..100 {
            let (p, _) = tls_connect(&addr, &both).await;
            if p != presented {
                reloaded = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reloaded = reloaded.expect("the new certificate is served after SIGHUP");
        // A file that does not load: the certificate in use stays, the server goes on.
        std::fs::write(&cert, "not a certificate").expect("write");
        hup(r.child.id());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (p, _) = tls_connect(&addr, &both).await;
        assert_eq!(p, reloaded);
        // The WebSocket joined before the reload is still up.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), ws.next())
                .await
                .is_err(),
            "nothing ended the joined connection"
        );
    });
}

/// The space of `jwt` (its `sub`), read from the token's payload.
fn space_of(jwt: &str) -> String {
    use base64::Engine as _;
    let payload = jwt.trim().split('.').nth(1).expect("payload");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64"),
    )
    .expect("json");
    claims["sub"].as_str().expect("sub").to_string()
}

fn space_status(r: &Running, token: &(String, String), space: &str) -> String {
    let v: Value = http()
        .get(format!("{}/video/v1/spaces/{space}", r.url))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("send")
        .json()
        .expect("json");
    v["data"]["status"].as_str().expect("status").to_string()
}

/// A participant joined, then the server stopped with `signal`: after a restart on the
/// same data dir the space is idle and can be deleted.
fn space_is_idle_after_a_stop(signal: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut r = start(cmd);
    let token = r.token.clone().expect("token");
    let jwt = join_token(&r, dir.path());
    let space = space_of(&jwt);
    let ws = r.url.replacen("http://", "ws://", 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let session = rt
        .block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
        .expect("join");
    // The store has caught up with the join.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while space_status(&r, &token, &space) != "active" {
        assert!(std::time::Instant::now() < deadline, "never active");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = r.child.id().to_string();
    let sent = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    r.child.wait().expect("reap");
    drop(session);

    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0"]);
    let r = start(cmd);
    assert_eq!(space_status(&r, &token, &space), "idle", "after {signal}");
    let res = http()
        .delete(format!("{}/video/v1/spaces/{space}", r.url))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("send");
    assert_eq!(res.status(), 204, "deletable after {signal}");
}

#[cfg(unix)]
#[test]
fn an_active_space_is_idle_after_kill_9_and_a_restart() {
    space_is_idle_after_a_stop("-KILL");
}

#[cfg(unix)]
#[test]
fn an_active_space_is_idle_after_sigterm_and_a_restart() {
    space_is_idle_after_a_stop("-TERM");
}

/// A database of its own on the test PostgreSQL (`SPACEGATE_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432/test`), dropped afterwards; `None` (with the reason
/// printed) when there is no server, a failure under `SPACEGATE_REQUIRE_ALL=1`.
struct TempPostgres {
    name: String,
    url: String,
}

fn pg_admin_url() -> String {
    std::env::var("SPACEGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn pg_exec(url: &str, sql: &str) -> Result<(), String> {
    use sqlx::Connection as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let connect = sqlx::postgres::PgConnection::connect(url);
        let mut c = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        sqlx::raw_sql(sql)
            .execute(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

impl TempPostgres {
    fn new() -> Option<TempPostgres> {
        let admin = pg_admin_url();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("sg_cli_{}_{nanos}", std::process::id());
        if let Err(e) = pg_exec(&admin, &format!("CREATE DATABASE {name}")) {
            let reason = format!("PostgreSQL at {admin}: {e}");
            assert!(
                std::env::var("SPACEGATE_REQUIRE_ALL").as_deref() != Ok("1"),
                "{reason}, and SPACEGATE_REQUIRE_ALL=1"
            );
            eprintln!("SKIP: {reason}; the PostgreSQL tests did not run");
            return None;
        }
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        Some(TempPostgres {
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = pg_exec(
            &pg_admin_url(),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// `--database-url`: the tokens commands, the control plane and the join path all on
/// PostgreSQL, shared by two nodes; nothing is written to a data dir.
#[test]
fn postgres_serves_the_control_plane_of_every_node_and_the_tokens_commands() {
    let Some(db) = TempPostgres::new() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("never-created");
    let cli = |args: &[&str]| {
        let mut cmd = spacegate(dir.path());
        cmd.args(args)
            .args(["--database-url", &db.url, "--data-dir"])
            .arg(&data);
        cmd
    };
    let created: Value = serde_json::from_str(
        run_ok(&mut cli(&[
            "tokens",
            "create",
            "--environment",
            "prod",
            "--permissions",
            "read,write",
            "--json",
        ]))
        .trim(),
    )
    .expect("json");
    let token = (
        created["id"].as_str().expect("id").to_string(),
        created["secret"].as_str().expect("secret").to_string(),
    );
    let listed: Value =
        serde_json::from_str(run_ok(&mut cli(&["tokens", "list", "--json"])).trim()).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["id"], created["id"]);
    // The secret is stored hashed in PostgreSQL too.
    let found = pg_exec(
        &db.url,
        &format!(
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM access_tokens WHERE encode(secret_sha256, 'escape') LIKE '%{}%') THEN RAISE EXCEPTION 'clear secret'; END IF; END $$",
            token.1
        ),
    );
    assert_eq!(found, Ok(()), "secret stored in clear");

    let node = || {
        let mut cmd = cli(&["--listen", "127.0.0.1:0"]);
        cmd.env_remove("SPACEGATE_DATABASE_URL");
        start(cmd)
    };
    let (a, b) = (node(), node());
    assert!(
        a.token.is_none() && b.token.is_none(),
        "the store has a token"
    );
    let space = create(&a, &token, "/video/v1/spaces");
    let space_id = space["id"].as_str().expect("id");
    assert_eq!(
        status(&b, &token, &format!("/video/v1/spaces/{space_id}")),
        200,
        "a space made on one node is there on the other"
    );
    // A key made on A admits a join on B.
    let key = create(&a, &token, "/system/v1/signing-keys");
    let jwt = run_ok(spacegate(dir.path()).args([
        "sign",
        space_id,
        "--key-id",
        key["id"].as_str().expect("kid"),
        "--private-key",
        key["private_key"].as_str().expect("key"),
    ]));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ws = b.url.replacen("http://", "ws://", 1);
    let session = rt
        .block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
        .expect("join on B with a key made on A");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while space_status(&a, &token, space_id) != "active" {
        assert!(
            std::time::Instant::now() < deadline,
            "A never saw it active"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(session);

    run_ok(&mut cli(&["tokens", "revoke", &token.0]));
    for n in [&a, &b] {
        assert_eq!(status(n, &token, "/video/v1/spaces"), 401, "revoked");
    }
    assert!(!data.exists(), "nothing was written to a data dir");
}

/// The Redis of the cluster tests (`SPACEGATE_TEST_REDIS`, default 127.0.0.1:6379), or
/// `None` with the reason printed (a failure under `SPACEGATE_REQUIRE_ALL=1`).
fn test_redis() -> Option<String> {
    let url =
        std::env::var("SPACEGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let reachable = addr
        .parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
    if reachable.is_none() {
        let reason = format!("Redis at {url} is not reachable");
        assert!(
            std::env::var("SPACEGATE_REQUIRE_ALL").as_deref() != Ok("1"),
            "{reason}, and SPACEGATE_REQUIRE_ALL=1"
        );
        eprintln!("SKIP: {reason}; the cluster tests did not run");
        return None;
    }
    Some(url)
}

/// What a cluster test needs: a database of its own, the test Redis, a cluster name of its
/// own (so runs never share keys) and an access token made with the CLI.
struct Cluster {
    db: TempPostgres,
    redis: String,
    dir: tempfile::TempDir,
    cluster: String,
    token: (String, String),
}

impl Cluster {
    fn new(tag: &str) -> Option<Cluster> {
        let db = TempPostgres::new()?;
        let redis = test_redis()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let cluster = format!("{tag}{}-{nanos}", std::process::id());
        let created: Value = serde_json::from_str(
            run_ok(spacegate(dir.path()).args([
                "tokens",
                "create",
                "--json",
                "--database-url",
                &db.url,
            ]))
            .trim(),
        )
        .expect("json");
        let token = (
            created["id"].as_str().expect("id").to_string(),
            created["secret"].as_str().expect("secret").to_string(),
        );
        Some(Cluster {
            db,
            redis,
            dir,
            cluster,
            token,
        })
    }
}

impl Cluster {
    /// A node of this cluster on a free port, `extra` flags after the cluster's own.
    fn node(&self, id: &str, extra: &[&str]) -> Running {
        self.node_in(&self.cluster, id, extra)
    }

    /// A join token for `space` (for `participant`, or without one), signed by
    /// `spacegate sign` with a key as the API returned it.
    fn sign(&self, space: &str, participant: Option<&str>, key: &Value) -> String {
        let mut cmd = spacegate(self.dir.path());
        cmd.args(["sign", space])
            .args(["--key-id", key["id"].as_str().expect("kid")])
            .args(["--private-key", key["private_key"].as_str().expect("key")]);
        if let Some(p) = participant {
            cmd.args(["--participant-id", p]);
        }
        run_ok(&mut cmd).trim().to_string()
    }

    /// [`Cluster::node`] under another cluster name (same PostgreSQL and Redis).
    fn node_in(&self, cluster: &str, id: &str, extra: &[&str]) -> Running {
        let mut cmd = spacegate(self.dir.path());
        cmd.args(["--listen", "127.0.0.1:0", "--database-url", &self.db.url])
            .args([
                "--redis-url",
                &self.redis,
                "--cluster",
                cluster,
                "--node-id",
                id,
            ])
            .args(extra);
        start(cmd)
    }
}

/// Two nodes on one PostgreSQL and one Redis: a participant id is unique across both, the
/// ids of a node that dies (kill -9) are free again within its lease, and a cluster of
/// another name on the same Redis sees none of it.
#[test]
fn participant_ids_are_unique_across_the_nodes_of_a_cluster() {
    let Some(c) = Cluster::new("cli-") else {
        return;
    };
    let token = c.token.clone();
    let lease_ms = 1000;
    let node = |id: &str, cluster: &str| {
        c.node_in(cluster, id, &["--node-lease-ms", &lease_ms.to_string()])
    };
    let (mut a, b) = (node("a", &c.cluster), node("b", &c.cluster));
    let space = create(&a, &token, "/video/v1/spaces");
    let space_id = space["id"].as_str().expect("id");
    let key = create(&a, &token, "/system/v1/signing-keys");
    let jwt = c.sign(space_id, Some("alice"), &key);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let join = |n: &Running| {
        let ws = n.url.replacen("http://", "ws://", 1);
        rt.block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
    };
    let on_a = join(&a).expect("alice joins on A");
    match join(&b) {
        Err(spacegate_client::ClientError::Rejected { error, .. }) => assert!(
            error.message.contains("already connected"),
            "{}",
            error.message
        ),
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("alice joined twice, once on each node"),
    }
    // Another cluster on the same Redis (and here the same database) shares no ids.
    let other = node("a", &format!("{}-other", c.cluster));
    let elsewhere = join(&other).expect("another cluster does not see alice");
    drop(elsewhere);

    // A dies without releasing anything: alice is free once its lease runs out.
    a.child.kill().expect("kill -9 A");
    a.child.wait().expect("reap");
    let died = std::time::Instant::now();
    let on_b = loop {
        match join(&b) {
            Ok(s) => break s,
            Err(spacegate_client::ClientError::Rejected { .. }) => {
                assert!(
                    died.elapsed() < Duration::from_millis(lease_ms + 5000),
                    "alice still held {:?} after A died",
                    died.elapsed()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("join on B failed: {e}"),
        }
    };
    drop((on_a, on_b));
}

/// A signing key or space deleted through one node stops admitting joins on every node
/// of the cluster within a second, although the others had them cached.
#[test]
fn deletes_reach_every_node_of_a_cluster_within_a_second() {
    let Some(c) = Cluster::new("cli-del-") else {
        return;
    };
    let token = c.token.clone();
    // The polls below join from one address faster than a client would.
    let node = |id: &str| c.node(id, &["--join-rate-per-ip", "0"]);
    let (a, b) = (node("a"), node("b"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sign = |space: &str, key: &Value| c.sign(space, None, key);
    let join = |n: &Running, jwt: &str| {
        let ws = n.url.replacen("http://", "ws://", 1);
        rt.block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
    };
    // Polls joins on `n` until one is refused with `why`; how long that took after
    // `since`. (Other refusals, the per-address join rate's "try again", do not count.)
    let refused_after = |n: &Running, jwt: &str, why: &str, since: std::time::Instant| loop {
        match join(n, jwt) {
            Ok(s) => drop(s),
            Err(spacegate_client::ClientError::Rejected { error, .. })
                if error.message.contains(why) =>
            {
                return since.elapsed();
            }
            Err(spacegate_client::ClientError::Rejected { .. }) => {}
            Err(e) => panic!("join failed otherwise: {e}"),
        }
        assert!(since.elapsed() < Duration::from_secs(10), "never refused");
        std::thread::sleep(Duration::from_millis(20));
    };

    let space = create(&a, &token, "/video/v1/spaces");
    let space_id = space["id"].as_str().expect("id").to_string();
    let key = create(&a, &token, "/system/v1/signing-keys");
    let jwt = sign(&space_id, &key);
    // B caches the key and the space.
    drop(join(&b, &jwt).expect("join on B"));
    let res = http()
        .delete(format!(
            "{}/system/v1/signing-keys/{}",
            a.url,
            key["id"].as_str().expect("kid")
        ))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("send");
    assert_eq!(res.status(), 204);
    let took = refused_after(&b, &jwt, "unknown or deleted", std::time::Instant::now());
    assert!(
        took < Duration::from_secs(1),
        "key still valid on B after {took:?}"
    );

    let key = create(&a, &token, "/system/v1/signing-keys");
    let jwt = sign(&space_id, &key);
    drop(join(&b, &jwt).expect("join on B with the new key"));
    // The space is idle once B has written the leave; then A can delete it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = http()
            .delete(format!("{}/video/v1/spaces/{space_id}", a.url))
            .basic_auth(&token.0, Some(&token.1))
            .send()
            .expect("send");
        if res.status() == 204 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "space never deletable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = refused_after(&b, &jwt, "does not exist", std::time::Instant::now());
    assert!(
        took < Duration::from_secs(1),
        "space still joinable on B after {took:?}"
    );
}

/// Any node takes any client: a space lives on one node (its home), a participant who
/// enters through another node is carried there, and both see each other, exchange custom
/// events and leave as on one node. When the home dies, the carried client is told to
/// reconnect (1012), and its next join, through the same node, re-homes the space.
#[test]
fn participants_entering_through_different_nodes_share_one_space() {
    use spacegate_proto::signaling::ServerMessage;
    let Some(c) = Cluster::new("cli-home-") else {
        return;
    };
    let token = c.token.clone();
    let lease_ms: u64 = 1000;
    let node = |id: &str| c.node(id, &["--node-lease-ms", &lease_ms.to_string()]);
    let (mut a, b) = (node("a"), node("b"));
    let space = create(&a, &token, "/video/v1/spaces");
    let space_id = space["id"].as_str().expect("id").to_string();
    let key = create(&a, &token, "/system/v1/signing-keys");
    let sign = |participant: &str| c.sign(&space_id, Some(participant), &key);
    let (alice_jwt, bob_jwt) = (sign("alice"), sign("bob"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let join = |n: &Running, jwt: &str| {
        let ws = n.url.replacen("http://", "ws://", 1);
        rt.block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
    };
    // Alice enters through A, which becomes the space's home; Bob through B.
    let mut alice = join(&a, &alice_jwt).expect("alice via A");
    let mut bob = join(&b, &bob_jwt).expect("bob via B, carried to A");
    let others: Vec<&str> = bob
        .joined()
        .participants
        .iter()
        .map(|p| p.participant_id.as_str())
        .collect();
    assert_eq!(others, ["alice"], "bob's joined lists alice");
    assert_eq!(
        bob.joined().sub_sfus[0].sfu_id,
        "sfu-a",
        "bob's media plane is the home's"
    );
    rt.block_on(async {
        loop {
            match alice.next().await.expect("alice hears").message {
                ServerMessage::ParticipantConnected(p) => {
                    assert_eq!(p.participant_id, "bob");
                    break;
                }
                _ => continue,
            }
        }
        let sent = bob
            .publish_custom_event("hello-1", "{\"hi\":1}")
            .await
            .expect("bob's event echoed");
        loop {
            match alice.next().await.expect("alice hears").message {
                ServerMessage::CustomEvent(e) => {
                    assert_eq!(e.payload, "{\"hi\":1}");
                    assert_eq!(e.sequence_num, sent.sequence_num, "one sequence per space");
                    break;
                }
                _ => continue,
            }
        }
        bob.set_display_name("Bob of B", "name-1")
            .await
            .expect("bob renames himself");
        loop {
            match alice.next().await.expect("alice hears").message {
                ServerMessage::ParticipantUpdate(u) => {
                    assert_eq!(u.display_name, "Bob of B");
                    break;
                }
                _ => continue,
            }
        }
    });

    // The home dies: Bob's carried connection is told to reconnect.
    a.child.kill().expect("kill -9 A");
    a.child.wait().expect("reap");
    drop(alice);
    let code = rt.block_on(bob.closed()).expect("bob's connection ends");
    assert_eq!(code, Some(1012), "the SDK reconnects on 1012");
    // B re-homes the space once A's lease (and with it Bob's old claim) has run out.
    let died = std::time::Instant::now();
    loop {
        match join(&b, &bob_jwt) {
            Ok(s) => {
                assert!(s.joined().participants.is_empty(), "alice died with A");
                break;
            }
            Err(spacegate_client::ClientError::Rejected { .. }) => {
                assert!(
                    died.elapsed() < Duration::from_millis(lease_ms + 5000),
                    "space not re-homed {:?} after A died",
                    died.elapsed()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("rejoin through B failed: {e}"),
        }
    }
}

/// Media goes straight to the space's home: a publisher entering through the home and a
/// subscriber entering through another node (whose signaling is carried) get each other's
/// media, unchanged.
#[test]
fn media_reaches_a_participant_who_entered_through_another_node() {
    use spacegate_client::participant::{Participant, Synthetic, TrackSpec, audio_payload};
    let Some(c) = Cluster::new("cli-media-") else {
        return;
    };
    let token = c.token.clone();
    let node = |id: &str| c.node(id, &[]);
    let (a, b) = (node("a"), node("b"));
    let space = create(&a, &token, "/video/v1/spaces");
    let space_id = space["id"].as_str().expect("id").to_string();
    let key = create(&a, &token, "/system/v1/signing-keys");
    let sign = |participant: &str| c.sign(&space_id, Some(participant), &key);
    let (alice_jwt, bob_jwt) = (sign("alice"), sign("bob"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let options = spacegate_client::JoinOptions::default();
        let ws = |n: &Running| n.url.replacen("http://", "ws://", 1);
        let mut alice = Participant::join(&ws(&a), alice_jwt.trim(), &options)
            .await
            .expect("alice via A");
        let pc = alice
            .publish(&[TrackSpec::audio("alice-a")])
            .await
            .expect("publish");
        let (_synthetic, _task) = Synthetic::start(pc, Some("alice-a".into()), None, 127);
        let mut bob = Participant::join(&ws(&b), bob_jwt.trim(), &options)
            .await
            .expect("bob via B");
        bob.pump_until(Duration::from_secs(15), |p| {
            p.sub.stats("alice-a").map_or(0, |s| s.packets) >= 50
        })
        .await
        .expect("alice's audio reaches bob");
        let stats = bob.sub.stats("alice-a").expect("stats");
        for payload in &stats.first_payloads {
            let seq = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
            assert_eq!(payload, &audio_payload(seq), "audio payload {seq} changed");
        }
    });
}

/// A `redis-server` of the test's own on a free port (never the shared one: this test
/// stops it), without persistence; killed when dropped.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start() -> Option<OwnRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::on(port)
    }

    /// Stopped for good, and a new, empty one started on the same port (nothing is
    /// persisted: every lease and claim is gone).
    fn restart(self) -> OwnRedis {
        let port = self.port;
        drop(self);
        Self::on(port).expect("redis-server ran before")
    }

    fn on(port: u16) -> Option<OwnRedis> {
        let child = match Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot run redis-server ({e})");
                assert!(
                    std::env::var("SPACEGATE_REQUIRE_ALL").as_deref() != Ok("1"),
                    "{reason}, and SPACEGATE_REQUIRE_ALL=1"
                );
                eprintln!("SKIP: {reason}");
                return None;
            }
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(OwnRedis { port, child })
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(ok.success(), "kill {signal}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis stops answering (SIGSTOP: connections stay open, nothing comes back). The node
/// stays alive (`/healthz`), reports itself degraded (`/readyz` 503), refuses new joins
/// with "try again", and before its lease can run out sends its clients to reconnect
/// (1012) so that no other node can host their space alongside it. When Redis answers
/// again, joins work again without a restart.
#[test]
fn a_node_cut_off_from_redis_stops_hosting_before_its_lease_ends_and_recovers() {
    let Some(db) = TempPostgres::new() else {
        return;
    };
    let Some(redis) = OwnRedis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lease_ms: u64 = 1500;
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0", "--database-url", &db.url])
        .args(["--redis-url", &format!("redis://127.0.0.1:{}", redis.port)])
        .args(["--node-lease-ms", &lease_ms.to_string()]);
    let a = start(cmd);
    let token = a.token.clone().expect("bootstrap token");
    let jwt = join_token(&a, dir.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let join = || {
        let ws = a.url.replacen("http://", "ws://", 1);
        rt.block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
    };
    let mut session = join().expect("join");
    assert_eq!(status(&a, &token, "/readyz"), 200);

    redis.signal("-STOP");
    let stopped = std::time::Instant::now();
    let code = rt.block_on(session.closed()).expect("closed");
    let after = stopped.elapsed();
    assert_eq!(code, Some(1012), "told to reconnect");
    assert!(
        after < Duration::from_millis(lease_ms),
        "still hosting {after:?} after Redis stopped answering (lease {lease_ms} ms)"
    );
    assert_eq!(status(&a, &token, "/healthz"), 200, "alive");
    assert_eq!(status(&a, &token, "/readyz"), 503, "degraded");
    match join() {
        Err(spacegate_client::ClientError::Rejected { error, .. }) => {
            assert_eq!(error.kind, 7, "the SDK's try-again: {}", error.message)
        }
        other => panic!("a join without Redis: {other:?}"),
    }

    redis.signal("-CONT");
    let resumed = std::time::Instant::now();
    let back = loop {
        match join() {
            Ok(s) => break s,
            Err(_) => {
                assert!(
                    resumed.elapsed() < Duration::from_secs(15),
                    "no join {:?} after Redis came back",
                    resumed.elapsed()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(status(&a, &token, "/readyz"), 200, "ready again");

    // Redis restarts empty: the node's lease and claims are gone with it, so its clients
    // are sent to claim again, and joins work once it is back.
    let mut back = back;
    let redis = redis.restart();
    let code = rt.block_on(back.closed()).expect("closed");
    assert_eq!(code, Some(1012), "told to claim again");
    let restarted = std::time::Instant::now();
    let again = loop {
        match join() {
            Ok(s) => break s,
            Err(_) => {
                assert!(
                    restarted.elapsed() < Duration::from_secs(15),
                    "no join {:?} after Redis restarted",
                    restarted.elapsed()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    drop((again, redis));
}

/// SIGTERM on a node of a cluster: everyone it serves is told to reconnect (1012), the
/// participants it hosted and the clients it carried to another node alike; it exits
/// within its drain deadline; and it gives its lease up, so they get back in through
/// another node at once, long before the lease would have run out.
#[test]
fn a_draining_node_hands_its_spaces_over_at_once() {
    let Some(c) = Cluster::new("cli-drain-") else {
        return;
    };
    let token = c.token.clone();
    // A lease far longer than the test: getting back in must not wait for it.
    let node = |id: &str| {
        c.node(
            id,
            &["--node-lease-ms", "60000", "--drain-timeout-ms", "3000"],
        )
    };
    let (mut a, b) = (node("a"), node("b"));
    let key = create(&a, &token, "/system/v1/signing-keys");
    let sign = |space: &str, participant: &str| c.sign(space, Some(participant), &key);
    let here = create(&a, &token, "/video/v1/spaces")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let there = create(&a, &token, "/video/v1/spaces")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (alice, dave, carol, eve) = (
        sign(&here, "alice"),
        sign(&there, "dave"),
        sign(&there, "carol"),
        sign(&here, "eve"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let join = |n: &Running, jwt: &str| {
        let ws = n.url.replacen("http://", "ws://", 1);
        rt.block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
    };
    // Alice is hosted on A; the other space lives on B, and Carol is carried there by A.
    let mut on_a = join(&a, &alice).expect("alice via A");
    let _dave = join(&b, &dave).expect("dave via B");
    let mut carried = join(&a, &carol).expect("carol via A, carried to B");
    // Eve's client hangs: it never answers the close; she must be let go all the same.
    let hung = rt.block_on(async {
        let url = spacegate_client::join_url(
            &a.url.replacen("http://", "ws://", 1),
            eve.trim(),
            &spacegate_client::JoinOptions::default(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("eve via A");
        ws
    });
    assert_eq!(carried.joined().participants.len(), 1, "carol sees dave");

    let term = std::time::Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    assert_eq!(rt.block_on(on_a.closed()).expect("alice"), Some(1012));
    assert_eq!(rt.block_on(carried.closed()).expect("carol"), Some(1012));
    let exited = a.child.wait().expect("A exits");
    assert!(exited.success(), "A exits cleanly: {exited:?}");
    assert!(
        term.elapsed() < Duration::from_secs(10),
        "A took {:?} to drain",
        term.elapsed()
    );
    // Both get back in through B right away (the lease is a minute long).
    let back = std::time::Instant::now();
    let alice_again = join(&b, &alice).expect("alice via B right after the drain");
    let carol_again = join(&b, &carol).expect("carol via B right after the drain");
    let eve_again = join(&b, &eve).expect("eve via B right after the drain");
    assert!(back.elapsed() < Duration::from_secs(5));
    drop((alice_again, carol_again, eve_again, hung));
}

/// A home node dies (kill -9) with its space active: the cluster ends the space in the
/// store once the node's lease has run out (nobody can be connected to a space no node
/// hosts), so it reads idle and can be deleted, with no join needed.
#[test]
fn a_space_whose_home_died_is_idle_again() {
    let Some(c) = Cluster::new("cli-orphan-") else {
        return;
    };
    let token = c.token.clone();
    let lease_ms: u64 = 1000;
    let node = |id: &str| c.node(id, &["--node-lease-ms", &lease_ms.to_string()]);
    let (mut a, b) = (node("a"), node("b"));
    let space = create(&a, &token, "/video/v1/spaces");
    let space_id = space["id"].as_str().expect("id").to_string();
    let key = create(&a, &token, "/system/v1/signing-keys");
    let jwt = c.sign(&space_id, None, &key);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ws = a.url.replacen("http://", "ws://", 1);
    let session = rt
        .block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
        .expect("join via A");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while space_status(&b, &token, &space_id) != "active" {
        assert!(std::time::Instant::now() < deadline, "never active");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.child.kill().expect("kill -9 A");
    a.child.wait().expect("reap");
    drop(session);
    let died = std::time::Instant::now();
    while space_status(&b, &token, &space_id) != "idle" {
        assert!(
            died.elapsed() < Duration::from_secs(15),
            "still active {:?} after its home died",
            died.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let res = http()
        .delete(format!("{}/video/v1/spaces/{space_id}", b.url))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("send");
    assert_eq!(res.status(), 204, "deletable once idle");
}

/// A TCP forwarder to the test PostgreSQL that can be cut (every connection dropped, new
/// ones refused) and restored: PostgreSQL "going away" without stopping the shared server.
struct CuttableProxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CuttableProxy {
    fn to(upstream: std::net::SocketAddr) -> CuttableProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let pipes = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                if let Ok(mut held) = o.lock() {
                    held.extend(client.try_clone().ok());
                    held.extend(server.try_clone().ok());
                }
                for pipe in pipes {
                    if let (Ok(mut from), Ok(mut to)) = pipe {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        CuttableProxy { port, cut, open }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut held) = self.open.lock() {
            for s in held.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// PostgreSQL goes away under a running node: REST answers a retryable 503 (with
/// `x-should-retry: true`) within seconds, joins whose key and space are cached keep
/// working, and everything recovers when it is back, without a restart.
#[test]
fn a_node_rides_out_a_postgresql_outage() {
    let Some(db) = TempPostgres::new() else {
        return;
    };
    let upstream: std::net::SocketAddr = "127.0.0.1:5432".parse().expect("addr");
    let proxy = CuttableProxy::to(upstream);
    let name = db.url.rsplit('/').next().expect("db name").to_string();
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/{name}", proxy.port);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = spacegate(dir.path());
    cmd.args(["--listen", "127.0.0.1:0", "--database-url", &via_proxy]);
    let a = start(cmd);
    let token = a.token.clone().expect("bootstrap token");
    let jwt = join_token(&a, dir.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let join = || {
        let ws = a.url.replacen("http://", "ws://", 1);
        rt.block_on(spacegate_client::Session::join(
            &ws,
            jwt.trim(),
            &spacegate_client::JoinOptions::default(),
        ))
    };
    drop(join().expect("a first join caches the key and the space"));

    proxy.cut();
    let asked = std::time::Instant::now();
    let res = http()
        .get(format!("{}/video/v1/spaces", a.url))
        .basic_auth(&token.0, Some(&token.1))
        .send()
        .expect("send");
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        asked.elapsed()
    );
    let during = join().expect("a join with a cached key during the outage");
    assert_eq!(status(&a, &token, "/healthz"), 200);
    drop(during);

    proxy.restore();
    let back = std::time::Instant::now();
    while status(&a, &token, "/video/v1/spaces") != 200 {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "REST not back {:?} after PostgreSQL",
            back.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The SDK reconnects with the token it joined with, which may have expired since. When
/// the participant's home node crashed (no departure was written), the reconnect lands
/// on another node, and is recognised there: the participant's entry under the dead node
/// stands for its departure.
#[test]
fn a_reconnect_on_an_expired_token_after_its_home_crashed_is_let_back_in() {
    let Some(c) = Cluster::new("cli-grace-") else {
        return;
    };
    let token = c.token.clone();
    let lease_ms: u64 = 1000;
    let node = |id: &str| c.node(id, &["--node-lease-ms", &lease_ms.to_string()]);
    let (mut a, b) = (node("a"), node("b"));
    let space = create(&a, &token, "/video/v1/spaces");
    let key = create(&a, &token, "/system/v1/signing-keys");
    let private =
        spacegate_auth::PrivateKey::parse(key["private_key"].as_str().expect("key")).expect("key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let sign = |expires_at: u64| {
        spacegate_auth::sign(
            &private,
            &spacegate_auth::SignOptions {
                key_id: key["id"].as_str().expect("kid").parse().expect("kid"),
                space_id: space["id"].as_str().expect("id").parse().expect("id"),
                expires_at,
                role: spacegate_proto::Role::Publisher,
                participant_id: Some("alice".parse().expect("id")),
            },
        )
        .expect("sign")
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let join = |n: &Running, jwt: &str, reconnect: bool| {
        let ws = n.url.replacen("http://", "ws://", 1);
        let options = spacegate_client::JoinOptions {
            reconnect_id: reconnect.then(|| "alice".to_string()),
            ..spacegate_client::JoinOptions::default()
        };
        rt.block_on(spacegate_client::Session::join(&ws, jwt, &options))
    };
    let session = join(&a, &sign(now + 3600), false).expect("alice via A");
    // The token she will come back with expired a minute ago: past the verifier's leeway,
    // within the reconnect grace.
    let expired = sign(now - 60);
    a.child.kill().expect("kill -9 A");
    a.child.wait().expect("reap");
    drop(session);
    std::thread::sleep(Duration::from_millis(lease_ms * 2));
    match join(&b, &expired, false) {
        Err(spacegate_client::ClientError::Rejected { error, .. }) => {
            assert!(error.message.contains("expired"), "{}", error.message)
        }
        other => panic!("an expired token is no way in by itself: {other:?}"),
    }
    let back = join(&b, &expired, true).expect("alice's reconnect through B");
    assert_eq!(back.joined().participant_id, "alice");
}

/// Three nodes: a thousand joins of one participant, spread over all of them at once,
/// admit exactly one; and when a node dies, a space homed on another node does not
/// notice.
#[test]
fn three_nodes_admit_one_of_a_thousand_and_survive_one_of_them() {
    let Some(c) = Cluster::new("cli-three-") else {
        return;
    };
    let token = c.token.clone();
    let lease_ms: u64 = 1000;
    let node = |id: &str| {
        let lease = lease_ms.to_string();
        c.node(id, &["--node-lease-ms", &lease, "--join-rate-per-ip", "0"])
    };
    let nodes = [node("a"), node("b"), node("c")];
    let key = create(&nodes[0], &token, "/system/v1/signing-keys");
    let sign = |space: &str, participant: &str| c.sign(space, Some(participant), &key);
    let raced = create(&nodes[0], &token, "/video/v1/spaces")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let calm = create(&nodes[0], &token, "/video/v1/spaces")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let racer = sign(&raced, "racer");
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| n.url.replacen("http://", "ws://", 1))
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (winners, mut kept) = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..1000 {
            let (url, jwt) = (urls[i % 3].clone(), racer.clone());
            tasks.push(tokio::spawn(async move {
                spacegate_client::Session::join(
                    &url,
                    &jwt,
                    &spacegate_client::JoinOptions {
                        timeout: Duration::from_secs(30),
                        ..spacegate_client::JoinOptions::default()
                    },
                )
                .await
                .ok()
            }));
        }
        let mut won = Vec::new();
        for t in tasks {
            if let Some(s) = t.await.expect("task") {
                won.push(s);
            }
        }
        (won.len(), won)
    });
    assert_eq!(winners, 1, "exactly one of 1000 racing joins gets in");
    drop(kept.pop());

    // Another space, homed wherever the cluster chooses (the least loaded node).
    let mut steady = rt
        .block_on(spacegate_client::Session::join(
            &urls[2],
            &sign(&calm, "steady"),
            &spacegate_client::JoinOptions::default(),
        ))
        .expect("steady via c");
    let mut watcher = rt
        .block_on(spacegate_client::Session::join(
            &urls[2],
            &sign(&calm, "watcher"),
            &spacegate_client::JoinOptions::default(),
        ))
        .expect("watcher via c");
    // A node that is neither that space's home nor the watcher's way in dies; the space
    // goes on: a custom event still gets from one to the other.
    let home = steady.joined().sub_sfus[0].sfu_id.clone();
    // Both entered through c: kill a node that is neither c nor the home.
    let victim = if home == "sfu-a" { 1 } else { 0 };
    let mut nodes = nodes;
    nodes[victim].child.kill().expect("kill -9");
    nodes[victim].child.wait().expect("reap");
    rt.block_on(async {
        let sent = steady
            .publish_custom_event("still-here", "{}")
            .await
            .expect("steady still connected");
        loop {
            match watcher
                .next()
                .await
                .expect("watcher still connected")
                .message
            {
                spacegate_proto::signaling::ServerMessage::CustomEvent(e) => {
                    assert_eq!(e.sequence_num, sent.sequence_num);
                    break;
                }
                _ => continue,
            }
        }
    });
}

/// The deploy files (compose, Kubernetes, Dockerfile) use only flags and `SPACEGATE_*`
/// settings that `spacegate serve` has: a renamed flag breaks this test, not a deployment.
#[test]
fn deploy_files_use_only_flags_and_settings_that_exist() {
    let help = run_ok(Command::new(BIN).args(["serve", "--help"]));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    for file in [
        "deploy/compose.yaml",
        "deploy/k8s/spacegate.yaml",
        "deploy/k8s/backing.yaml",
        "deploy/Dockerfile",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect("deploy file");
        let mut words = Vec::new();
        // Inside a `serve` command: a JSON-style array (until `]`) or a YAML list (while
        // lines are list items). Other programs' flags (redis-server's) are not ours.
        let mut serve: Option<bool> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if line.contains("\"serve\"") {
                serve = Some(true);
            } else if line == "- serve" {
                serve = Some(false);
            } else if serve == Some(false) && !line.starts_with("- ") {
                serve = None;
            }
            if serve.is_some() {
                for part in line.split('"').skip(1).step_by(2) {
                    if part.starts_with("--") {
                        words.push(part.to_string());
                    }
                }
                if let Some(flag) = line.strip_prefix("- --") {
                    words.push(format!("--{flag}"));
                }
            }
            if serve == Some(true) && line.contains(']') {
                serve = None;
            }
            // Settings given as environment variables.
            for (i, _) in line.match_indices("SPACEGATE_") {
                let name: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                words.push(name);
            }
        }
        for w in words {
            let known = if w.starts_with("--") {
                help.split(|c: char| c.is_whitespace() || c == ',' || c == '[')
                    .any(|h| h == w)
            } else {
                help.contains(&format!("env: {w}"))
            };
            assert!(
                known,
                "{file} uses {w}, which `spacegate serve` does not have"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "only {checked} flags and settings found: the parser is off"
    );
}
