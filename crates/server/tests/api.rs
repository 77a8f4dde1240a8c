//! Every REST endpoint and every error of the control plane, against a real server on a
//! real socket (port 0), driven over HTTP.

mod common;

use common::{TestServer, data, expect_error};
use reqwest::Method;
use serde_json::{Value, json};
use spacegate_auth::{AuthError, PrivateKey, SignOptions, VerifyOptions};
use spacegate_proto::{Role, SessionId, SpaceId};
use spacegate_server::join::{JoinAuthError, verify_join_token};

#[tokio::test]
async fn space_lifecycle() {
    let s = TestServer::start().await;
    let space = s
        .create_space(json!({"passthrough": "standup-42", "type": "server", "extra": 1}))
        .await;
    let id = space["id"].as_str().expect("id");
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(space["type"], "server");
    assert_eq!(space["status"], "idle");
    assert_eq!(space["passthrough"], "standup-42");
    assert_eq!(space["broadcasts"], json!([]));
    assert!(space.get("active_session_id").is_none());
    let created: i64 = space["created_at"]
        .as_str()
        .expect("created_at is a string")
        .parse()
        .expect("epoch seconds");
    assert!((spacegate_server::now_secs() - created).abs() < 60);

    let got = data(
        s.req(Method::GET, &format!("/video/v1/spaces/{id}"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(got, space);

    let res = s
        .req(Method::DELETE, &format!("/video/v1/spaces/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(res.status(), 204);
    assert!(res.bytes().await.expect("body").is_empty());
    let res = s
        .req(Method::GET, &format!("/video/v1/spaces/{id}"))
        .send()
        .await
        .expect("get");
    expect_error(res, 404, "not_found").await;
    let res = s
        .req(Method::DELETE, &format!("/video/v1/spaces/{id}"))
        .send()
        .await
        .expect("delete");
    expect_error(res, 404, "not_found").await;
}

#[tokio::test]
async fn create_accepts_empty_and_empty_object_bodies() {
    let s = TestServer::start().await;
    // What mux-node sends: JSON content type, zero-length body.
    let res = s
        .req(Method::POST, "/video/v1/spaces")
        .header("content-type", "application/json")
        .header("content-length", "0")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    let space = data(res).await;
    assert!(space.get("passthrough").is_none());
    let res = s
        .req(Method::POST, "/video/v1/spaces")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    assert_eq!(s.space_count().await, 2);
}

#[tokio::test]
async fn bad_space_bodies_are_refused_and_change_nothing() {
    let s = TestServer::start().await;
    let cases: Vec<(&str, String)> = vec![
        ("malformed JSON", "{\"passthrough\":".into()),
        ("not an object", "[1,2]".into()),
        ("wrong type", "{\"passthrough\": 5}".into()),
        ("bad type enum", "{\"type\": \"p2p\"}".into()),
        (
            "passthrough too long",
            json!({"passthrough": "x".repeat(256)}).to_string(),
        ),
    ];
    for (what, body) in cases {
        let res = s
            .req(Method::POST, "/video/v1/spaces")
            .body(body)
            .send()
            .await
            .expect("send");
        let msg = expect_error(res, 400, "invalid_parameters").await;
        assert!(!msg.is_empty(), "{what}");
    }
    // 255 characters (multi-byte ones too) is the limit, not 255 bytes.
    s.create_space(json!({"passthrough": "é".repeat(255)}))
        .await;
    assert_eq!(
        s.space_count().await,
        1,
        "only the valid create went through"
    );
}

#[tokio::test]
async fn huge_bodies_are_refused() {
    let s = TestServer::start().await;
    let body = json!({"passthrough": "x".repeat(200 * 1024)}).to_string();
    let res = s
        .req(Method::POST, "/video/v1/spaces")
        // The server answers 413 before reading the whole body and then drops the
        // connection; it must not go back into the pool for the next request.
        .header("connection", "close")
        .body(body)
        .send()
        .await
        .expect("send");
    let msg = expect_error(res, 413, "invalid_parameters").await;
    assert!(msg.contains("65536"), "{msg}");
    assert_eq!(s.space_count().await, 0);
}

#[tokio::test]
async fn broadcasts_are_not_supported_yet() {
    let s = TestServer::start().await;
    let res = s
        .req(Method::POST, "/video/v1/spaces")
        .json(&json!({"broadcasts": [{"live_stream_id": "LS"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.headers()["x-should-retry"], "false");
    let msg = expect_error(res, 501, "not_implemented").await;
    assert!(msg.contains("not supported yet"), "{msg}");
    assert_eq!(s.space_count().await, 0);

    let id = s.create_space(json!({})).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let calls = [
        (Method::POST, format!("/video/v1/spaces/{id}/broadcasts")),
        (Method::GET, format!("/video/v1/spaces/{id}/broadcasts/B1")),
        (
            Method::DELETE,
            format!("/video/v1/spaces/{id}/broadcasts/B1"),
        ),
        (
            Method::POST,
            format!("/video/v1/spaces/{id}/broadcasts/B1/start"),
        ),
        (
            Method::POST,
            format!("/video/v1/spaces/{id}/broadcasts/B1/stop"),
        ),
    ];
    for (method, path) in &calls {
        let res = s.req(method.clone(), path).send().await.expect("send");
        expect_error(res, 501, "not_implemented").await;
        // A missing space is still a 404, and no credentials still a 401.
        let missing = path.replace(&id, "nosuchspace");
        let res = s.req(method.clone(), &missing).send().await.expect("send");
        expect_error(res, 404, "not_found").await;
        let res = s
            .http
            .request(method.clone(), s.url(path))
            .send()
            .await
            .expect("send");
        expect_error(res, 401, "unauthorized").await;
    }
}

#[tokio::test]
async fn pagination_pages_through_in_creation_order() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            s.create_space(json!({"passthrough": format!("p{i}")}))
                .await["id"]
                .clone(),
        );
    }
    let page = |q: &'static str| {
        let req = s.req(Method::GET, &format!("/video/v1/spaces{q}"));
        async move { data(req.send().await.expect("send")).await }
    };
    let ids_of = |v: Value| -> Vec<Value> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x["id"].clone())
            .collect()
    };
    assert_eq!(ids_of(page("?limit=2&page=1").await), ids[0..2]);
    assert_eq!(ids_of(page("?limit=2&page=2").await), ids[2..4]);
    assert_eq!(ids_of(page("?limit=2&page=3").await), ids[4..5]);
    assert_eq!(page("?limit=2&page=4").await, json!([]));
    assert_eq!(page("?limit=2&page=4000000000").await, json!([]));
    assert_eq!(ids_of(page("").await), ids, "default limit 25, page 1");
    assert_eq!(
        ids_of(page("?limit=100&foo=bar").await),
        ids,
        "unknown params ignored"
    );
    for bad in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "page=0",
        "page=-1",
        "limit=2.5",
    ] {
        let res = s
            .req(Method::GET, &format!("/video/v1/spaces?{bad}"))
            .send()
            .await
            .expect("send");
        let msg = expect_error(res, 400, "invalid_parameters").await;
        assert!(msg.contains("must be an integer"), "{bad}: {msg}");
    }
}

#[tokio::test]
async fn trailing_slashes_are_accepted() {
    let s = TestServer::start().await;
    let res = s
        .req(Method::POST, "/video/v1/spaces/")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    let id = data(res).await["id"].as_str().expect("id").to_string();
    let res = s
        .req(Method::GET, &format!("/video/v1/spaces/{id}/"))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let res = s
        .req(Method::POST, "/video/v1/signing-keys/")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    let res = s
        .req(Method::GET, "/video/v1/signing-keys/")
        .send()
        .await
        .expect("send");
    assert_eq!(data(res).await.as_array().expect("list").len(), 1);
}

#[tokio::test]
async fn credentials_are_checked_on_every_call() {
    let s = TestServer::start().await;
    let (id, secret) = s.token.clone();
    let paths = [
        "/video/v1/spaces",
        "/video/v1/signing-keys",
        "/system/v1/signing-keys",
    ];
    for path in paths {
        let res = s.http.get(s.url(path)).send().await.expect("send");
        assert_eq!(
            res.headers()["www-authenticate"],
            "Basic realm=\"spacegate\""
        );
        expect_error(res, 401, "unauthorized").await;
        let wrong = [
            s.http.get(s.url(path)).basic_auth(&id, Some("wrong")),
            s.http.get(s.url(path)).basic_auth(&id, None::<&str>),
            s.http.get(s.url(path)).basic_auth("unknown", Some(&secret)),
            s.http
                .get(s.url(path))
                .basic_auth("bad id/with slash", Some(&secret)),
            s.http
                .get(s.url(path))
                .header("authorization", "Basic !!!notbase64"),
            s.http
                .get(s.url(path))
                .header("authorization", format!("Bearer {secret}")),
        ];
        for req in wrong {
            expect_error(req.send().await.expect("send"), 401, "unauthorized").await;
        }
    }
    // Revocation takes effect on the next request.
    let extra = s.token("default", "read,write").await;
    let res = s
        .req_as(&extra, Method::GET, "/video/v1/spaces")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let tid = extra.0.parse().expect("token id");
    assert!(
        s.state
            .store
            .revoke_access_token(&tid)
            .await
            .expect("revoke")
    );
    let res = s
        .req_as(&extra, Method::GET, "/video/v1/spaces")
        .send()
        .await
        .expect("send");
    expect_error(res, 401, "unauthorized").await;
}

#[tokio::test]
async fn read_only_tokens_cannot_write() {
    let s = TestServer::start().await;
    let space = s.create_space(json!({})).await;
    let id = space["id"].as_str().expect("id");
    let key = data(
        s.req(Method::POST, "/system/v1/signing-keys")
            .send()
            .await
            .expect("key"),
    )
    .await;
    let kid = key["id"].as_str().expect("kid");
    let ro = s.token("default", "read").await;

    for path in [
        format!("/video/v1/spaces/{id}"),
        "/video/v1/spaces".into(),
        format!("/system/v1/signing-keys/{kid}"),
    ] {
        let res = s
            .req_as(&ro, Method::GET, &path)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200, "{path}");
    }
    let writes = [
        (Method::POST, "/video/v1/spaces".to_string()),
        (Method::DELETE, format!("/video/v1/spaces/{id}")),
        (Method::POST, "/video/v1/signing-keys".into()),
        (Method::POST, "/system/v1/signing-keys".into()),
        (Method::DELETE, format!("/video/v1/signing-keys/{kid}")),
        (Method::DELETE, format!("/system/v1/signing-keys/{kid}")),
        (Method::POST, format!("/video/v1/spaces/{id}/broadcasts")),
    ];
    for (method, path) in writes {
        let res = s
            .req_as(&ro, method.clone(), &path)
            .send()
            .await
            .expect("send");
        assert_eq!(res.headers()["x-should-retry"], "false");
        expect_error(res, 403, "forbidden").await;
    }
    assert_eq!(s.space_count().await, 1);
    let keys = data(
        s.req(Method::GET, "/system/v1/signing-keys")
            .send()
            .await
            .expect("list"),
    )
    .await;
    assert_eq!(keys.as_array().expect("keys").len(), 1);

    let wo = s.token("default", "write").await;
    let res = s
        .req_as(&wo, Method::GET, "/video/v1/spaces")
        .send()
        .await
        .expect("send");
    expect_error(res, 403, "forbidden").await;
}

#[tokio::test]
async fn environments_are_isolated() {
    let s = TestServer::start().await;
    let space = s.create_space(json!({})).await;
    let id = space["id"].as_str().expect("id");
    let key = data(
        s.req(Method::POST, "/video/v1/signing-keys")
            .send()
            .await
            .expect("key"),
    )
    .await;
    let kid = key["id"].as_str().expect("kid");

    let other = s.token("staging", "read,write").await;
    for path in [
        format!("/video/v1/spaces/{id}"),
        format!("/video/v1/signing-keys/{kid}"),
        format!("/system/v1/signing-keys/{kid}"),
    ] {
        let res = s
            .req_as(&other, Method::GET, &path)
            .send()
            .await
            .expect("send");
        expect_error(res, 404, "not_found").await;
        let res = s
            .req_as(&other, Method::DELETE, &path)
            .send()
            .await
            .expect("send");
        expect_error(res, 404, "not_found").await;
    }
    for path in ["/video/v1/spaces", "/system/v1/signing-keys"] {
        let list = data(
            s.req_as(&other, Method::GET, path)
                .send()
                .await
                .expect("list"),
        )
        .await;
        assert_eq!(list, json!([]), "{path}");
    }
    // Still there for the owner.
    let res = s
        .req(Method::GET, &format!("/video/v1/spaces/{id}"))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let res = s
        .req(Method::GET, &format!("/video/v1/signing-keys/{kid}"))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn signing_keys_under_both_prefixes() {
    let s = TestServer::start().await;
    let old = s
        .req(Method::POST, "/video/v1/signing-keys")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(old.status(), 201);
    let old = data(old).await;
    let new = s
        .req(Method::POST, "/system/v1/signing-keys")
        .send()
        .await
        .expect("send");
    assert_eq!(new.status(), 201);
    let new = data(new).await;
    for key in [&old, &new] {
        assert!(
            key["created_at"]
                .as_str()
                .expect("string")
                .parse::<i64>()
                .is_ok()
        );
        let private = key["private_key"].as_str().expect("private key once");
        let pair = PrivateKey::parse(private).expect("base64 PEM that parses");
        let pem = String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, private)
                .expect("base64"),
        )
        .expect("utf8");
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "PKCS#1");
        // The stored public key is the pair's public half.
        let kid = key["id"].as_str().expect("id").parse().expect("kid");
        let stored = s
            .state
            .store
            .signing_key_any_environment(&kid)
            .await
            .expect("store")
            .expect("stored");
        assert_eq!(stored.public_key_der, pair.public_key_der());
    }
    assert_ne!(old["private_key"], new["private_key"]);
    // One store behind both prefixes; list and retrieve never show the private key.
    for prefix in ["/video/v1/signing-keys", "/system/v1/signing-keys"] {
        let list = data(s.req(Method::GET, prefix).send().await.expect("list")).await;
        let list = list.as_array().expect("array");
        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|k| k.get("private_key").is_none()));
        let one = data(
            s.req(
                Method::GET,
                &format!("{prefix}/{}", new["id"].as_str().expect("id")),
            )
            .send()
            .await
            .expect("get"),
        )
        .await;
        assert_eq!(
            one,
            json!({"id": new["id"], "created_at": new["created_at"]})
        );
    }
    let res = s
        .req(
            Method::DELETE,
            &format!(
                "/system/v1/signing-keys/{}",
                old["id"].as_str().expect("id")
            ),
        )
        .send()
        .await
        .expect("del");
    assert_eq!(res.status(), 204);
    let res = s
        .req(
            Method::GET,
            &format!("/video/v1/signing-keys/{}", old["id"].as_str().expect("id")),
        )
        .send()
        .await
        .expect("get");
    expect_error(res, 404, "not_found").await;
    let list = data(
        s.req(Method::GET, "/video/v1/signing-keys?limit=1&page=2")
            .send()
            .await
            .expect("list"),
    )
    .await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn malformed_ids_are_clear_errors() {
    let s = TestServer::start().await;
    let long = "a".repeat(256);
    for path in [
        format!("/video/v1/spaces/{long}"),
        format!("/system/v1/signing-keys/{long}"),
        "/video/v1/spaces/a%20b".to_string(),
    ] {
        let res = s.req(Method::GET, &path).send().await.expect("send");
        let msg = expect_error(res, 400, "invalid_parameters").await;
        assert!(msg.starts_with("Failed to parse ID"), "{msg}");
    }
}

