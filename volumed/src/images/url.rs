//! `https://` sources of import tasks (EC2's `Url`): one GET over rustls
//! (the ring provider the rest of the daemon uses; the host's trusted
//! roots, `SSL_CERT_FILE` honoured), its body streamed into a file, with a
//! cap on its size and on the whole transfer's time.
//!
//! Caps, from the environment as the S3 store's timeouts are:
//! `VOLUMED_IMPORT_URL_MAX_SIZE` (bytes or `10G`; default 1 TiB) and
//! `VOLUMED_IMPORT_URL_TIMEOUT` (a duration, `90s`, `2h`; default 6 h).
//! No redirects are followed: a presigned URL names the object itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
use tokio_util::sync::CancellationToken;

/// The default size cap of an `https://` source.
const MAX_SIZE: u64 = 1 << 40;
/// The default time cap of one `https://` transfer.
const TIMEOUT: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("invalid URL {0:?}: expected https://HOST[:PORT]/PATH")]
    Invalid(String),
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url} did not arrive within {secs} s")]
    TimedOut { url: String, secs: u64 },
    #[error("{url} ended after {got} of {want} bytes")]
    Short { url: String, got: u64, want: u64 },
    #[error("write the downloaded image to {path}")]
    Local {
        path: String,
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

/// The caps of `https://` transfers.
#[derive(Debug, Clone, Copy)]
pub struct UrlLimits {
    pub max_size: u64,
    pub timeout: Duration,
}

impl UrlLimits {
    /// From `VOLUMED_IMPORT_URL_MAX_SIZE` and `VOLUMED_IMPORT_URL_TIMEOUT`,
    /// else the defaults; a value that does not parse is the default too.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        UrlLimits {
            max_size: var("VOLUMED_IMPORT_URL_MAX_SIZE")
                .and_then(|v| volumed_api::parse_size(&v).ok())
                .unwrap_or(MAX_SIZE),
            timeout: var("VOLUMED_IMPORT_URL_TIMEOUT")
                .and_then(|v| humantime::parse_duration(&v).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(TIMEOUT),
        }
    }
}

/// Whether `url` is one this module fetches.
pub fn is_https(url: &str) -> bool {
    url.parse::<hyper::Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some())
}

/// GETs `url` into a new file `dest`; `progress` is told each piece's
/// length and `total` the length announced. Returns the bytes written.
pub async fn download(
    url: &str,
    dest: &Path,
    limits: UrlLimits,
    cancel: &CancellationToken,
    total: impl Fn(u64),
    progress: impl Fn(u64),
) -> Result<u64, UrlError> {
    let secs = limits.timeout.as_secs();
    tokio::select! {
        r = tokio::time::timeout(limits.timeout, fetch(url, dest, limits.max_size, total, progress)) => {
            r.unwrap_or_else(|_| Err(UrlError::TimedOut { url: url.to_owned(), secs }))
        }
        () = cancel.cancelled() => Err(UrlError::Cancelled),
    }
}

async fn fetch(
    url: &str,
    dest: &Path,
    limit: u64,
    total: impl Fn(u64),
    progress: impl Fn(u64),
) -> Result<u64, UrlError> {
    let invalid = || UrlError::Invalid(url.to_owned());
    let uri: hyper::Uri = url.parse().map_err(|_| invalid())?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid());
    }
    let host = uri.host().ok_or_else(invalid)?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let connect = |message: String| UrlError::Connect {
        url: url.to_owned(),
        message,
    };
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| connect(e.to_string()))?;
    let name =
        ServerName::try_from(host.trim_matches(['[', ']']).to_owned()).map_err(|_| invalid())?;
    let tls = tls_connector()
        .map_err(connect)?
        .connect(name, tcp)
        .await
        .map_err(|e| connect(e.to_string()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| connect(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "volumed-import")
        .body(Empty::<Bytes>::new())
        .map_err(|_| invalid())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| connect(e.to_string()))?;
    if resp.status() != hyper::StatusCode::OK {
        driver.abort();
        return Err(UrlError::Status {
            url: url.to_owned(),
            status: resp.status().as_u16(),
        });
    }
    let want = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || UrlError::TooLarge {
        url: url.to_owned(),
        limit,
    };
    if want.is_some_and(|w| w > limit) {
        driver.abort();
        return Err(too_large());
    }
    if let Some(w) = want {
        total(w);
    }
    let local = |source| UrlError::Local {
        path: dest.display().to_string(),
        source,
    };
    let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| connect(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        got = got.saturating_add(data.len() as u64);
        if got > limit {
            driver.abort();
            return Err(too_large());
        }
        file.write_all(&data).await.map_err(local)?;
        progress(data.len() as u64);
    }
    driver.abort();
    if let Some(w) = want
        && got != w
    {
        return Err(UrlError::Short {
            url: url.to_owned(),
            got,
            want: w,
        });
    }
    file.sync_all().await.map_err(local)?;
    Ok(got)
}

/// A TLS client trusting the host's roots (`SSL_CERT_FILE`, `SSL_CERT_DIR`
/// or the system's store).
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // A certificate rustls cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("no trusted root certificates on this host".into());
    }
    let config = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls() {
        assert!(is_https("https://example.com/disk.vmdk?X-Amz-Signature=1"));
        assert!(is_https("https://127.0.0.1:8443/a"));
        for bad in [
            "http://example.com/a",
            "s3://b/k",
            "https:///a",
            "file:///x",
            "",
        ] {
            assert!(!is_https(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_named() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("https://127.0.0.1:{port}/x.raw");
        let limits = UrlLimits {
            max_size: 10,
            timeout: Duration::from_secs(5),
        };
        let e = download(
            &url,
            &dir.path().join("x"),
            limits,
            &CancellationToken::new(),
            |_| {},
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("cannot reach {url}")),
            "{e}"
        );
    }
}
