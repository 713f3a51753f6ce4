//! Throwaway certificate authorities for the TLS tests, made with the
//! `openssl` command. Client directories use the file names libnbd's
//! `tls-certificates` and qemu's `tls-creds-x509` both expect: `ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run_ok;

pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost, and a client
    /// certificate, all signed by that CA; plus a second, unrelated CA with
    /// its own client certificate, which the server must not trust.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("volumed-pki-")
            .tempdir()
            .unwrap();
        let p = Pki { dir };
        for ca in ["ca", "rogue-ca"] {
            p.self_signed_ca(ca);
        }
        p.issue(
            "ca",
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        p.issue(
            "ca",
            "client",
            "volumed-test-client",
            "extendedKeyUsage=clientAuth\n",
        );
        p.issue(
            "rogue-ca",
            "rogue-client",
            "volumed-rogue-client",
            "extendedKeyUsage=clientAuth\n",
        );
        p.client_dir("client", "ca", Some("client"));
        p.client_dir("anonymous", "ca", None);
        p.client_dir("rogue", "rogue-ca", Some("rogue-client"));
        p.client_dir("rogue-client", "ca", Some("rogue-client"));
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The daemon's environment for TLS, with client certificates required
    /// when `client_auth`.
    pub fn daemon_env(&self, client_auth: bool) -> Vec<(&'static str, String)> {
        let s = |p: PathBuf| p.display().to_string();
        let mut env = vec![
            ("VOLUMED_NBD_TLS_CERT", s(self.path("server-cert.pem"))),
            ("VOLUMED_NBD_TLS_KEY", s(self.path("server-key.pem"))),
        ];
        if client_auth {
            env.push(("VOLUMED_NBD_TLS_CLIENT_CA", s(self.path("ca-cert.pem"))));
        }
        env
    }

    /// Client directories: `client` (trusts our CA, has a client
    /// certificate), `anonymous` (trusts our CA, no certificate), `rogue`
    /// (trusts only the other CA), `rogue-client` (trusts our CA, presents
    /// the other CA's certificate).
    pub fn client(&self, which: &str) -> PathBuf {
        self.path(which)
    }

    fn openssl(&self, args: &[&str]) {
        run_ok(
            Command::new("openssl")
                .current_dir(self.dir.path())
                .args(args),
        );
    }

    fn self_signed_ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=volumed test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
        ]);
    }

    fn issue(&self, ca: &str, name: &str, cn: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.path(&ext),
            format!("basicConstraints=CA:FALSE\n{extensions}"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}-cert.pem"),
        ]);
    }

    fn client_dir(&self, dir: &str, ca: &str, cert: Option<&str>) {
        let d = self.path(dir);
        std::fs::create_dir(&d).unwrap();
        copy(
            &self.path(&format!("{ca}-cert.pem")),
            &d.join("ca-cert.pem"),
        );
        if let Some(c) = cert {
            copy(
                &self.path(&format!("{c}-cert.pem")),
                &d.join("client-cert.pem"),
            );
            copy(
                &self.path(&format!("{c}-key.pem")),
                &d.join("client-key.pem"),
            );
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}
