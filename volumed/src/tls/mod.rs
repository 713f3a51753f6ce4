//! TLS with rustls on the ring provider, which the S3 client already
//! links, so TLS adds no second crypto library: NBD's STARTTLS and the AWS
//! endpoint's HTTPS, configured from the same files, so it is shared by
//! both front-ends and imports neither.
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio_rustls::rustls::{self, InconsistentKeys, RootCertStore, ServerConfig, crypto};

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

/// A TLS configuration refused at start: each names the file and the
/// reason, in one line.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "NBD TLS certificate {} and key {} do not make a usable pair",
        .cert.display(),
        .key.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS protocol versions")]
    Versions(#[source] rustls::Error),
    #[error("add a CA certificate from {}", .path.display())]
    AddCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client verifier from {}", .path.display())]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("read certificates from {}", .path.display())]
    ReadCerts {
        path: PathBuf,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("parse certificates in {}", .path.display())]
    ParseCerts {
        path: PathBuf,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCerts(PathBuf),
    #[error("read the NBD TLS key {}", .path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key is unusable; `reason` says why and what would do.
    #[error("NBD TLS key {}: {reason}", .path.display())]
    Key { path: PathBuf, reason: String },
}

/// Builds the acceptor, failing at start-up on anything wrong with the
/// files rather than at the first client.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = server_key(&files.key)?;
    let certified = CertifiedKey::new(certs, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(source) => {
            return Err(TlsError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            });
        }
    }
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|source| TlsError::AddCa {
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::ReadCerts {
            path: path.to_owned(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ParseCerts {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts(path.to_owned()));
    }
    Ok(certs)
}

mod key;
mod rsa_key;
#[cfg(test)]
mod tests;

use key::server_key;
