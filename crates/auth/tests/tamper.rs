//! Property: a valid token with any single byte changed is rejected. Checked exhaustively,
//! not by sampling: every position, every other ASCII byte (a token reaches us as a `&str`
//! from a URL, so non-ASCII bytes cannot be substituted alone).

use std::collections::HashMap;

use spacegate_auth::{PrivateKey, SignOptions, VerifyOptions, sign, verify};
use spacegate_proto::Role;

#[test]
fn any_single_byte_change_is_rejected() {
    let key = PrivateKey::generate_rsa2048().expect("keygen");
    let kid: spacegate_proto::KeyId = "K1".parse().expect("kid");
    let token = sign(
        &key,
        &SignOptions {
            key_id: kid.clone(),
            space_id: "S1".parse().expect("space"),
            expires_at: 2_000_000_000,
            role: Role::Subscriber,
            participant_id: Some("alice".parse().expect("pid")),
        },
    )
    .expect("sign");
    let keys = HashMap::from([(kid, key.public_key().expect("public"))]);
    let opts = VerifyOptions::default();
    let now = 1_900_000_000;
    verify(&token, &keys, now, &opts).expect("the original verifies");

    let mut bytes = token.clone().into_bytes();
    let mut tried = 0u32;
    for i in 0..bytes.len() {
        let original = bytes[i];
        for b in 0u8..=127 {
            if b == original {
                continue;
            }
            bytes[i] = b;
            let tampered = std::str::from_utf8(&bytes).expect("ASCII");
            assert!(
                verify(tampered, &keys, now, &opts).is_err(),
                "byte {i} changed from {:?} to {:?} still verifies",
                original as char,
                b as char
            );
            tried += 1;
        }
        bytes[i] = original;
    }
    assert_eq!(tried as usize, token.len() * 127);
    // Truncation and extension at either end, too.
    assert!(verify(&token[..token.len() - 1], &keys, now, &opts).is_err());
    assert!(verify(&token[1..], &keys, now, &opts).is_err());
    assert!(verify(&format!("{token}A"), &keys, now, &opts).is_err());
}
