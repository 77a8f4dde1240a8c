//! The hostile-token suite: every way we know to forge, bend or break a join token, each
//! asserting the exact rule that refused it.

use std::collections::HashMap;

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use spacegate_auth::{
    AuthError, MAX_TOKEN_BYTES, PrivateKey, PublicKey, VerifyOptions, sign_raw, verify,
};
use spacegate_proto::KeyId;

const NOW: u64 = 1_800_000_000;

struct Fixture {
    key: PrivateKey,
    other: PrivateKey,
    keys: HashMap<KeyId, PublicKey>,
}

impl Fixture {
    fn new() -> Self {
        let key = PrivateKey::generate_rsa2048().expect("keygen");
        let other = PrivateKey::generate_rsa2048().expect("keygen");
        let keys = HashMap::from([("K1".parse().expect("kid"), key.public_key().expect("pk"))]);
        Fixture { key, other, keys }
    }

    fn raw(&self, header: &str, claims: &str) -> String {
        sign_raw(&self.key, header, claims).expect("sign")
    }

    fn tok(&self, header: Value, claims: Value) -> String {
        self.raw(&header.to_string(), &claims.to_string())
    }

    fn claims(&self, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut c = good_claims();
        f(c.as_object_mut().expect("object"));
        self.tok(good_header(), c)
    }

    fn header(&self, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut h = good_header();
        f(h.as_object_mut().expect("object"));
        self.tok(h, good_claims())
    }
}

fn good_header() -> Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": "K1"})
}

