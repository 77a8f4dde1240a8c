//! The join-token parser on arbitrary input: it must never panic, never accept what it
//! cannot verify, and give every refusal a reason.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spacegate_auth::{PrivateKey, PublicKey, VerifyOptions};
use spacegate_proto::KeyId;

fn keys() -> &'static HashMap<KeyId, PublicKey> {
    static KEYS: OnceLock<HashMap<KeyId, PublicKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = PrivateKey::generate_rsa2048().expect("keygen");
        HashMap::from([("K1".parse().expect("kid"), key.public_key().expect("public"))])
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(unverified) = spacegate_auth::decode(text) {
        assert!(!unverified.kid().as_str().is_empty());
    }
    // Nobody holds this private key, so nothing the fuzzer makes may verify.
    let result = spacegate_auth::verify(text, keys(), 1_800_000_000, &VerifyOptions::default());
    assert!(result.is_err(), "forged token accepted: {text:?}");
});
