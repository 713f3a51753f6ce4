//! Command-line flags and environment, resolved into concrete paths.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser};
use snapshot::StoreUrl;

use crate::disk::EngineChoice;
use crate::tls::TlsFiles;

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

    /// How long an NBD connection that is its thread's only one polls its
    /// socket for the next request after answering a request done on its
    /// thread (a read, a small write, a lone flush), before the thread
    /// sleeps; 0 turns polling off
    #[arg(long, env = "VOLUMED_NBD_POLL", value_name = "DURATION", default_value = "50us",
          value_parser = humantime::parse_duration)]
    pub nbd_poll: std::time::Duration,

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

    /// Compress chunk objects with zstd, or store them raw (in an encrypted
    /// store compressed sizes say something about the data)
    #[arg(long, env = "VOLUMED_COMPRESS", value_enum, default_value = "zstd")]
    pub compress: Compress,

    /// Whether the store is encrypted: `auto` follows its header (a new
    /// store is unencrypted); `on` makes a new store encrypted and refuses
    /// an unencrypted one; `off` the reverse
    #[arg(
        long,
        env = "VOLUMED_STORE_ENCRYPTION",
        value_enum,
        default_value = "auto"
    )]
    pub store_encryption: StoreEncryption,

    /// In an encrypted store, what shares a data key (and so dedup): every
    /// volume under one key (`store`), or each new volume and the volumes
    /// restored from its snapshots (`lineage`, as EBS does)
    #[arg(
        long,
        env = "VOLUMED_ENCRYPTION_DOMAIN",
        value_enum,
        default_value = "store"
    )]
    pub encryption_domain: crate::keys::DomainScope,

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
    /// (`powerloss-sim` is for crash tests only: unsynced writes stay in memory)
    #[arg(long, env = "VOLUMED_IO_ENGINE", value_enum, default_value = "auto")]
    pub io_engine: EngineChoice,

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (off by default;
    /// give a loopback address unless a scraper elsewhere must reach it)
    #[arg(long, env = "VOLUMED_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the AWS-compatible endpoint (EC2 volume and snapshot actions,
    /// EBS direct APIs, SigV4) here [default: off]
    #[arg(
        long,
        env = "VOLUMED_AWS_LISTEN",
        value_name = "ADDR:PORT",
        requires = "aws_credentials"
    )]
    pub aws_listen: Option<SocketAddr>,

    /// AWS credentials file (INI, one or more profiles) whose keys may sign
    /// requests; refused unless only its owner can read it
    #[arg(
        long,
        env = "VOLUMED_AWS_CREDENTIALS",
        value_name = "FILE",
        requires = "aws_listen"
    )]
    pub aws_credentials: Option<PathBuf>,

    /// The region requests must be signed for
    #[arg(
        long,
        env = "VOLUMED_AWS_REGION",
        value_name = "REGION",
        default_value = "us-east-1"
    )]
    pub aws_region: String,

    /// Instance-type table: instance-store volumes per type, one
    /// `TYPE = COUNT x SIZE` (or `TYPE = none`) per line [default: built in]
    #[arg(long, env = "VOLUMED_INSTANCE_TYPES", value_name = "FILE")]
    pub instance_types: Option<PathBuf>,

    /// How long a snapshot set's barrier may wait for the writes in flight
    /// on its members before the set fails (their I/O is paused meanwhile)
    #[arg(long, env = "VOLUMED_SNAPSHOT_BARRIER_TIMEOUT", value_name = "DURATION",
          default_value = "5s", value_parser = parse_timeout)]
    pub snapshot_barrier_timeout: std::time::Duration,

    /// A program run as `PATH NBD-URI quiesce|unquiesce` for each volume
    /// around the snapshots of EC2 CreateImage without NoReboot
    #[arg(long, env = "VOLUMED_QUIESCE_HOOK", value_name = "PATH")]
    pub quiesce_hook: Option<PathBuf>,

    /// TLS certificate chain (PEM) for the AWS endpoint: it then speaks HTTPS only
    #[arg(
        long,
        env = "VOLUMED_AWS_TLS_CERT",
        value_name = "FILE",
        requires_all = ["aws_tls_key", "aws_listen"]
    )]
    pub aws_tls_cert: Option<PathBuf>,

    /// S3 endpoint of the buckets VM import and export tasks name
    /// [default: the store's, from the AWS environment]
    #[arg(long, env = "VOLUMED_TASKS_S3_ENDPOINT", value_name = "URL")]
    pub tasks_s3_endpoint: Option<String>,

    /// A directory whose files EC2 import tasks may read as `file://` URLs
    /// (repeat for several; comma-separated in the variable) [default: none]
    #[arg(
        long,
        env = "VOLUMED_IMPORT_DIR",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub import_dir: Vec<PathBuf>,

    /// Private key (PEM) of --aws-tls-cert
    #[arg(
        long,
        env = "VOLUMED_AWS_TLS_KEY",
        value_name = "FILE",
        requires = "aws_tls_cert"
    )]
    pub aws_tls_key: Option<PathBuf>,
}

