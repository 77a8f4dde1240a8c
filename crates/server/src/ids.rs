//! Server-made identifiers and secrets: base62 strings from the OS CSPRNG (via AWS-LC).

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` uniformly random base62 characters. Bytes ≥ 248 are dropped rather than reduced
/// mod 62, which would make the first eight characters of the alphabet more likely.
pub fn random_base62(len: usize) -> String {
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        // The OS RNG does not fail on Linux once booted; if it ever did, a panic beats
        // handing out a predictable secret.
        rng.fill(&mut buf).expect("system RNG failed");
        for &b in &buf {
            if b < 248 && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    out
}

/// Ids look like Mux's: 32 characters of `[A-Za-z0-9]`.
pub fn new_id<T: std::str::FromStr>() -> T
where
    T::Err: std::fmt::Debug,
{
    random_base62(32)
        .parse()
        .expect("base62 ids are valid for every id type")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_base62_and_distinct() {
        let a = random_base62(32);
        let b = random_base62(32);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        // Every character of the alphabet shows up in a long sample, so none is dropped.
        let long = random_base62(20_000);
        assert!(ALPHABET.iter().all(|c| long.as_bytes().contains(c)));
    }
}
