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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
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

mod key;
mod rsa_key;
#[cfg(test)]
mod tests;

use key::server_key;