/// `--compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Zstd,
    Off,
}

/// `--store-encryption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreEncryption {
    Auto,
    On,
    Off,
}

impl StoreEncryption {
    pub fn expect(self) -> snapshot::store_header::Expect {
        use snapshot::store_header::Expect;
        match self {
            StoreEncryption::Auto => Expect::Auto,
            StoreEncryption::On => Expect::Encrypted,
            StoreEncryption::Off => Expect::Plain,
        }
    }
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
    /// `codec::NO_COMPRESSION` with `--compress off`.
    pub zstd_level: i32,
    pub store_encryption: StoreEncryption,
    pub encryption_domain: crate::keys::DomainScope,
    pub cache_size: u64,
    pub gc_grace: std::time::Duration,
    pub metrics_listen: Option<SocketAddr>,
    /// The AWS-compatible endpoint, when configured.
    pub aws: Option<crate::aws::AwsConfig>,
    pub instance_types: Option<PathBuf>,
    pub snapshot_barrier_timeout: std::time::Duration,
    pub quiesce_hook: Option<PathBuf>,
    /// `--tasks-s3-endpoint`.
    pub tasks_s3_endpoint: Option<String>,
    /// `--import-dir`.
    pub import_dirs: Vec<PathBuf>,
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
    /// The process's arguments and environment; on a bad one, prints
    /// clap's message and exits as `Parser::parse` does.
    pub fn from_process() -> Args {
        Args::try_parse_with_env(std::env::args_os(), &|var| std::env::var_os(var))
            .unwrap_or_else(|e| e.exit())
    }

