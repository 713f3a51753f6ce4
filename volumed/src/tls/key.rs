//! The server key: classified from its DER (algorithm, size, curve) so a
//! key nothing here can sign with is refused with one line that names it.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;

use rsa::pkcs1::RsaPrivateKeyRef;
use rsa::pkcs8::der::asn1::OctetStringRef;
use rsa::pkcs8::der::{self, Decode, Reader, SliceReader, TagMode, TagNumber};
use rsa::pkcs8::{ObjectIdentifier, PrivateKeyInfoRef};
use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::sign::SigningKey;

use super::TlsError;
use super::rsa_key::RsaKey;

/// What the refusal line offers instead.
pub(super) const SUPPORTED: &str = "RSA 2048 to 8192 bits, ECDSA P-256/P-384, Ed25519";

/// RSA sizes we sign with: below 2048 is too weak for anything current;
/// the cost of a signature grows with the cube of the size (the `rsa` crate
/// on this project's machine, release build: 7 ms for 2432 bits, 230 ms
/// for 8192), so larger keys would make every handshake a CPU burst.
pub(super) const RSA_BITS: RangeInclusive<usize> = 2048..=8192;

/// Loads the server key from a PEM file (PKCS#8, PKCS#1 or SEC1), with ring
/// where ring can sign with it and the `rsa` crate for the other RSA sizes.
pub(super) fn server_key(path: &Path) -> Result<Arc<dyn SigningKey>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadKey {
        path: path.to_owned(),
        source,
    })?;
    let refused = |reason: String| TlsError::Key {
        path: path.to_owned(),
        reason,
    };
    // rustls-pki-types skips encrypted PEM sections, so say why it found
    // nothing: PKCS#8 `ENCRYPTED PRIVATE KEY` or an OpenSSL legacy header.
    let encrypted =
        contains(&pem, b"ENCRYPTED PRIVATE KEY") || contains(&pem, b"Proc-Type: 4,ENCRYPTED");
    let encrypted_refusal = || {
        refused(
            "the key is encrypted; the daemon needs it unencrypted \
             (openssl pkey -in KEY -out PLAIN)"
                .into(),
        )
    };
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        if encrypted {
            encrypted_refusal()
        } else {
            refused(format!(
                "no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) in it: {e}"
            ))
        }
    })?;
    let kind = KeyKind::of(&der);
    if encrypted && matches!(kind, KeyKind::Malformed(_)) {
        return Err(encrypted_refusal());
    }
    let refuse =
        |what: &dyn fmt::Display| refused(format!("{what} is not supported ({SUPPORTED})"));
    match kind {
        KeyKind::Rsa { bits, primes } if primes > 2 => Err(refuse(&format_args!(
            "RSA {bits} bits with {primes} primes"
        ))),
        KeyKind::Rsa { bits, .. } if !RSA_BITS.contains(&bits) => {
            Err(refuse(&format_args!("RSA {bits} bits")))
        }
        KeyKind::Rsa { bits, .. } => match any_supported_type(&der) {
            Ok(key) => Ok(key),
            // ring takes 2048, 3072 and 4096 bits with primes of exactly
            // half that and e >= 65537; everything else OpenSSL makes is
            // still a sound key.
            Err(_) => {
                let key =
                    RsaKey::new(&der).map_err(|e| refused(format!("RSA {bits} bits: {e}")))?;
                tracing::info!(
                    key = %path.display(),
                    bits,
                    "NBD TLS: RSA key signed by the rsa crate (ring takes 2048, 3072 or 4096 bits with e >= 65537)"
                );
                Ok(Arc::new(key))
            }
        },
        KeyKind::EcP256 | KeyKind::EcP384 | KeyKind::Ed25519 => {
            any_supported_type(&der).map_err(|e| refused(format!("{kind} key refused: {e}")))
        }
        KeyKind::Other(what) => Err(refuse(&what)),
        KeyKind::Malformed(why) => Err(refused(format!("not a well-formed private key: {why}"))),
    }
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A private key as far as choosing a signer goes: its algorithm and size,
/// read from the DER without trusting any crypto library to explain a
/// refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyKind {
    Rsa {
        bits: usize,
        primes: usize,
    },
    EcP256,
    EcP384,
    Ed25519,
    /// A key of a kind no signer here takes, described for the refusal.
    Other(String),
    Malformed(String),
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits, .. } => write!(f, "RSA {bits} bits"),
            KeyKind::EcP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcP384 => f.write_str("ECDSA P-384"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
            KeyKind::Other(what) => f.write_str(what),
            KeyKind::Malformed(why) => write!(f, "malformed key ({why})"),
        }
    }
}

