//! NBD URIs, as NetworkBlockDevice/nbd `doc/uri.md` defines them and
//! libnbd and qemu take them: `nbd://HOST[:PORT]/EXPORT` over TCP,
//! `nbd+unix:///EXPORT?socket=PATH` over a Unix socket, and `nbds` /
//! `nbds+unix` for the same with TLS. Other query parameters (libnbd's
//! `tls-certificates`, ...) are kept in order.
//!
//! Formatting percent-encodes only what would change a URI's meaning
//! (spaces, `%`, `?`, `#`, and `&`/`=` in a query), so the export names and
//! socket paths the daemon has come out as they are.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use thiserror::Error;

/// NBD's IANA port, which a TCP URI without a port means.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `host` without brackets, even for IPv6; `port` as written.
    Tcp {
        host: String,
        port: Option<u16>,
    },
    Unix {
        socket: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub tls: bool,
    pub transport: Transport,
    /// The export name: the path without its leading `/`.
    pub export: String,
    /// Query parameters other than a Unix URI's `socket`, in order.
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UriError {
    #[error("not an NBD URI (nbd://, nbds://, nbd+unix:// or nbds+unix://): {0:?}")]
    Scheme(String),
    #[error("NBD URI over TCP without a host")]
    NoHost,
    #[error("bad host in NBD URI: {0:?}")]
    Host(String),
    #[error("bad port in NBD URI: {0:?}")]
    Port(String),
    #[error("NBD URI over a Unix socket names a host: {0:?}")]
    UnixHost(String),
    #[error("NBD URI over a Unix socket without exactly one socket= parameter")]
    Socket,
    #[error("bad percent-encoding in NBD URI: {0:?}")]
    Percent(String),
    #[error("NBD URI with a fragment")]
    Fragment,
}

impl Uri {
    /// The URI of `export` on a TCP listener; an IPv6 address keeps its
    /// scope id, as `SocketAddr` prints it.
    pub fn tcp(addr: SocketAddr, export: &str, tls: bool) -> Self {
        let host = match addr {
            SocketAddr::V6(a) if a.scope_id() != 0 => format!("{}%{}", a.ip(), a.scope_id()),
            a => a.ip().to_string(),
        };
        Uri {
            tls,
            transport: Transport::Tcp {
                host,
                port: Some(addr.port()),
            },
            export: export.to_owned(),
            params: Vec::new(),
        }
    }

    /// The URI of `export` on a Unix socket.
    pub fn unix(socket: &Path, export: &str, tls: bool) -> Self {
        Uri {
            tls,
            transport: Transport::Unix {
                socket: socket.display().to_string(),
            },
            export: export.to_owned(),
            params: Vec::new(),
        }
    }

    /// The same URI with one more query parameter.
    pub fn with_param(mut self, key: &str, value: &str) -> Self {
        self.params.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn scheme(&self) -> &'static str {
        match (&self.transport, self.tls) {
            (Transport::Tcp { .. }, false) => "nbd",
            (Transport::Tcp { .. }, true) => "nbds",
            (Transport::Unix { .. }, false) => "nbd+unix",
            (Transport::Unix { .. }, true) => "nbds+unix",
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme())?;
        let mut query: Vec<(&str, &str)> = Vec::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "[{host}]")?;
                } else {
                    f.write_str(host)?;
                }
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
            }
            Transport::Unix { socket } => query.push(("socket", socket)),
        }
        write!(f, "/{}", Encoded(&self.export, PATH_SAFE))?;
        query.extend(self.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (i, (k, v)) in query.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(
                f,
                "{sep}{}={}",
                Encoded(k, QUERY_SAFE),
                Encoded(v, QUERY_SAFE)
            )?;
        }
        Ok(())
    }
}

impl FromStr for Uri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        let scheme_err = || UriError::Scheme(s.chars().take(64).collect());
        let (scheme, rest) = s.split_once("://").ok_or_else(scheme_err)?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(scheme_err()),
        };
        if rest.contains('#') {
            return Err(UriError::Fragment);
        }
        let (before, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = before.split_once('/').unwrap_or((before, ""));
        let export = decode(path)?;
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((decode(k)?, decode(v)?));
        }
        let transport = if unix {
            if !authority.is_empty() {
                return Err(UriError::UnixHost(authority.to_owned()));
            }
            let mut sockets = params.iter().filter(|(k, _)| k == "socket");
            let socket = match (sockets.next(), sockets.next()) {
                (Some((_, v)), None) if !v.is_empty() => v.clone(),
                _ => return Err(UriError::Socket),
            };
            params.retain(|(k, _)| k != "socket");
            Transport::Unix { socket }
        } else {
            let (host, port) = host_port(authority)?;
            Transport::Tcp { host, port }
        };
        Ok(Uri {
            tls,
            transport,
            export,
            params,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_port(a: &str) -> Result<(String, Option<u16>), UriError> {
    if a.is_empty() {
        return Err(UriError::NoHost);
    }
    let (host, port) = if let Some(inner) = a.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| UriError::Host(a.to_owned()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| UriError::Port(p.to_owned()))?,
            ),
        };
        (host, port)
    } else {
        match a.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let bad_host = |c: char| matches!(c, '[' | ']' | '@' | '/' | '?') || c.is_whitespace();
    if host.is_empty() || host.contains(bad_host) {
        return Err(UriError::Host(a.to_owned()));
    }
    let port = port
        .map(|p| p.parse::<u16>().map_err(|_| UriError::Port(p.to_owned())))
        .transpose()?;
    Ok((host.to_owned(), port))
}