    /// Parses `argv` (program name first) against `env` rather than the
    /// process environment: a flag's variable (`VOLUMED_*`) stands in for
    /// the flag when the flag is absent, as clap's `env` does. Tests pass
    /// their own environment, so none depends on the one they run in.
    pub fn try_parse_with_env<I, T>(
        argv: I,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let cmd = Args::command();
        let mut full = argv.clone();
        for arg in cmd.get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            if flag_given(&argv, long) {
                continue;
            }
            if let Some(value) = var.to_str().and_then(env) {
                let mut flag = OsString::from(format!("--{long}="));
                flag.push(value);
                full.push(flag);
            }
        }
        // clap's `env` read the process environment when the command was
        // built; without it, the variables above are the only ones seen.
        let bare = cmd.mut_args(|a| a.env(None::<&'static str>));
        match bare.try_get_matches_from(full) {
            Ok(m) => Args::from_arg_matches(&m),
            // Help names each flag's variable, which only the full command
            // still knows.
            Err(e) if e.kind() == ErrorKind::DisplayHelp => Err(Args::command()
                .try_get_matches_from(argv)
                .err()
                .unwrap_or(e)),
            Err(e) => Err(e),
        }
    }

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
        let aws = match (self.aws_listen, self.aws_credentials) {
            (Some(listen), Some(credentials)) => Some(crate::aws::AwsConfig {
                listen,
                credentials: absolute(credentials)?,
                region: crate::aws::region(&self.aws_region)?,
                tls: match (self.aws_tls_cert, self.aws_tls_key) {
                    (Some(cert), Some(key)) => Some(TlsFiles {
                        cert: absolute(cert)?,
                        key: absolute(key)?,
                        client_ca: None,
                    }),
                    _ => None,
                },
            }),
            // clap's `requires` makes one without the other an error.
            _ => None,
        };
        Ok(Config {
            aws,
            nbd_tls,
            socket: absolute(self.socket.unwrap_or_else(|| data_dir.join("volumed.sock")))?,
            nbd_socket: absolute(self.nbd_socket.unwrap_or_else(|| data_dir.join("nbd.sock")))?,
            nbd_listen: self.nbd_listen,
            nbd_limits: crate::nbd::server::Limits {
                // A u32 always fits a usize on the targets we build for.
                max_connections: usize::try_from(self.nbd_max_connections).unwrap_or(usize::MAX),
                handshake_timeout: self.nbd_handshake_timeout,
                poll: self.nbd_poll,
            },
            io_engine: self.io_engine,
            zstd_level: match self.compress {
                Compress::Zstd => self.zstd_level,
                Compress::Off => snapshot::codec::NO_COMPRESSION,
            },
            store_encryption: self.store_encryption,
            encryption_domain: self.encryption_domain,
            cache_size: self.cache_size,
            gc_grace: self.gc_grace,
            metrics_listen: self.metrics_listen,
            instance_types: self.instance_types.map(absolute).transpose()?,
            snapshot_barrier_timeout: self.snapshot_barrier_timeout,
            quiesce_hook: self.quiesce_hook.map(absolute).transpose()?,
            tasks_s3_endpoint: self.tasks_s3_endpoint,
            import_dirs: self
                .import_dir
                .into_iter()
                .map(absolute)
                .collect::<anyhow::Result<_>>()?,
            store,
            data_dir,
        })
    }
}