#[tokio::test]
async fn deleting_an_active_space_is_a_conflict() {
    let s = TestServer::start().await;
    let id = s.create_space(json!({})).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let space_id: SpaceId = id.parse().expect("space id");
    // The join path's hook: the first participant activates the space.
    let session: SessionId = "S3ss10n".parse().expect("session");
    assert!(
        s.state
            .store
            .mark_space_active(&space_id, &session)
            .await
            .expect("activate")
    );
    let got = data(
        s.req(Method::GET, &format!("/video/v1/spaces/{id}"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(got["status"], "active");
    assert_eq!(got["active_session_id"], "S3ss10n");

    let res = s
        .req(Method::DELETE, &format!("/video/v1/spaces/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(
        res.headers()["x-should-retry"],
        "false",
        "mux-node 8 must not retry"
    );
    expect_error(res, 409, "conflict").await;
    assert_eq!(s.space_count().await, 1);

    assert!(
        s.state
            .store
            .mark_space_idle(&space_id)
            .await
            .expect("idle")
    );
    let got = data(
        s.req(Method::GET, &format!("/video/v1/spaces/{id}"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(got["status"], "idle");
    assert!(got.get("active_session_id").is_none());
    let res = s
        .req(Method::DELETE, &format!("/video/v1/spaces/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(res.status(), 204);
}

#[tokio::test]
async fn deleting_a_key_stops_its_tokens_at_once() {
    let s = TestServer::start().await;
    let space = s.create_space(json!({})).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let key = data(
        s.req(Method::POST, "/system/v1/signing-keys")
            .send()
            .await
            .expect("key"),
    )
    .await;
    let kid = key["id"].as_str().expect("kid").to_string();
    let private = PrivateKey::parse(key["private_key"].as_str().expect("pk")).expect("parse");
    let now = spacegate_server::now_secs() as u64;
    let token = spacegate_auth::sign(
        &private,
        &SignOptions {
            key_id: kid.parse().expect("kid"),
            space_id: space.parse().expect("space"),
            expires_at: now + 3600,
            role: Role::Subscriber,
            participant_id: Some("alice".parse().expect("pid")),
        },
    )
    .expect("sign");
    let opts = VerifyOptions::default();
    let verify = || verify_join_token(s.state.store.as_ref(), &s.state.keys, &token, now, &opts);
    let admitted = verify().await.expect("valid before delete");
    assert_eq!(admitted.claims.role, Role::Subscriber);
    assert_eq!(admitted.claims.space_id.as_str(), space);
    assert_eq!(s.state.keys.len(), 1, "the parsed key is cached");

    let res = s
        .req(Method::DELETE, &format!("/video/v1/signing-keys/{kid}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(res.status(), 204);
    match verify().await {
        Err(JoinAuthError::Token(AuthError::UnknownKey)) => {}
        other => panic!("expected UnknownKey after delete, got {other:?}"),
    }

    // A key of another environment cannot admit to this space.
    let other = s.token("staging", "read,write").await;
    let key2 = data(
        s.req_as(&other, Method::POST, "/system/v1/signing-keys")
            .send()
            .await
            .expect("key"),
    )
    .await;
    let private2 = PrivateKey::parse(key2["private_key"].as_str().expect("pk")).expect("parse");
    let token2 = spacegate_auth::sign(
        &private2,
        &SignOptions {
            key_id: key2["id"].as_str().expect("kid").parse().expect("kid"),
            space_id: space.parse().expect("space"),
            expires_at: now + 3600,
            role: Role::Publisher,
            participant_id: None,
        },
    )
    .expect("sign");
    match verify_join_token(
        s.state.store.as_ref(),
        &s.state.keys,
        &token2,
        now,
        &VerifyOptions::default(),
    )
    .await
    {
        Err(JoinAuthError::Token(AuthError::WrongEnvironment)) => {}
        other => panic!("expected WrongEnvironment, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_get_mux_errors() {
    let s = TestServer::start().await;
    let res = s
        .req(Method::GET, "/video/v1/nothing")
        .send()
        .await
        .expect("send");
    expect_error(res, 404, "not_found").await;
    let res = s
        .req(Method::PUT, "/video/v1/spaces")
        .send()
        .await
        .expect("send");
    expect_error(res, 405, "invalid_parameters").await;
}

#[tokio::test]
async fn health_endpoints() {
    let s = TestServer::start().await;
    let res = s.http.get(s.url("/healthz")).send().await.expect("send");
    assert_eq!(res.status(), 200);
    let res = s.http.get(s.url("/readyz")).send().await.expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json")["status"], "ready");
}

#[tokio::test]
async fn openapi_documents_exactly_what_is_served() {
    let s = TestServer::start().await;
    let doc: Value = s
        .http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    let paths = doc["paths"].as_object().expect("paths");
    let mut op_ids = std::collections::HashSet::new();
    let mut count = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{SPACE_ID}", "nosuchspace")
            .replace("{SIGNING_KEY_ID}", "nosuchkey")
            .replace("{BROADCAST_ID}", "b");
        for (method, op) in item.as_object().expect("item") {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            assert!(
                op_ids.insert(op["operationId"].as_str().expect("operationId").to_string()),
                "duplicate operationId at {path}"
            );
            // Documented means routed: without credentials every documented call is a 401,
            // never the router's 404 or 405.
            let res = s
                .http
                .request(m.clone(), s.url(&concrete))
                .send()
                .await
                .expect("send");
            assert_eq!(res.status(), 401, "{method} {path}");
            count += 1;
        }
    }
    assert_eq!(
        count, 17,
        "9 space and broadcast calls, 4 signing-key calls under 2 prefixes"
    );
    assert!(paths.contains_key("/system/v1/signing-keys/{SIGNING_KEY_ID}"));
}
