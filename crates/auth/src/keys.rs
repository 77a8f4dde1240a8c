use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, ParsedPublicKey, VerificationAlgorithm};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::pem;

/// RS256 with the key sizes Mux issued (2048) up to what anyone sensible uses.
pub(crate) static RS256: &dyn VerificationAlgorithm = &signature::RSA_PKCS1_2048_8192_SHA256;

/// An RSA public key, parsed once. Parsing costs about a third of a verification, so callers
/// keep these in a cache keyed by `kid` rather than parsing stored DER per join.
#[derive(Clone)]
pub struct PublicKey {
    parsed: ParsedPublicKey,
    der: Vec<u8>,
}

impl PublicKey {
    /// Accepts PKCS#1 `RSAPublicKey` or X.509 `SubjectPublicKeyInfo` DER.
    pub fn from_der(der: &[u8]) -> Result<Self, KeyError> {
        let parsed = ParsedPublicKey::new(RS256, der).map_err(|_| KeyError::NotAnRsaKey)?;
        Ok(Self {
            parsed,
            der: der.to_vec(),
        })
    }

    /// Accepts a `PUBLIC KEY` or `RSA PUBLIC KEY` PEM block.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let (_, der) = pem::decode(text).ok_or(KeyError::NotPem)?;
        Self::from_der(&der)
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.parsed.verify_sig(message, signature).is_ok()
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("der_len", &self.der.len())
            .finish()
    }
}

/// An RSA private key for signing join tokens (the `sign` CLI, tests, the load generator).
/// spacegate itself never stores one: the server generates a pair, keeps the public half and
/// hands this out once.
pub struct PrivateKey {
    pair: KeyPair,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not PEM, nor base64 of PEM")]
    NotPem,
    #[error("key is not an RSA key of 2048 to 8192 bits")]
    NotAnRsaKey,
    #[error("key generation failed")]
    Generation,
}

impl PrivateKey {
    /// A fresh RSA-2048 pair. Uses AWS-LC's own CSPRNG: key generation is the one place in
    /// this crate that needs randomness, and it is not on the join path.
    pub fn generate_rsa2048() -> Result<Self, KeyError> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generation)?;
        Ok(Self { pair })
    }

    /// Parses what users paste: a PEM (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`), or
    /// base64 of such a PEM, which is the form Mux's API returned.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let pem_text = if text.contains("-----BEGIN") {
            text.to_string()
        } else {
            let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let bytes = STANDARD.decode(compact).map_err(|_| KeyError::NotPem)?;
            String::from_utf8(bytes).map_err(|_| KeyError::NotPem)?
        };
        let (label, der) = pem::decode(&pem_text).ok_or(KeyError::NotPem)?;
        let pair = match label.as_str() {
            "RSA PRIVATE KEY" => KeyPair::from_der(&der),
            "PRIVATE KEY" => KeyPair::from_pkcs8(&der),
            _ => return Err(KeyError::NotAnRsaKey),
        }
        .map_err(|_| KeyError::NotAnRsaKey)?;
        Ok(Self { pair })
    }

    /// PKCS#1 PEM of the private key.
    pub fn to_pkcs1_pem(&self) -> Result<String, KeyError> {
        let pkcs8 = self.pair.as_der().map_err(|_| KeyError::Generation)?;
        let pkcs1 = pem::pkcs8_to_pkcs1(pkcs8.as_ref()).ok_or(KeyError::Generation)?;
        Ok(pem::encode("RSA PRIVATE KEY", &pkcs1))
    }

    /// Base64 of the PKCS#1 PEM: the `private_key` field of Mux's signing-key object.
    pub fn to_mux_private_key(&self) -> Result<String, KeyError> {
        Ok(STANDARD.encode(self.to_pkcs1_pem()?))
    }

    /// PKCS#1 `RSAPublicKey` DER of the public half.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    pub fn public_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_der(&self.public_key_der())
    }

    pub(crate) fn sign_rs256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
            .map_err(|_| KeyError::Generation)?;
        Ok(sig)
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}
