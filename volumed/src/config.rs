//! Command-line flags and environment, resolved into concrete paths.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use snapshot::StoreUrl;

use crate::disk::EngineChoice;
use crate::nbd::tls::TlsFiles;

#[derive(Debug, Parser)]
#[command(
    name = "volumed",
    version,
    about = "Block-storage daemon: copy-on-write volumes over NBD"
)]
pub struct Args {
    /// Catalog, volume data files and chunk cache [default: ~/.local/share/volumed]
    #[arg(long, env = "VOLUMED_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Control API socket, mode 0600 [default: DATA_DIR/volumed.sock]
    #[arg(long, env = "VOLUMED_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// NBD over TCP (10809 is NBD's IANA port)
    #[arg(
        long,
        env = "VOLUMED_NBD_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:10809"
    )]
    pub nbd_listen: SocketAddr,

    /// TLS certificate chain (PEM) for NBD: TLS becomes required on TCP
    /// and offered on the Unix socket
    #[arg(
        long,
        env = "VOLUMED_NBD_TLS_CERT",
        value_name = "FILE",
        requires = "nbd_tls_key"
    )]
    pub nbd_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --nbd-tls-cert
    #[arg(
        long,
        env = "VOLUMED_NBD_TLS_KEY",
        value_name = "FILE",
        requires = "nbd_tls_cert"
    )]
    pub nbd_tls_key: Option<PathBuf>,

    /// CA certificates (PEM): NBD clients must present a certificate one
    /// of them signed
    #[arg(
        long,
        env = "VOLUMED_NBD_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "nbd_tls_cert"
    )]
    pub nbd_tls_client_ca: Option<PathBuf>,

    /// Most NBD connections open at once, TCP and Unix socket together,
    /// negotiating or serving; more are closed as soon as they are accepted
    #[arg(long, env = "VOLUMED_NBD_MAX_CONNECTIONS", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_connections: u32,

    /// An NBD client must finish negotiation, TLS handshake included,
    /// within this, or it is disconnected
    #[arg(long, env = "VOLUMED_NBD_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = parse_timeout)]
    pub nbd_handshake_timeout: std::time::Duration,

    /// NBD over a Unix socket [default: DATA_DIR/nbd.sock]
    #[arg(long, env = "VOLUMED_NBD_SOCKET", value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,

    /// Snapshot store: file:///DIR or s3://BUCKET[/PREFIX] [default: file://DATA_DIR/store]
    #[arg(long, env = "VOLUMED_STORE", value_name = "URL")]
    pub store: Option<String>,

    /// zstd level for chunk objects (1 fastest .. 19 smallest)
    #[arg(long, env = "VOLUMED_ZSTD_LEVEL", default_value_t = snapshot::codec::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,

    /// Bound on the host's chunk cache (DATA_DIR/cache), shared by every
    /// restored volume; 0 disables it
    #[arg(long, env = "VOLUMED_CACHE_SIZE", value_name = "SIZE", default_value = "4GiB",
          value_parser = parse_size_arg)]
    pub cache_size: u64,

    /// gc keeps unreferenced objects younger than this, and a snapshot must
    /// finish within it; use the same value on every host sharing a store
    #[arg(long, env = "VOLUMED_GC_GRACE", value_name = "DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub gc_grace: std::time::Duration,

    /// Disk I/O engine: io_uring, a thread pool, or io_uring when the kernel allows it
    #[arg(long, env = "VOLUMED_IO_ENGINE", value_enum, default_value = "auto")]
    pub io_engine: EngineChoice,
}

/// Settings with every default filled in.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub nbd_listen: SocketAddr,
    pub nbd_socket: PathBuf,
    pub nbd_tls: Option<TlsFiles>,
    pub nbd_limits: crate::nbd::server::Limits,
    pub store: StoreUrl,
    pub io_engine: EngineChoice,
    pub zstd_level: i32,
    pub cache_size: u64,
    pub gc_grace: std::time::Duration,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    volumed_api::parse_size(s).map_err(|e| e.to_string())
}

