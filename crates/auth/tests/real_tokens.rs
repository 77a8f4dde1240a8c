//! Tokens made by the real signers Mux users have (mux-node 7 and 8, the Mux CLI, plain
//! jsonwebtoken as in Mux Meet, and `spacegate sign`) verify, with the claims each put in.
//! Regenerate with `fixtures/generator` (see its generate.js).

use std::collections::HashMap;

use serde_json::Value;
use spacegate_auth::{AuthError, PublicKey, VerifyOptions, verify};
use spacegate_proto::{KeyId, Role};

/// 2027-01-15: after the fixtures were made (one has an `iat`), decades before they expire.
const NOW: u64 = 1_800_000_000;

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/real-tokens.json")).expect("fixture JSON")
}

fn keys(f: &Value) -> HashMap<KeyId, PublicKey> {
    let key = PublicKey::from_pem(f["public_key_pem"].as_str().expect("pem")).expect("key");
    HashMap::from([(
        f["key_id"].as_str().expect("kid").parse().expect("kid"),
        key,
    )])
}

#[test]
fn every_real_signer_is_accepted() {
    let f = fixtures();
    let keys = keys(&f);
    let tokens = f["tokens"].as_array().expect("tokens");
    let signers: Vec<&str> = tokens
        .iter()
        .map(|t| t["signer"].as_str().expect("signer"))
        .collect();
    for needed in [
        "mux-node@7.3.5",
        "mux-node@8.8.0",
        "@mux/cli@0.8.0",
        "jsonwebtoken",
        "spacegate sign",
    ] {
        assert!(
            signers.iter().any(|s| s.contains(needed)),
            "no fixture from {needed}"
        );
    }
    for t in tokens {
        let signer = t["signer"].as_str().expect("signer");
        let claims = verify(
            t["token"].as_str().expect("token"),
            &keys,
            NOW,
            &VerifyOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{signer}: {e}"));
        assert_eq!(claims.space_id.as_str(), f["space_id"], "{signer}");
        assert_eq!(claims.key_id.as_str(), f["key_id"], "{signer}");
        let role: Role = t["role"].as_str().expect("role").parse().expect("role");
        assert_eq!(claims.role, role, "{signer}");
        assert_eq!(
            claims.participant_id.as_ref().map(|p| p.as_str()),
            t["participant_id"].as_str(),
            "{signer}"
        );
        assert!(claims.expires_at > NOW + 40 * 365 * 86_400, "{signer}");
    }
}

#[test]
fn real_tokens_expire() {
    let f = fixtures();
    let keys = keys(&f);
    let later = NOW + 60 * 365 * 86_400;
    for t in f["tokens"].as_array().expect("tokens") {
        let err = verify(
            t["token"].as_str().expect("token"),
            &keys,
            later,
            &VerifyOptions::default(),
        )
        .expect_err("expired");
        assert_eq!(err, AuthError::Expired);
        assert!(err.is_expiry());
    }
}

#[test]
fn real_tokens_need_their_key() {
    let f = fixtures();
    let other = spacegate_auth::PrivateKey::generate_rsa2048().expect("keygen");
    let kid: KeyId = f["key_id"].as_str().expect("kid").parse().expect("kid");
    let wrong = HashMap::from([(kid, other.public_key().expect("public"))]);
    for t in f["tokens"].as_array().expect("tokens") {
        let token = t["token"].as_str().expect("token");
        assert_eq!(
            verify(token, &wrong, NOW, &VerifyOptions::default()),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(token, &HashMap::new(), NOW, &VerifyOptions::default()),
            Err(AuthError::UnknownKey)
        );
    }
}
