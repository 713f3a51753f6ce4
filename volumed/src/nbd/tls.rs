//! TLS for NBD (NBD_OPT_STARTTLS) with rustls on the ring provider, which the
//! S3 client already links, so TLS adds no second crypto library.
//!
//! The server key. ring 0.17 signs with RSA keys whose modulus is 2048 to
//! 4096 bits and whose primes are each exactly half of it and a multiple of
//! 512 bits (`PrivateModulusLenNotMultipleOf512Bits`), with e >= 65537: so
//! 2048, 3072 and 4096 bits only. OpenSSL makes RSA keys of any size (the
//! upstream NBD test suite ships a 2432-bit one), and rustls's
//! `any_supported_type` folds ring's reason into "failed to parse private
//! key as RSA, ECDSA, or EdDSA". So the key is first classified here from
//! its DER (algorithm, size, curve); RSA keys ring refuses are signed with
//! the pure-Rust `rsa` crate (constant-time big integers, blinded), and
//! every key nothing here can sign with is refused at start with one line
//! that names it and what would work.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPublicKey, RsaPrivateKeyRef};
use rsa::pkcs8::der::asn1::OctetStringRef;
use rsa::pkcs8::der::{self, Decode, Reader, SliceReader, TagMode, TagNumber};
use rsa::pkcs8::{DecodePrivateKey, ObjectIdentifier, PrivateKeyInfoRef};
use rsa::sha2::{Digest, Sha256, Sha384, Sha512};
use rsa::traits::PublicKeyParts;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer, alg_id,
};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::{
    CertifiedKey, Signer, SigningKey, SingleCertAndKey, public_key_to_spki,
};
use tokio_rustls::rustls::{
    self, InconsistentKeys, RootCertStore, ServerConfig, SignatureAlgorithm, SignatureScheme,
    crypto,
};

/// The PEM files TLS is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// Where one connection stands with TLS; the mode never changes for the
/// life of a connection, as the spec requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Not configured: STARTTLS is refused by policy (NOTLS).
    Off,
    /// Configured, the client may upgrade (the Unix socket, which file
    /// permissions already guard).
    Offered,
    /// Configured and required before any other option (FORCEDTLS, TCP).
    Required,
    /// This connection is encrypted.
    Active,
}

/// Builds the acceptor, failing at start-up on anything wrong with the
/// files rather than at the first client.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = server_key(&files.key)?;
    let certified = CertifiedKey::new(certs, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "NBD TLS certificate {} and key {} do not make a usable pair",
                    files.cert.display(),
                    files.key.display()
                )
            });
        }
    }
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("add a CA certificate from {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("client verifier from {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// What the refusal line offers instead.
const SUPPORTED: &str = "RSA 2048 to 8192 bits, ECDSA P-256/P-384, Ed25519";

/// RSA sizes we sign with: below 2048 is too weak for anything current;
/// the cost of a signature grows with the cube of the size (the `rsa` crate
/// on this project's machine, release build: 7 ms for 2432 bits, 230 ms
/// for 8192), so larger keys would make every handshake a CPU burst.
const RSA_BITS: RangeInclusive<usize> = 2048..=8192;

/// Loads the server key from a PEM file (PKCS#8, PKCS#1 or SEC1), with ring
/// where ring can sign with it and the `rsa` crate for the other RSA sizes.
fn server_key(path: &Path) -> anyhow::Result<Arc<dyn SigningKey>> {
    let pem =
        std::fs::read(path).with_context(|| format!("read the NBD TLS key {}", path.display()))?;
    // rustls-pki-types skips encrypted PEM sections, so say why it found
    // nothing: PKCS#8 `ENCRYPTED PRIVATE KEY` or an OpenSSL legacy header.
    let encrypted =
        contains(&pem, b"ENCRYPTED PRIVATE KEY") || contains(&pem, b"Proc-Type: 4,ENCRYPTED");
    let encrypted_refusal = || {
        anyhow!(
            "NBD TLS key {}: the key is encrypted; the daemon needs it unencrypted \
             (openssl pkey -in KEY -out PLAIN)",
            path.display()
        )
    };
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        if encrypted {
            encrypted_refusal()
        } else {
            anyhow!(
                "NBD TLS key {}: no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) in it: {e}",
                path.display()
            )
        }
    })?;
    let kind = KeyKind::of(&der);
    if encrypted && matches!(kind, KeyKind::Malformed(_)) {
        return Err(encrypted_refusal());
    }
    let refuse = |what: &dyn fmt::Display| {
        anyhow!(
            "NBD TLS key {}: {what} is not supported ({SUPPORTED})",
            path.display()
        )
    };
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
                let key = RsaKey::new(&der)
                    .map_err(|e| anyhow!("NBD TLS key {}: RSA {bits} bits: {e}", path.display()))?;
                tracing::info!(
                    key = %path.display(),
                    bits,
                    "NBD TLS: RSA key signed by the rsa crate (ring takes 2048, 3072 or 4096 bits with e >= 65537)"
                );
                Ok(Arc::new(key))
            }
        },
        KeyKind::EcP256 | KeyKind::EcP384 | KeyKind::Ed25519 => any_supported_type(&der)
            .map_err(|e| anyhow!("NBD TLS key {}: {kind} key refused: {e}", path.display())),
        KeyKind::Other(what) => Err(refuse(&what)),
        KeyKind::Malformed(why) => Err(anyhow!(
            "NBD TLS key {}: not a well-formed private key: {why}",
            path.display()
        )),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A private key as far as choosing a signer goes: its algorithm and size,