pub(super) const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
pub(super) const OID_RSA_PSS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
pub(super) const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
pub(super) const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
pub(super) const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
pub(super) const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Names for the key algorithms and curves OpenSSL makes that we refuse,
/// so the refusal says "ECDSA P-521", not an OID.
pub(super) const NAMES: &[(&str, &str)] = &[
    ("1.3.101.113", "Ed448"),
    ("1.3.101.110", "X25519 (a key-agreement key)"),
    ("1.3.101.111", "X448 (a key-agreement key)"),
    ("1.2.840.10040.4.1", "DSA"),
    ("1.2.840.113549.1.3.1", "DH (a key-agreement key)"),
    ("1.2.840.10046.2.1", "DH (a key-agreement key)"),
    ("2.16.840.1.101.3.4.3.17", "ML-DSA-44"),
    ("2.16.840.1.101.3.4.3.18", "ML-DSA-65"),
    ("2.16.840.1.101.3.4.3.19", "ML-DSA-87"),
    ("1.3.132.0.35", "ECDSA P-521"),
    ("1.3.132.0.33", "ECDSA P-224"),
    ("1.2.840.10045.3.1.1", "ECDSA P-192"),
    ("1.3.132.0.10", "ECDSA secp256k1"),
    ("1.3.36.3.3.2.8.1.1.7", "ECDSA brainpoolP256r1"),
    ("1.3.36.3.3.2.8.1.1.11", "ECDSA brainpoolP384r1"),
    ("1.3.36.3.3.2.8.1.1.13", "ECDSA brainpoolP512r1"),
    ("1.2.156.10197.1.301", "SM2"),
];

pub(super) fn oid_name(oid: &ObjectIdentifier, fallback: &str) -> String {
    let dotted = oid.to_string();
    NAMES.iter().find(|(o, _)| *o == dotted).map_or_else(
        || format!("{fallback} {dotted}"),
        |(_, name)| name.to_string(),
    )
}

impl KeyKind {
    pub(super) fn of(der: &PrivateKeyDer<'_>) -> KeyKind {
        match der {
            PrivateKeyDer::Pkcs1(k) => Self::of_pkcs1(k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(k) => match sec1_curve(k.secret_sec1_der()) {
                Ok(Some(curve)) => Self::of_curve(&curve),
                Ok(None) => KeyKind::Other("ECDSA without a named curve".into()),
                Err(e) => KeyKind::Malformed(format!("SEC1: {e}")),
            },
            PrivateKeyDer::Pkcs8(k) => Self::of_pkcs8(k.secret_pkcs8_der()),
            _ => KeyKind::Malformed("an encoding that is none of PKCS#8, PKCS#1, SEC1".into()),
        }
    }

    pub(super) fn of_pkcs8(der: &[u8]) -> KeyKind {
        let info = match PrivateKeyInfoRef::try_from(der) {
            Ok(info) => info,
            Err(e) => return KeyKind::Malformed(format!("PKCS#8: {e}")),
        };
        let oid = info.algorithm.oid;
        if oid == OID_RSA {
            Self::of_pkcs1(info.private_key.as_bytes())
        } else if oid == OID_RSA_PSS {
            // A key OpenSSL restricts to PSS: its certificate says
            // id-RSASSA-PSS, which needs the rsa_pss_pss_* schemes that
            // rustls does not offer.
            match Self::of_pkcs1(info.private_key.as_bytes()) {
                KeyKind::Rsa { bits, .. } => KeyKind::Other(format!("RSA-PSS-only {bits} bits")),
                other => other,
            }
        } else if oid == OID_EC {
            match info.algorithm.parameters_oid() {
                Ok(curve) => Self::of_curve(&curve),
                Err(_) => KeyKind::Other("ECDSA with explicit curve parameters".into()),
            }
        } else if oid == OID_ED25519 {
            KeyKind::Ed25519
        } else {
            KeyKind::Other(oid_name(&oid, "key algorithm"))
        }
    }

    pub(super) fn of_pkcs1(der: &[u8]) -> KeyKind {
        match RsaPrivateKeyRef::try_from(der) {
            Ok(key) => KeyKind::Rsa {
                bits: bit_len(key.modulus.as_bytes()),
                primes: 2 + key.other_prime_infos.as_ref().map_or(0, Vec::len),
            },
            Err(e) => KeyKind::Malformed(format!("PKCS#1 RSA: {e}")),
        }
    }

    pub(super) fn of_curve(curve: &ObjectIdentifier) -> KeyKind {
        if *curve == OID_P256 {
            KeyKind::EcP256
        } else if *curve == OID_P384 {
            KeyKind::EcP384
        } else {
            KeyKind::Other(oid_name(curve, "ECDSA on curve"))
        }
    }
}

/// Bits in a big-endian unsigned integer.
pub(super) fn bit_len(be: &[u8]) -> usize {
    let Some(first) = be.iter().position(|&b| b != 0) else {
        return 0;
    };
    // At most the key file's length: no overflow.
    (be.len() - first) * 8 - be[first].leading_zeros() as usize
}

/// The named curve of a SEC1 `ECPrivateKey` (RFC 5915):
/// `SEQUENCE { version INTEGER, privateKey OCTET STRING,
/// parameters [0] EXPLICIT OID OPTIONAL, publicKey [1] ... OPTIONAL }`.
pub(super) fn sec1_curve(der: &[u8]) -> der::Result<Option<ObjectIdentifier>> {
    let mut reader = SliceReader::new(der)?;
    let curve = reader.sequence(|r| {
        let _version = u8::decode(r)?;
        let _secret = <&OctetStringRef>::decode(r)?;
        let curve = r.context_specific::<ObjectIdentifier>(TagNumber(0), TagMode::Explicit)?;
        let rest = r.remaining_len();
        r.read_slice(rest)?;
        Ok::<_, der::Error>(curve)
    })?;
    reader.finish()?;
    Ok(curve)
}
