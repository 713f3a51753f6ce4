//! Where clients reach the exports, and every NBD URI the daemon reports
//! (`nbd://`, `nbds://`, `nbd+unix://`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// Where clients reach the exports, for the URIs the API reports.
#[derive(Debug, Clone)]
pub struct NbdEndpoints {
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    /// TLS is required on TCP, so its URI is `nbds://`.
    pub tls: bool,
}

impl NbdEndpoints {
    pub fn tcp_uri(&self, export: &str) -> String {
        nbd_proto::Uri::tcp(self.tcp, export, self.tls).to_string()
    }

    pub fn unix_uri(&self, export: &str) -> String {
        nbd_proto::Uri::unix(&self.unix, export, false).to_string()
    }
}
