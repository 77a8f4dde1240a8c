//! Just enough PEM and DER for RSA keys: Mux hands out private keys as base64 of a PEM, and
//! users paste either PKCS#1 or PKCS#8, raw or base64-wrapped.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Wraps DER bytes in a PEM block with the given label (`RSA PRIVATE KEY`, `PUBLIC KEY`, ...).
pub fn encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so any 64-byte chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Returns the label and DER bytes of the first PEM block in `text`.
pub fn decode(text: &str) -> Option<(String, Vec<u8>)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let label_end = rest.find("-----")?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end_marker = format!("-----END {label}-----");
    let body_end = rest.find(&end_marker)?;
    if body_end < body_start {
        return None;
    }
    let body: String = rest[body_start..body_end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = STANDARD.decode(body).ok()?;
    Some((label, der))
}

/// Extracts the PKCS#1 `RSAPrivateKey` from a PKCS#8 `PrivateKeyInfo`:
/// `SEQUENCE { INTEGER version, SEQUENCE algorithm, OCTET STRING privateKey, ... }`.
/// PKCS#1 is what the oldest Mux clients accept in every form, so it is what we hand out.
pub fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Option<Vec<u8>> {
    let (tag, outer, _) = der_element(pkcs8)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _, rest) = der_element(outer)?;
    if tag != 0x02 {
        return None;
    }
    let (tag, _, rest) = der_element(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, key, _) = der_element(rest)?;
    if tag != 0x04 {
        return None;
    }
    Some(key.to_vec())
}

/// Splits one DER element off `input`: (tag, contents, remainder).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = encode("RSA PRIVATE KEY", &der);
        assert!(text.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert!(text.lines().all(|l| l.len() <= 64));
        assert_eq!(decode(&text), Some(("RSA PRIVATE KEY".to_string(), der)));
    }

    #[test]
    fn pem_rejects_garbage() {
        assert_eq!(decode("no pem here"), None);
        assert_eq!(decode("-----BEGIN X-----\n!!!\n-----END X-----\n"), None);
        assert_eq!(decode("-----BEGIN X-----\nAAAA\n-----END Y-----\n"), None);
    }

    #[test]
    fn der_walker_refuses_truncation() {
        assert_eq!(pkcs8_to_pkcs1(&[0x30, 0x05, 0x02]), None);
        assert_eq!(pkcs8_to_pkcs1(&[]), None);
        assert_eq!(pkcs8_to_pkcs1(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