fn good_claims() -> Value {
    json!({"sub": "S1", "aud": "rt", "exp": NOW + 600, "role": "publisher", "participant_id": "alice"})
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// Replaces part `i` (0 header, 1 payload, 2 signature) of a token.
fn with_part(token: &str, i: usize, part: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[i] = part.to_string();
    parts.join(".")
}

#[test]
fn hostile_tokens_are_refused_for_the_right_reason() {
    let fx = Fixture::new();
    let good = fx.tok(good_header(), good_claims());
    verify(&good, &fx.keys, NOW, &VerifyOptions::default()).expect("the baseline verifies");
    let sig = good.split('.').nth(2).expect("sig").to_string();
    let signing_input = good.rsplit_once('.').expect("dot").0.to_string();
    let public_der = fx.keys.values().next().expect("key").der().to_vec();
    let hs256 = |key: &[u8], header: &str, claims: &str| {
        let input = format!("{}.{}", b64(header), b64(claims));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    };
    let claims_text = good_claims().to_string();
    let bad_part = |part| AuthError::BadBase64 { part };
    let claim_type = |claim| AuthError::WrongClaimType { claim };
    let missing = |claim| AuthError::MissingClaim { claim };

    let cases: Vec<(&str, String, AuthError)> = vec![
        // Size and shape, refused before any decoding work.
        (
            "oversized",
            format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES)),
            AuthError::TooLarge {
                max: MAX_TOKEN_BYTES,
            },
        ),
        ("empty", String::new(), AuthError::NotCompact),
        ("two parts", signing_input.clone(), AuthError::NotCompact),
        ("four parts", format!("{good}.{sig}"), AuthError::NotCompact),
        (
            "empty signature (alg none style)",
            format!("{signing_input}."),
            AuthError::NotCompact,
        ),
        (
            "empty header",
            with_part(&good, 0, ""),
            AuthError::NotCompact,
        ),
        (
            "JWE-like five parts",
            "a.b.c.d.e".into(),
            AuthError::NotCompact,
        ),
        // Encoding.
        (
            "header not base64url",
            with_part(&good, 0, "!!!"),
            bad_part("header"),
        ),
        (
            "header with base64 padding",
            with_part(&good, 0, &URL_SAFE.encode(r#"{"alg":"RS256","kid":"K1"}"#)),
            bad_part("header"),
        ),
        (
            "header in standard base64 alphabet",
            with_part(
                &good,
                0,
                &STANDARD.encode("{\"alg\":\"RS256\",\"kid\":\"K1\"}>>>?"),
            ),
            bad_part("header"),
        ),
        (
            "payload not base64url",
            with_part(&good, 1, "*"),
            bad_part("payload"),
        ),
        (
            "signature not base64url",
            with_part(&good, 2, "sig+nature/"),
            bad_part("signature"),
        ),
        (
            "trailing newline",
            format!("{good}\n"),
            bad_part("signature"),
        ),
        // JSON.
        (
            "header not JSON",
            with_part(&good, 0, &b64("alg=RS256")),
            AuthError::BadJson {
                part: "header",
                reason: String::new(),
            },
        ),
        (
            "header is an array",
            with_part(&good, 0, &b64("[\"RS256\"]")),
            AuthError::BadJson {
                part: "header",
                reason: String::new(),
            },
        ),
        (
            "payload not JSON",
            fx.raw(&good_header().to_string(), "sub=S1"),
            AuthError::BadJson {
                part: "payload",
                reason: String::new(),
            },
        ),
        (
            "payload is a string",
            fx.raw(&good_header().to_string(), "\"S1\""),
            AuthError::BadJson {
                part: "payload",
                reason: String::new(),
            },
        ),
        (
            "duplicate alg",
            fx.raw(r#"{"alg":"RS256","alg":"none","kid":"K1"}"#, &claims_text),
            AuthError::BadJson {
                part: "header",
                reason: String::new(),
            },
        ),
        (
            "duplicate exp",
            fx.raw(
                &good_header().to_string(),
                &format!(
                    r#"{{"sub":"S1","aud":"rt","exp":{},"exp":{}}}"#,
                    NOW + 600,
                    NOW + 99_999
                ),
            ),
            AuthError::BadJson {
                part: "payload",
                reason: String::new(),
            },
        ),
        (
            "duplicate sub",
            fx.raw(
                &good_header().to_string(),
                &format!(
                    r#"{{"sub":"S1","sub":"S2","aud":"rt","exp":{}}}"#,
                    NOW + 600
                ),
            ),
            AuthError::BadJson {
                part: "payload",
                reason: String::new(),
            },
        ),
        (
            "duplicate role",
            fx.raw(
                &good_header().to_string(),
                &format!(
                    r#"{{"sub":"S1","aud":"rt","exp":{},"role":"subscriber","role":"publisher"}}"#,
                    NOW + 600
                ),
            ),
            AuthError::BadJson {
                part: "payload",
                reason: String::new(),
            },
        ),
        // Algorithm.
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","kid":"K1"}"#),
                b64(&claims_text)
            ),
            AuthError::NotCompact,
        ),
        (
            "alg none with a signature",
            with_part(&good, 0, &b64(r#"{"alg":"none","kid":"K1"}"#)),
            AuthError::AlgorithmNotAllowed("none".into()),
        ),
        (
            "HS256 keyed with the public key (algorithm confusion)",
            hs256(&public_der, r#"{"alg":"HS256","kid":"K1"}"#, &claims_text),
            AuthError::AlgorithmNotAllowed("HS256".into()),
        ),
        (
            "HS512",
            hs256(b"secret", r#"{"alg":"HS512","kid":"K1"}"#, &claims_text),
            AuthError::AlgorithmNotAllowed("HS512".into()),
        ),
        (
            "RS512",
            fx.header(|h| {
                h.insert("alg".into(), json!("RS512"));
            }),
            AuthError::AlgorithmNotAllowed("RS512".into()),
        ),
        (
            "PS256",
            fx.header(|h| {
                h.insert("alg".into(), json!("PS256"));
            }),
            AuthError::AlgorithmNotAllowed("PS256".into()),
        ),
        (
            "ES256",
            fx.header(|h| {
                h.insert("alg".into(), json!("ES256"));
            }),
            AuthError::AlgorithmNotAllowed("ES256".into()),
        ),
        (
            "lower-case rs256",
            fx.header(|h| {
                h.insert("alg".into(), json!("rs256"));
            }),
            AuthError::AlgorithmNotAllowed("rs256".into()),
        ),
        (
            "alg as a number",
            fx.header(|h| {
                h.insert("alg".into(), json!(256));
            }),
            AuthError::AlgorithmNotAllowed("256".into()),
        ),
        (
            "alg missing",
            fx.header(|h| {
                h.remove("alg");
            }),
            AuthError::MissingAlgorithm,
        ),
        (
            "crit extension",
            fx.header(|h| {
                h.insert("crit".into(), json!(["exp"]));
            }),
            AuthError::UnsupportedHeader,
        ),
        // Key id.
        (
            "kid missing everywhere",
            fx.header(|h| {
                h.remove("kid");
            }),
            AuthError::MissingKeyId,
        ),
        (
            "kid header and payload differ",
            fx.claims(|c| {
                c.insert("kid".into(), json!("K2"));
            }),
            AuthError::KeyIdMismatch,
        ),
        (
            "kid is a number",
            fx.header(|h| {
                h.insert("kid".into(), json!(1));
            }),
            claim_type("kid"),
        ),
        (
            "kid with a path",
            fx.header(|h| {
                h.insert("kid".into(), json!("../K1"));
            }),
            AuthError::BadKeyId,
        ),
        (
            "kid unknown",
            fx.header(|h| {
                h.insert("kid".into(), json!("K9"));
            }),
            AuthError::UnknownKey,
        ),
        // Signature.
        (
            "signed by another key",
            with_part(
                &good,
                2,
                sign_raw(&fx.other, &good_header().to_string(), &claims_text)
                    .expect("sign")
                    .split('.')
                    .nth(2)
                    .expect("sig"),
            ),
            AuthError::BadSignature,
        ),
        (
            "signature truncated",
            with_part(
                &good,
                2,
                &URL_SAFE_NO_PAD.encode(&URL_SAFE_NO_PAD.decode(&sig).expect("sig")[..255]),
            ),
            AuthError::BadSignature,
        ),
        (
            "signature of another payload",
            with_part(
                &good,
                1,
                &b64(&good_claims().to_string().replace("publisher", "subscriber")),
            ),
            AuthError::BadSignature,
        ),
        (
            "signature all zero",
            with_part(&good, 2, &URL_SAFE_NO_PAD.encode([0u8; 256])),
            AuthError::BadSignature,
        ),
        // Audience.
        (
            "aud missing",
            fx.claims(|c| {
                c.remove("aud");
            }),
            missing("aud"),
        ),
        (
            "aud wrong",
            fx.claims(|c| {
                c.insert("aud".into(), json!("video"));
            }),
            AuthError::WrongAudience,
        ),
        (
            "aud array without rt",
            fx.claims(|c| {
                c.insert("aud".into(), json!(["video", "rtc", "RT"]));
            }),
            AuthError::WrongAudience,
        ),
        (
            "aud array with a non-string member",
            fx.claims(|c| {
                c.insert("aud".into(), json!(["rt", 1]));
            }),
            claim_type("aud"),
        ),
        (
            "aud array with a nested array",
            fx.claims(|c| {
                c.insert("aud".into(), json!([["rt"]]));
            }),
            claim_type("aud"),
        ),
        (
            "aud empty array",
            fx.claims(|c| {
                c.insert("aud".into(), json!([]));
            }),
            AuthError::WrongAudience,
        ),
        (
            "aud is a number",
            fx.claims(|c| {
                c.insert("aud".into(), json!(1));
            }),
            claim_type("aud"),
        ),
        // Time.
        (
            "exp missing",
            fx.claims(|c| {
                c.remove("exp");
            }),
            missing("exp"),
        ),
        (
            "exp null",
            fx.claims(|c| {
                c.insert("exp".into(), Value::Null);
            }),
            missing("exp"),
        ),
        (
            "exp past the leeway",
            fx.claims(|c| {
                c.insert("exp".into(), json!(NOW - 31));
            }),
            AuthError::Expired,
        ),
        (
            "exp negative",
            fx.claims(|c| {
                c.insert("exp".into(), json!(-1));
            }),
            AuthError::Expired,
        ),
        (
            "exp as a string",
            fx.claims(|c| {
                c.insert("exp".into(), json!((NOW + 600).to_string()));
            }),
            claim_type("exp"),
        ),
        (
            "nbf in the future",
            fx.claims(|c| {
                c.insert("nbf".into(), json!(NOW + 3600));
            }),
            AuthError::NotYetValid,
        ),
        (
            "nbf as a string",
            fx.claims(|c| {
                c.insert("nbf".into(), json!("soon"));
            }),
            claim_type("nbf"),
        ),
        (
            "iat in the future",
            fx.claims(|c| {
                c.insert("iat".into(), json!(NOW + 86_400));
            }),
            AuthError::IssuedInFuture,
        ),
        (
            "iat as a bool",
            fx.claims(|c| {
                c.insert("iat".into(), json!(true));
            }),
            claim_type("iat"),
        ),
        // Subject, role, participant.
        (
            "sub missing",
            fx.claims(|c| {
                c.remove("sub");
            }),
            missing("sub"),
        ),
        (
            "sub is a number",
            fx.claims(|c| {
                c.insert("sub".into(), json!(42));
            }),
            claim_type("sub"),
        ),
        (
            "sub empty",
            fx.claims(|c| {
                c.insert("sub".into(), json!(""));
            }),
            AuthError::BadSpaceId,
        ),
        (
            "sub with a slash",
            fx.claims(|c| {
                c.insert("sub".into(), json!("S1/../S2"));
            }),
            AuthError::BadSpaceId,
        ),
        (
            "sub of 256 characters",
            fx.claims(|c| {
                c.insert("sub".into(), json!("S".repeat(256)));
            }),
            AuthError::BadSpaceId,
        ),
        (
            "role admin",
            fx.claims(|c| {
                c.insert("role".into(), json!("admin"));
            }),
            AuthError::BadRole,
        ),
        (
            "role capitalised",
            fx.claims(|c| {
                c.insert("role".into(), json!("Publisher"));
            }),
            AuthError::BadRole,
        ),
        (
            "role empty",
            fx.claims(|c| {
                c.insert("role".into(), json!(""));
            }),
            AuthError::BadRole,
        ),
        (
            "role is an array",
            fx.claims(|c| {
                c.insert("role".into(), json!(["publisher"]));
            }),
            claim_type("role"),
        ),
        (
            "participant_id empty",
            fx.claims(|c| {
                c.insert("participant_id".into(), json!(""));
            }),
            AuthError::BadParticipantId,
        ),
        (
            "participant_id of 129 characters",
            fx.claims(|c| {
                c.insert("participant_id".into(), json!("p".repeat(129)));
            }),
            AuthError::BadParticipantId,
        ),
        (
            "participant_id with a newline",
            fx.claims(|c| {
                c.insert(
                    "participant_id".into(),
                    json!("alice\nINFO forged log line"),
                );
            }),
            AuthError::BadParticipantId,
        ),
        (
            "participant_id with HTML",
            fx.claims(|c| {
                c.insert("participant_id".into(), json!("<script>"));
            }),
            AuthError::BadParticipantId,
        ),
        (
            "participant_id is a number",
            fx.claims(|c| {
                c.insert("participant_id".into(), json!(7));
            }),
            claim_type("participant_id"),
        ),
    ];

    let mut names = std::collections::HashSet::new();
    for (name, token, expected) in &cases {
        assert!(names.insert(*name), "duplicate case name {name}");
        let got = verify(token, &fx.keys, NOW, &VerifyOptions::default());
        match (&got, expected) {
            // JSON errors carry serde's message; the part is what the suite pins down.
            (Err(AuthError::BadJson { part: got_part, .. }), AuthError::BadJson { part, .. }) => {
                assert_eq!(got_part, part, "{name}")
            }
            _ => assert_eq!(got.as_ref().err(), Some(expected), "{name}"),
        }
    }
    assert!(cases.len() >= 40, "{} cases", cases.len());
}

#[test]
fn boundaries_that_must_pass() {
    let fx = Fixture::new();
    let opts = VerifyOptions::default();
    let ok = |token: String| verify(&token, &fx.keys, NOW, &opts).expect("accepted");
    // Within the leeway on every time claim.
    ok(fx.claims(|c| {
        c.insert("exp".into(), json!(NOW - 29));
    }));
    ok(fx.claims(|c| {
        c.insert("nbf".into(), json!(NOW + 29));
        c.insert("iat".into(), json!(NOW + 29));
    }));
    // A millisecond exp (seen in the wild) is just a far-future time.
    ok(fx.claims(|c| {
        c.insert("exp".into(), json!(NOW * 1000));
    }));
    // A fractional exp is a valid NumericDate.
    ok(fx.claims(|c| {
        c.insert("exp".into(), json!(NOW as f64 + 0.5));
    }));
    // kid only in the payload (mux-node 8), one-element aud array, no role, extra claims.
    let c = ok(fx.tok(
        json!({"alg": "RS256"}),
        json!({"kid": "K1", "sub": "S1", "aud": ["rt"], "exp": NOW + 1, "app": {"x": 1}}),
    ));
    assert_eq!(c.role, spacegate_proto::Role::Publisher);
    assert_eq!(c.participant_id, None);
    // RFC 7519 §4.1.3: "rt" among several audiences, in any position.
    for aud in [
        json!(["rt", "video"]),
        json!(["video", "rt"]),
        json!(["a", "rt", "b"]),
    ] {
        ok(fx.claims(|c| {
            c.insert("aud".into(), aud.clone());
        }));
    }
    // Same kid in both places.
    ok(fx.claims(|c| {
        c.insert("kid".into(), json!("K1"));
    }));
    // A leeway of zero is exact.
    let strict = VerifyOptions {
        leeway_secs: 0,
        expiry_grace_secs: 0,
    };
    let t = fx.claims(|c| {
        c.insert("exp".into(), json!(NOW));
    });
    assert_eq!(verify(&t, &fx.keys, NOW, &strict), Err(AuthError::Expired));
    let t = fx.claims(|c| {
        c.insert("exp".into(), json!(NOW + 1));
    });
    verify(&t, &fx.keys, NOW, &strict).expect("one second left");
}

#[test]
fn the_expiry_grace_stretches_exp_and_nothing_else() {
    let fx = Fixture::new();
    let grace = VerifyOptions {
        leeway_secs: 0,
        expiry_grace_secs: 300,
    };
    // Expired four minutes ago: inside a five-minute grace, refused without it.
    let t = fx.claims(|c| {
        c.insert("exp".into(), json!(NOW - 240));
    });
    verify(&t, &fx.keys, NOW, &grace).expect("within the grace");
    let strict = VerifyOptions {
        leeway_secs: 0,
        expiry_grace_secs: 0,
    };
    assert_eq!(verify(&t, &fx.keys, NOW, &strict), Err(AuthError::Expired));
    // `nbf` and `iat` four minutes ahead stay refused with the grace: a reconnect makes
    // no token valid earlier.
    let t = fx.claims(|c| {
        c.insert("nbf".into(), json!(NOW + 240));
    });
    assert_eq!(
        verify(&t, &fx.keys, NOW, &grace),
        Err(AuthError::NotYetValid)
    );
    let t = fx.claims(|c| {
        c.insert("iat".into(), json!(NOW + 240));
    });
    assert_eq!(
        verify(&t, &fx.keys, NOW, &grace),
        Err(AuthError::IssuedInFuture)
    );
}
