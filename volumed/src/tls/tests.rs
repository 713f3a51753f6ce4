//! Key loading and signing, with keys openssl makes.

use std::process::Command;

use rsa::{Pkcs1v15Sign, Pss};

use rsa::sha2::{Digest, Sha256, Sha384, Sha512};
use rsa::traits::PublicKeyParts;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::sign::SigningKey;
use tokio_rustls::rustls::{SignatureAlgorithm, SignatureScheme};

use super::key::*;
use super::rsa_key::*;
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