/// read from the DER without trusting any crypto library to explain a
/// refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyKind {
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

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Names for the key algorithms and curves OpenSSL makes that we refuse,
/// so the refusal says "ECDSA P-521", not an OID.
const NAMES: &[(&str, &str)] = &[
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

fn oid_name(oid: &ObjectIdentifier, fallback: &str) -> String {
    let dotted = oid.to_string();
    NAMES.iter().find(|(o, _)| *o == dotted).map_or_else(
        || format!("{fallback} {dotted}"),
        |(_, name)| name.to_string(),
    )
}

impl KeyKind {
    fn of(der: &PrivateKeyDer<'_>) -> KeyKind {
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

    fn of_pkcs8(der: &[u8]) -> KeyKind {
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

    fn of_pkcs1(der: &[u8]) -> KeyKind {
        match RsaPrivateKeyRef::try_from(der) {
            Ok(key) => KeyKind::Rsa {
                bits: bit_len(key.modulus.as_bytes()),
                primes: 2 + key.other_prime_infos.as_ref().map_or(0, Vec::len),
            },
            Err(e) => KeyKind::Malformed(format!("PKCS#1 RSA: {e}")),
        }
    }

    fn of_curve(curve: &ObjectIdentifier) -> KeyKind {
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
fn bit_len(be: &[u8]) -> usize {
    let Some(first) = be.iter().position(|&b| b != 0) else {
        return 0;
    };
    // At most the key file's length: no overflow.
    (be.len() - first) * 8 - be[first].leading_zeros() as usize
}

/// The named curve of a SEC1 `ECPrivateKey` (RFC 5915):
/// `SEQUENCE { version INTEGER, privateKey OCTET STRING,
/// parameters [0] EXPLICIT OID OPTIONAL, publicKey [1] ... OPTIONAL }`.
fn sec1_curve(der: &[u8]) -> der::Result<Option<ObjectIdentifier>> {
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

/// The TLS schemes an RSA key signs with, best first (as rustls orders them
/// for ring's keys); the client's offer decides.
const RSA_SCHEMES: [SignatureScheme; 6] = [
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// An RSA key ring will not sign with, signed with the `rsa` crate.
struct RsaKey {
    key: Arc<rsa::PrivateKey>,
    spki: SubjectPublicKeyInfoDer<'static>,
    bits: usize,
}

impl RsaKey {
    fn new(der: &PrivateKeyDer<'_>) -> Result<RsaKey, String> {
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

struct RsaSigner {
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use rsa::{Pkcs1v15Sign, Pss};

    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", acceptor(&files(dir.path())).err().unwrap());
        assert!(err.contains("cert.pem"), "{err}");
    }

    #[test]
    fn garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), b"not a certificate").unwrap();
        std::fs::write(dir.path().join("key.pem"), b"not a key").unwrap();
        let err = format!("{:#}", acceptor(&files(dir.path())).err().unwrap());
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    /// Runs `openssl` in `dir` (the tool every deployment makes keys with).
    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `openssl genpkey` with `opts`, into `name`; `traditional` rewrites it
    /// as PKCS#1 (RSA) or SEC1 (EC).
    fn genpkey(dir: &Path, name: &str, alg: &str, opts: &[&str], traditional: bool) -> PathBuf {
        let mut args = vec!["genpkey", "-algorithm", alg];
        for o in opts {
            args.extend(["-pkeyopt", o]);
        }
        let pkcs8 = format!("{name}.p8");
        args.extend(["-out", &pkcs8]);
        openssl(dir, &args);
        if traditional {
            openssl(dir, &["pkey", "-in", &pkcs8, "-traditional", "-out", name]);
        } else {
            std::fs::rename(dir.join(&pkcs8), dir.join(name)).unwrap();
        }
        dir.join(name)
    }

    fn refusal(path: &Path) -> String {
        let err = format!("{:#}", server_key(path).expect_err("key must be refused"));
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        err
    }

    #[test]
    fn unusable_keys_are_refused_with_type_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, alg, opts, traditional, what) in [
            (
                "rsa1024.pem",
                "RSA",
                &["rsa_keygen_bits:1024"][..],
                false,
                "RSA 1024 bits",
            ),
            (
                "rsa1024-pkcs1.pem",
                "RSA",
                &["rsa_keygen_bits:1024"][..],
                true,
                "RSA 1024 bits",
            ),
            (
                "rsa3p.pem",
                "RSA",
                &["rsa_keygen_bits:2048", "rsa_keygen_primes:3"][..],
                false,
                "RSA 2048 bits with 3 primes",
            ),
            (
                "pss.pem",
                "RSA-PSS",
                &["rsa_keygen_bits:2048"][..],
                false,
                "RSA-PSS-only 2048 bits",
            ),
            (
                "p521.pem",
                "EC",
                &["ec_paramgen_curve:P-521"][..],
                false,
                "ECDSA P-521",
            ),
            (
                "p521-sec1.pem",
                "EC",
                &["ec_paramgen_curve:P-521"][..],
                true,
                "ECDSA P-521",
            ),
            (
                "k1.pem",
                "EC",
                &["ec_paramgen_curve:secp256k1"][..],
                true,
                "ECDSA secp256k1",
            ),
            ("ed448.pem", "ED448", &[][..], false, "Ed448"),
        ] {
            let path = genpkey(d, name, alg, opts, traditional);
            let err = refusal(&path);
            assert!(
                err.ends_with(&format!("{what} is not supported ({SUPPORTED})")),
                "{name}: {err}"
            );
        }

        let path = d.join("enc.pem");
        openssl(
            d,
            &[
                "pkcs8", "-topk8", "-in", "p521.pem", "-passout", "pass:x", "-out", "enc.pem",
            ],
        );
        assert!(refusal(&path).contains("encrypted"));
        let path = d.join("enc-legacy.pem");
        openssl(
            d,
            &[
                "rsa",
                "-in",
                "rsa1024.pem",
                "-traditional",
                "-aes128",
                "-passout",
                "pass:x",
                "-out",
                "enc-legacy.pem",
            ],
        );
        assert!(refusal(&path).contains("encrypted"));
        std::fs::write(
            &path,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(refusal(&path).contains("not a well-formed private key"));
    }

    #[test]
    fn keys_ring_takes_stay_with_ring() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, alg, opts, traditional, algorithm) in [
            (
                "rsa2048.pem",
                "RSA",
                &["rsa_keygen_bits:2048"][..],
                true,
                SignatureAlgorithm::RSA,
            ),
            (
                "p256.pem",
                "EC",
                &["ec_paramgen_curve:P-256"][..],
                true,
                SignatureAlgorithm::ECDSA,
            ),
            (
                "p384.pem",
                "EC",
                &["ec_paramgen_curve:P-384"][..],
                false,
                SignatureAlgorithm::ECDSA,
            ),
            (
                "ed25519.pem",
                "ED25519",
                &[][..],
                false,
                SignatureAlgorithm::ED25519,
            ),
        ] {
            let path = genpkey(d, name, alg, opts, traditional);
            let key = server_key(&path).unwrap();
            assert_eq!(key.algorithm(), algorithm, "{name}");
            assert!(!format!("{key:?}").starts_with("RsaKey"), "{name}: {key:?}");
        }
    }

    /// Signs with every scheme and checks each signature with the public
    /// key alone, so a wrong padding, hash or salt length shows here
    /// rather than as a client's handshake failure.
    fn check_rsa_signatures(key: &dyn SigningKey, public: &rsa::PublicKey) {
        let message = b"TLS 1.3, server CertificateVerify";
        for scheme in RSA_SCHEMES {
            let signer = key.choose_scheme(&[scheme]).expect("scheme offered");
            assert_eq!(signer.scheme(), scheme);
            let sig = signer.sign(message).unwrap();
            assert_eq!(sig.len(), public.size(), "{scheme:?}");
            let ok = match scheme {
                SignatureScheme::RSA_PSS_SHA512 => {
                    public.verify(Pss::<Sha512>::new(), &Sha512::digest(message), &sig)
                }
                SignatureScheme::RSA_PSS_SHA384 => {
                    public.verify(Pss::<Sha384>::new(), &Sha384::digest(message), &sig)
                }
                SignatureScheme::RSA_PSS_SHA256 => {
                    public.verify(Pss::<Sha256>::new(), &Sha256::digest(message), &sig)
                }
                SignatureScheme::RSA_PKCS1_SHA512 => public.verify(
                    Pkcs1v15Sign::new::<Sha512>(),
                    &Sha512::digest(message),
                    &sig,
                ),
                SignatureScheme::RSA_PKCS1_SHA384 => public.verify(
                    Pkcs1v15Sign::new::<Sha384>(),
                    &Sha384::digest(message),
                    &sig,
                ),
                _ => public.verify(
                    Pkcs1v15Sign::new::<Sha256>(),
                    &Sha256::digest(message),
                    &sig,
                ),
            };
            ok.unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
        }
        // The client's offer decides; an offer with no RSA scheme gets none.
        let best = key
            .choose_scheme(&[
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignatureScheme::RSA_PKCS1_SHA256,
                SignatureScheme::RSA_PSS_SHA384,
            ])
            .unwrap();
        assert_eq!(best.scheme(), SignatureScheme::RSA_PSS_SHA384);
        assert!(key.choose_scheme(&[SignatureScheme::ED25519]).is_none());
    }

    #[test]
    fn rsa_keys_ring_refuses_sign_every_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, opts, traditional, bits) in [
            // The upstream NBD test suite's size: primes of 1216 bits.
            ("rsa2432.pem", &["rsa_keygen_bits:2432"][..], false, 2432),
            (
                "rsa2432-pkcs1.pem",
                &["rsa_keygen_bits:2432"][..],
                true,
                2432,
            ),
            // ring wants e >= 65537.
            (
                "rsa2048-e3.pem",
                &["rsa_keygen_bits:2048", "rsa_keygen_pubexp:3"][..],
                false,
                2048,
            ),
        ] {
            let path = genpkey(d, name, "RSA", opts, traditional);
            let key = server_key(&path).unwrap();
            assert_eq!(key.algorithm(), SignatureAlgorithm::RSA);
            assert_eq!(format!("{key:?}"), format!("RsaKey {{ bits: {bits} }}"));
            let pem = std::fs::read(&path).unwrap();
            let der = PrivateKeyDer::from_pem_slice(&pem).unwrap();
            let public = RsaKey::new(&der).unwrap().key.to_public_key();
            assert_eq!(public.n().bit_width_vartime() as usize, bits);
            check_rsa_signatures(key.as_ref(), &public);
        }
    }

    #[test]
    fn sec1_curve_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = genpkey(
            dir.path(),
            "p384.pem",
            "EC",
            &["ec_paramgen_curve:P-384"],
            true,
        );
        let pem = std::fs::read(&path).unwrap();
        let der = PrivateKeyDer::from_pem_slice(&pem).unwrap();
        assert!(matches!(der, PrivateKeyDer::Sec1(_)));
        assert_eq!(KeyKind::of(&der), KeyKind::EcP384);
        assert!(sec1_curve(b"\x30\x00").is_err());
    }

    #[test]
    fn bit_len_counts_from_the_top_bit() {
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(bit_len(&[0, 0]), 0);
        assert_eq!(bit_len(&[1]), 1);
        assert_eq!(bit_len(&[0, 0x80, 0]), 16);
        assert_eq!(bit_len(&[0x7f, 0xff]), 15);
    }
}
