//! Join-token verification throughput: the auth crate next to the floor it cannot beat, a
//! raw AWS-LC RSA-2048 PKCS#1 verification of the very same signature, in the same run.
//!
//!   cargo bench -p spacegate-benches --bench auth_verify
//!
//! After criterion's report it prints the ratio auth/raw from interleaved rounds (so both
//! see the same machine noise). The goal is ≥ 0.90: everything around the RSA operation
//! (base64, JSON, claim checks) must cost under a tenth of it.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, Throughput};
use spacegate_auth::{PrivateKey, SignOptions, VerifyOptions, sign, verify};
use spacegate_proto::{KeyId, Role};

struct Setup {
    token: String,
    keys: HashMap<KeyId, spacegate_auth::PublicKey>,
    raw_key: ParsedPublicKey,
    message: Vec<u8>,
    signature: Vec<u8>,
}

const NOW: u64 = 1_800_000_000;

fn setup() -> Setup {
    let key = PrivateKey::generate_rsa2048().expect("keygen");
    let kid: KeyId = "K3yId0123456789AbCdEfGhIjKlMn".parse().expect("kid");
    // A token shaped like mux-node's: a Mux-length space id, a role and a participant.
    let token = sign(
        &key,
        &SignOptions {
            key_id: kid.clone(),
            space_id: "Sp4ceR9dT2wq8Hn01kLmNoPqRsTuVwXy".parse().expect("space"),
            expires_at: NOW + 3600,
            role: Role::Publisher,
            participant_id: Some("participant-0001".parse().expect("pid")),
        },
    )
    .expect("sign");
    let (message, sig) = token.rsplit_once('.').expect("jws");
    let public = key.public_key().expect("public");
    let raw_key =
        ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public.der()).expect("parse key");
    Setup {
        message: message.as_bytes().to_vec(),
        signature: URL_SAFE_NO_PAD.decode(sig).expect("sig"),
        keys: HashMap::from([(kid, public)]),
        raw_key,
        token,
    }
}

fn auth_once(s: &Setup, opts: &VerifyOptions) {
    let claims = verify(black_box(&s.token), &s.keys, NOW, opts).expect("valid");
    black_box(claims);
}

fn raw_once(s: &Setup) {
    s.raw_key
        .verify_sig(black_box(&s.message), black_box(&s.signature))
        .expect("valid");
}

fn main() {
    let s = setup();
    let opts = VerifyOptions::default();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("rs256_verify");
        g.throughput(Throughput::Elements(1));
        g.bench_function("raw_aws_lc_rsa2048", |b| b.iter(|| raw_once(&s)));
        g.bench_function("spacegate_auth_verify", |b| b.iter(|| auth_once(&s, &opts)));
        g.bench_function("spacegate_auth_decode_only", |b| {
            b.iter(|| black_box(spacegate_auth::decode(black_box(&s.token)).expect("decode")))
        });
        g.finish();
    }
    c.final_summary();

    // Interleaved rounds, so a noisy neighbour slows both sides alike; the median of the
    // per-round ratios ignores the rounds a burst of noise hit only one side of.
    let (rounds, per_round) = (31, 1_000);
    let mut ratios = Vec::with_capacity(rounds);
    let (mut raw_total, mut auth_total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            raw_once(&s);
        }
        let raw = t.elapsed();
        let t = Instant::now();
        for _ in 0..per_round {
            auth_once(&s, &opts);
        }
        let auth = t.elapsed();
        ratios.push(raw.as_secs_f64() / auth.as_secs_f64());
        raw_total += raw;
        auth_total += auth;
    }
    ratios.sort_by(f64::total_cmp);
    let n = (rounds * per_round) as f64;
    println!(
        "interleaved: raw aws-lc {:.0} verify/s, spacegate-auth {:.0} verify/s, median ratio {:.3} (goal >= 0.90)",
        n / raw_total.as_secs_f64(),
        n / auth_total.as_secs_f64(),
        ratios[rounds / 2]
    );
}
