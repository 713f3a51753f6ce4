//! RSA keys ring will not sign with (sizes other than 2048, 3072 and 4096
//! bits, or e < 65537), signed with the pure-Rust `rsa` crate.

use std::fmt;
use std::sync::Arc;

use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::DecodePrivateKey;
use rsa::sha2::{Digest, Sha256, Sha384, Sha512};
use rsa::traits::PublicKeyParts;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer, alg_id};
use tokio_rustls::rustls::sign::{Signer, SigningKey, public_key_to_spki};
use tokio_rustls::rustls::{self, SignatureAlgorithm, SignatureScheme};

/// The TLS schemes an RSA key signs with, best first (as rustls orders them
/// for ring's keys); the client's offer decides.
pub(super) const RSA_SCHEMES: [SignatureScheme; 6] = [
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// An RSA key ring will not sign with, signed with the `rsa` crate.
pub(super) struct RsaKey {
    pub(super) key: Arc<rsa::PrivateKey>,
    spki: SubjectPublicKeyInfoDer<'static>,
    bits: usize,
}

impl RsaKey {
    pub(super) fn new(der: &PrivateKeyDer<'_>) -> Result<RsaKey, String> {
        let key =
            match der {
                PrivateKeyDer::Pkcs1(k) => rsa::PrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
                    .map_err(|e| e.to_string())?,
                PrivateKeyDer::Pkcs8(k) => rsa::PrivateKey::from_pkcs8_der(k.secret_pkcs8_der())
                    .map_err(|e| e.to_string())?,
                _ => return Err("not a PKCS#1 or PKCS#8 RSA key".into()),
            };
        let public = key
            .to_public_key()
            .to_pkcs1_der()
            .map_err(|e| format!("encode the public key: {e}"))?;
        // The same bytes ring's keys give, so rustls can check the key
        // against the certificate.
        let spki = public_key_to_spki(&alg_id::RSA_ENCRYPTION, public.as_bytes());
        let bits = key.n().bit_width_vartime() as usize;
        Ok(RsaKey {
            key: Arc::new(key),
            spki,
            bits,
        })
    }
}

impl fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaKey").field("bits", &self.bits).finish()
    }
}

impl SigningKey for RsaKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = RSA_SCHEMES.into_iter().find(|s| offered.contains(s))?;
        Some(Box::new(RsaSigner {
            key: Arc::clone(&self.key),
            scheme,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(self.spki.clone())
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::RSA
    }
}

pub(super) struct RsaSigner {
    key: Arc<rsa::PrivateKey>,
    scheme: SignatureScheme,
}

impl fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaSigner")
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl Signer for RsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use rsa::{Pkcs1v15Sign, Pss};
        // PSS salts are as long as the hash, as TLS 1.3 requires (RFC 8446
        // 4.2.3); both paddings blind the private operation.
        let key = &self.key;
        let signed = match self.scheme {
            SignatureScheme::RSA_PSS_SHA512 => {
                key.sign(Pss::<Sha512>::new(), &Sha512::digest(message))
            }
            SignatureScheme::RSA_PSS_SHA384 => {
                key.sign(Pss::<Sha384>::new(), &Sha384::digest(message))
            }
            SignatureScheme::RSA_PSS_SHA256 => {
                key.sign(Pss::<Sha256>::new(), &Sha256::digest(message))
            }
            SignatureScheme::RSA_PKCS1_SHA512 => {
                key.sign(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(message))
            }
            SignatureScheme::RSA_PKCS1_SHA384 => {
                key.sign(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(message))
            }
            SignatureScheme::RSA_PKCS1_SHA256 => {
                key.sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))
            }
            other => {
                return Err(rustls::Error::General(format!(
                    "rsa signer asked for scheme={other:?}"
                )));
            }
        };
        signed.map_err(|e| rustls::Error::General(format!("rsa signature failed: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}