/// A duration that cannot be zero: a zero deadline would drop every client.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl Args {
    pub fn resolve(self) -> anyhow::Result<Config> {
        let data_dir = match self.data_dir {
            Some(d) => d,
            None => default_data_dir()?,
        };
        let data_dir = absolute(data_dir)?;
        let store = match self.store {
            Some(url) => StoreUrl::parse(&url)?,
            None => StoreUrl::File(data_dir.join("store")),
        };
        let nbd_tls = match (self.nbd_tls_cert, self.nbd_tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: absolute(cert)?,
                key: absolute(key)?,
                client_ca: self.nbd_tls_client_ca.map(absolute).transpose()?,
            }),
            // clap's `requires` makes one without the other an error.
            _ => None,
        };
        Ok(Config {
            nbd_tls,
            socket: absolute(self.socket.unwrap_or_else(|| data_dir.join("volumed.sock")))?,
            nbd_socket: absolute(self.nbd_socket.unwrap_or_else(|| data_dir.join("nbd.sock")))?,
            nbd_listen: self.nbd_listen,
            nbd_limits: crate::nbd::server::Limits {
                // A u32 always fits a usize on the targets we build for.
                max_connections: usize::try_from(self.nbd_max_connections).unwrap_or(usize::MAX),
                handshake_timeout: self.nbd_handshake_timeout,
            },
            io_engine: self.io_engine,
            zstd_level: self.zstd_level,
            cache_size: self.cache_size,
            gc_grace: self.gc_grace,
            store,
            data_dir,
        })
    }
}

/// `$XDG_DATA_HOME/volumed`, else `~/.local/share/volumed`.
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("volumed"));
    }
    let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) else {
        bail!("HOME is not set; pass --data-dir");
    };
    Ok(PathBuf::from(home).join(".local/share/volumed"))
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    std::path::absolute(&p).with_context(|| format!("cannot resolve path {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("volumed").chain(args.iter().copied()))
    }

    #[test]
    fn nbd_listens_on_loopback_unless_told() {
        // The environment could override the default; these tests never set it.
        if std::env::var_os("VOLUMED_NBD_LISTEN").is_none() {
            let a = parse(&["--data-dir", "/tmp/x"]).unwrap();
            assert!(a.nbd_listen.ip().is_loopback(), "{}", a.nbd_listen);
        }
        let a = parse(&["--nbd-listen", "0.0.0.0:10809"]).unwrap();
        assert!(a.nbd_listen.ip().is_unspecified());
    }

    #[test]
    fn nbd_limits_parse_and_refuse_zero() {
        let c = parse(&[
            "--data-dir",
            "/tmp/x",
            "--nbd-max-connections",
            "8",
            "--nbd-handshake-timeout",
            "1500ms",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(c.nbd_limits.max_connections, 8);
        assert_eq!(
            c.nbd_limits.handshake_timeout,
            std::time::Duration::from_millis(1500)
        );
        assert!(parse(&["--nbd-max-connections", "0"]).is_err());
        assert!(parse(&["--nbd-handshake-timeout", "0s"]).is_err());
        assert!(parse(&["--nbd-handshake-timeout", "soon"]).is_err());
    }

    #[test]
    fn tls_files_come_in_pairs() {
        assert!(parse(&["--nbd-tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--nbd-tls-key", "k.pem"]).is_err());
        assert!(parse(&["--nbd-tls-client-ca", "ca.pem"]).is_err());
        let c = parse(&[
            "--data-dir",
            "/tmp/x",
            "--nbd-tls-cert",
            "c.pem",
            "--nbd-tls-key",
            "k.pem",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        let tls = c.nbd_tls.unwrap();
        assert!(tls.cert.is_absolute() && tls.key.ends_with("k.pem"));
        assert_eq!(tls.client_ca, None);
    }
}