/// Whether `--long` (alone or as `--long=VALUE`) is among the arguments
/// before a `--`.
fn flag_given(argv: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    argv.iter()
        .skip(1)
        .map(|a| a.as_encoded_bytes())
        .take_while(|a| *a != b"--")
        .any(|a| {
            a.strip_prefix(flag.as_bytes())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"="))
        })
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

    /// Parses `args` against exactly the environment `env`.
    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Args, clap::Error> {
        let lookup = |var: &str| {
            env.iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| OsString::from(v))
        };
        Args::try_parse_with_env(
            std::iter::once("volumed").chain(args.iter().copied()),
            &lookup,
        )
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        parse_env(args, &[])
    }

    #[test]
    fn nbd_listens_on_loopback_unless_told() {
        let a = parse(&["--data-dir", "/tmp/x"]).unwrap();
        assert!(a.nbd_listen.ip().is_loopback(), "{}", a.nbd_listen);
        let a = parse(&["--nbd-listen", "0.0.0.0:10809"]).unwrap();
        assert!(a.nbd_listen.ip().is_unspecified());
    }

    #[test]
    fn a_variable_stands_in_for_an_absent_flag() {
        let env = [
            ("VOLUMED_NBD_LISTEN", "0.0.0.0:10809"),
            ("VOLUMED_GC_GRACE", "10s"),
            ("VOLUMED_IO_ENGINE", "threads"),
        ];
        let a = parse_env(&[], &env).unwrap();
        assert!(a.nbd_listen.ip().is_unspecified());
        assert_eq!(a.gc_grace, std::time::Duration::from_secs(10));
        assert_eq!(a.io_engine, EngineChoice::Threads);
        // The flag wins over its variable, in both spellings.
        let a = parse_env(&["--nbd-listen", "127.0.0.1:1"], &env).unwrap();
        assert_eq!(a.nbd_listen.port(), 1);
        let a = parse_env(&["--gc-grace=1m"], &env).unwrap();
        assert_eq!(a.gc_grace, std::time::Duration::from_secs(60));
        // A bad value in a variable is an error, as on the command line.
        assert!(parse_env(&[], &[("VOLUMED_ZSTD_LEVEL", "40")]).is_err());
        // The variable of one flag satisfies another's `requires`.
        let a = parse_env(
            &["--nbd-tls-cert", "c.pem"],
            &[("VOLUMED_NBD_TLS_KEY", "k.pem")],
        );
        assert_eq!(a.unwrap().nbd_tls_key, Some(PathBuf::from("k.pem")));
    }

    #[test]
    fn help_still_names_the_variables() {
        let e = parse(&["--help"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        assert!(e.to_string().contains("VOLUMED_GC_GRACE"), "{e}");
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
            "--nbd-poll",
            "0s",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(c.nbd_limits.max_connections, 8);
        assert!(c.nbd_limits.poll.is_zero());
        assert_eq!(
            c.nbd_limits.handshake_timeout,
            std::time::Duration::from_millis(1500)
        );
        assert!(parse(&["--nbd-max-connections", "0"]).is_err());
        assert!(parse(&["--nbd-handshake-timeout", "0s"]).is_err());
        assert!(parse(&["--nbd-handshake-timeout", "soon"]).is_err());
        assert!(parse(&["--nbd-poll", "a while"]).is_err());
    }

    #[test]
    fn aws_endpoint_is_off_unless_configured() {
        let c = parse(&["--data-dir", "/tmp/x"]).unwrap().resolve().unwrap();
        assert!(c.aws.is_none());
        assert!(parse(&["--aws-listen", "127.0.0.1:0"]).is_err());
        assert!(parse(&["--aws-credentials", "c"]).is_err());
        let c = parse_env(
            &["--data-dir", "/tmp/x", "--aws-credentials", "creds"],
            &[("VOLUMED_AWS_LISTEN", "127.0.0.1:8080")],
        )
        .unwrap()
        .resolve()
        .unwrap();
        let aws = c.aws.unwrap();
        assert_eq!(aws.listen.port(), 8080);
        assert_eq!(aws.region, "us-east-1");
        assert!(aws.credentials.is_absolute() && aws.tls.is_none());
        let bad = parse(&[
            "--data-dir",
            "/tmp/x",
            "--aws-listen",
            "127.0.0.1:1",
            "--aws-credentials",
            "c",
            "--aws-region",
            "Bad Region",
        ])
        .unwrap()
        .resolve();
        assert!(bad.is_err());
    }

    #[test]
    fn encryption_and_compression_flags() {
        let c = parse(&["--data-dir", "/tmp/x"]).unwrap().resolve().unwrap();
        assert_eq!(c.store_encryption, StoreEncryption::Auto);
        assert_eq!(c.encryption_domain, crate::keys::DomainScope::Store);
        assert_eq!(c.zstd_level, snapshot::codec::DEFAULT_LEVEL);
        let c = parse_env(
            &["--data-dir", "/tmp/x", "--compress", "off"],
            &[
                ("VOLUMED_STORE_ENCRYPTION", "on"),
                ("VOLUMED_ENCRYPTION_DOMAIN", "lineage"),
            ],
        )
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(c.store_encryption, StoreEncryption::On);
        assert_eq!(c.encryption_domain, crate::keys::DomainScope::Lineage);
        assert_eq!(c.zstd_level, snapshot::codec::NO_COMPRESSION);
        assert!(parse(&["--store-encryption", "maybe"]).is_err());
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