/// Characters left as they are in the path, besides letters and digits.
const PATH_SAFE: &str = "-._~!$&'()*+,;=:@/";
/// The same in a query key or value: `&` and `=` separate parameters.
const QUERY_SAFE: &str = "-._~!$'()*+,;:@/";

struct Encoded<'a>(&'a str, &'static str);

impl fmt::Display for Encoded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.as_bytes() {
            if b.is_ascii_alphanumeric() || self.1.as_bytes().contains(&b) {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        Ok(())
    }
}

fn decode(s: &str) -> Result<String, UriError> {
    let bad = || UriError::Percent(s.chars().take(64).collect());
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_probe::largest_allocation;
    use proptest::prelude::*;

    /// The shapes DESIGN.md promises, exactly.
    #[test]
    fn the_daemons_uris() {
        let tcp: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(
            Uri::tcp(tcp, "data", false).to_string(),
            "nbd://127.0.0.1:10809/data"
        );
        assert_eq!(
            Uri::tcp(tcp, "data", true).to_string(),
            "nbds://127.0.0.1:10809/data"
        );
        for v6 in ["[::1]:10809", "[fe80::1%2]:10809"] {
            let addr: SocketAddr = v6.parse().unwrap();
            assert_eq!(
                Uri::tcp(addr, "a", false).to_string(),
                format!("nbd://{addr}/a")
            );
        }
        let unix = Uri::unix(Path::new("/tmp/nbd.sock"), "data", false);
        assert_eq!(unix.to_string(), "nbd+unix:///data?socket=/tmp/nbd.sock");
        assert_eq!(
            unix.with_param("tls-certificates", "/etc/pki").to_string(),
            "nbd+unix:///data?socket=/tmp/nbd.sock&tls-certificates=/etc/pki"
        );
        let odd = Uri::unix(Path::new("/tmp/a b&c.sock"), "x", true);
        assert_eq!(odd.to_string(), "nbds+unix:///x?socket=/tmp/a%20b%26c.sock");
    }

    #[test]
    fn parses_what_clients_write() {
        let u: Uri = "nbd://example.com/disk".parse().unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "example.com".into(),
                port: None
            }
        );
        assert_eq!(u.export, "disk");
        let u: Uri = "nbds://[::1]:10900/a%20b?tls-certificates=/c"
            .parse()
            .unwrap();
        assert!(u.tls);
        assert_eq!(u.export, "a b");
        assert_eq!(u.params, vec![("tls-certificates".into(), "/c".into())]);
        let u: Uri = "nbd://h".parse().unwrap();
        assert_eq!(u.export, "");
        for bad in [
            "http://h/x",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:port/x",
            "nbd://h:70000/x",
            "nbd+unix://h/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=/a&socket=/b",
            "nbd://h/%zz",
            "nbd://h/%c3",
            "nbd://h/x#frag",
            "nbd://[::1/x",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad}");
        }
    }

    fn arb_uri() -> impl Strategy<Value = Uri> {
        let host = prop_oneof![
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
            "[a-z][a-z0-9.-]{0,20}",
        ];
        let transport = prop_oneof![
            (host, proptest::option::of(any::<u16>()))
                .prop_map(|(host, port)| Transport::Tcp { host, port }),
            ".{1,40}".prop_map(|socket| Transport::Unix { socket }),
        ];
        (
            any::<bool>(),
            transport,
            ".{0,30}",
            proptest::collection::vec(("[a-z-]{1,10}", ".{0,20}"), 0..3),
        )
            .prop_map(|(tls, transport, export, params)| Uri {
                tls,
                transport,
                export,
                params: params.into_iter().filter(|(k, _)| k != "socket").collect(),
            })
    }

    proptest! {
        #[test]
        fn uris_round_trip(u in arb_uri()) {
            let s = u.to_string();
            prop_assert_eq!(s.parse::<Uri>(), Ok(u), "{}", s);
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}", t in "(nbds?(\\+unix)?://)[\\[\\]:/?&=%a-z0-9]{0,40}") {
            let (_, max) = largest_allocation(|| {
                let _ = s.parse::<Uri>();
                let _ = t.parse::<Uri>();
            });
            // Strings are copies of parts of the input, and the list of
            // parameters has at most one per byte.
            prop_assert!(max <= (s.len() + t.len()).max(4) * 3 * size_of::<String>());
        }
    }
}
