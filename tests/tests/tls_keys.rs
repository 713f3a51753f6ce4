//! Every kind of server key OpenSSL makes, as the NBD TLS key of the real
//! daemon, with real TLS clients: qemu-io (GnuTLS) writes and reads with
//! the client's signature algorithms narrowed to one scheme at a time, so
//! each RSA padding and hash the server can be asked for is exercised, and
//! libnbd (GnuTLS) reads back. Keys the daemon cannot use stop it at start
//! with one line naming the key.
//!
//! ring signs with RSA keys of 2048, 3072 and 4096 bits only; the odd sizes
//! here (2432 is the upstream NBD test suite's key) go through the daemon's
//! own RSA signer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nbd_proto::Uri;
use volumed_tests::pki::Pki;
use volumed_tests::{TestDaemon, bin_dir, nbd_py, run_ok, volumed_bin};

const SUPPORTED: &str = "(RSA 2048 to 8192 bits, ECDSA P-256/P-384, Ed25519)";

/// How a key file is written.
#[derive(Clone, Copy, Debug)]
enum Encoding {
    /// `BEGIN PRIVATE KEY`, what `openssl genpkey` writes.
    Pkcs8,
    /// `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`.
    Traditional,
}

/// A server key and a certificate for it from the test CA (which the
/// `anonymous` client directory trusts).
struct ServerKey {
    pki: Pki,
    key: PathBuf,
    cert: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

fn genpkey_args<'a>(alg: &'a str, opts: &'a [&'a str], out: &'a str) -> Vec<&'a str> {
    let mut args = vec!["genpkey", "-algorithm", alg];
    for o in opts {
        args.extend(["-pkeyopt", o]);
    }
    args.extend(["-out", out]);
    args
}

impl ServerKey {
    /// Makes the key with `openssl genpkey -algorithm ALG -pkeyopt OPT...`.
    fn new(name: &str, alg: &str, opts: &[&str], encoding: Encoding) -> ServerKey {
        let pki = Pki::new();
        let generated = format!("{name}.p8.pem");
        openssl(pki.dir.path(), &genpkey_args(alg, opts, &generated));
        Self::from_generated(pki, name, &generated, encoding)
    }

    fn from_generated(pki: Pki, name: &str, generated: &str, encoding: Encoding) -> ServerKey {
        let dir = pki.dir.path().to_path_buf();
        let key_name = format!("{name}-key.pem");
        match encoding {
            Encoding::Pkcs8 => std::fs::rename(dir.join(generated), dir.join(&key_name)).unwrap(),
            Encoding::Traditional => openssl(
                &dir,
                &["pkey", "-in", generated, "-traditional", "-out", &key_name],
            ),
        }
        let head = std::fs::read_to_string(dir.join(&key_name)).unwrap();
        let expect = match encoding {
            Encoding::Pkcs8 => "-----BEGIN PRIVATE KEY-----",
            Encoding::Traditional => "-----BEGIN ",
        };
        assert!(head.starts_with(expect), "{name}: {head:.40}");
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let csr = format!("{name}.csr");
        let cert_name = format!("{name}-cert.pem");
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-key",
                &key_name,
                "-subj",
                "/CN=localhost",
                "-out",
                &csr,
            ],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &cert_name,
            ],
        );
        ServerKey {
            key: dir.join(key_name),
            cert: dir.join(cert_name),
            pki,
        }
    }

    fn start(&self) -> TestDaemon {
        let (cert, key) = (
            self.cert.display().to_string(),
            self.key.display().to_string(),
        );
        TestDaemon::start_with_env(&[
            ("VOLUMED_NBD_TLS_CERT", cert.as_str()),
            ("VOLUMED_NBD_TLS_KEY", key.as_str()),
        ])
    }

    /// The daemon with this key, run to its exit: what it printed.
    fn refused(&self) -> Output {
        let data = tempfile::tempdir().unwrap();
        Command::new(volumed_bin())
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--nbd-listen", "127.0.0.1:0"])
            .arg("--nbd-tls-cert")
            .arg(&self.cert)
            .arg("--nbd-tls-key")
            .arg(&self.key)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// qemu-io over TLS with GnuTLS priority `priority` (None: qemu's default),
/// asserting it succeeded.
fn qemu_io_tls(d: &TestDaemon, client: &Path, priority: Option<&str>, cmds: &[&str]) {
    let out = qemu_io_tls_output(d, client, priority, cmds);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("error") && !stdout.contains("failed"),
        "qemu-io {priority:?} {cmds:?}: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
}

fn qemu_io_tls_output(
    d: &TestDaemon,
    client: &Path,
    priority: Option<&str>,
    cmds: &[&str],
) -> Output {
    let mut creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    );
    if let Some(p) = priority {
        creds.push_str(",priority=");
        creds.push_str(p);
    }
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(creds)
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={},export=k,tls-creds=tls0",
            d.nbd_port
        ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("run qemu-io")
}

/// GnuTLS priorities that leave the client one RSA signature scheme to
/// offer (ECDSA stays for the CA's signature on the certificate). TLS 1.3
/// allows only PSS in the handshake, so PKCS#1 v1.5 is tried on TLS 1.2.
const RSA_PRIORITIES: &[&str] = &[
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA256:+SIGN-ECDSA-SECP256R1-SHA256",
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA384:+SIGN-ECDSA-SECP256R1-SHA256",
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA512:+SIGN-ECDSA-SECP256R1-SHA256",
    "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-SHA256:+SIGN-ECDSA-SHA256",
    "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-SHA384:+SIGN-ECDSA-SHA256",
    "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-SHA512:+SIGN-ECDSA-SHA256",
    "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA256:+SIGN-ECDSA-SHA256",
];

const TLS12: &str = "NORMAL:-VERS-ALL:+VERS-TLS1.2";

/// A client offering no scheme an RSA key can sign with, which must fail:
/// proof that the priorities above really narrow what GnuTLS offers.
const NO_RSA: &str = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-ECDSA-SHA256";

/// Serves a volume with this key: qemu writes over TLS with its default
/// priority, reads back under each of `priorities`, and libnbd reads back.
fn serves(key: &ServerKey, priorities: &[&str]) {
    let d = key.start();
    d.vol_ok(&["create", "k", "--size", "16M"]);
    d.vol_ok(&["attach", "k"]);
    let client = key.pki.client("anonymous");
    let started = Instant::now();
    qemu_io_tls(
        &d,
        &client,
        None,
        &["write -P 0x5a 0 1M", "write -P 0xa5 15M 1M", "flush"],
    );
    for p in priorities {
        qemu_io_tls(
            &d,
            &client,
            Some(p),
            &["read -P 0x5a 0 1M", "read -P 0xa5 15M 1M"],
        );
    }
    let uri = Uri::tcp(SocketAddr::from(([127, 0, 0, 1], d.nbd_port)), "k", true)
        .with_param("tls-certificates", &client.display().to_string())
        .to_string();
    nbd_py(
        &uri,
        "h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(URI)\n\
         assert h.get_tls_negotiated()\n\
         assert h.pread(1 << 20, 0) == b'\\x5a' * (1 << 20)\n\
         assert h.pread(1 << 20, 15 << 20) == b'\\xa5' * (1 << 20)\n\
         h.shutdown()\n",
    );
    eprintln!(
        "{}: {} TLS connections in {:?}",
        key.key.display(),
        priorities.len() + 2,
        started.elapsed()
    );
    d.finish();
}

/// An RSA key serves under every RSA scheme, and not without one.
fn rsa(bits: u32, encoding: Encoding) {
    let opt = format!("rsa_keygen_bits:{bits}");
    let key = ServerKey::new(&format!("rsa{bits}"), "RSA", &[&opt], encoding);
    serves(&key, RSA_PRIORITIES);
    let d = key.start();
    d.vol_ok(&["create", "k", "--size", "1M"]);
    d.vol_ok(&["attach", "k"]);
    let out = qemu_io_tls_output(
        &d,
        &key.pki.client("anonymous"),
        Some(NO_RSA),
        &["read 0 4k"],
    );
    assert!(
        !out.status.success(),
        "an RSA key signed for a client that offered only ECDSA: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    d.finish();
}

#[test]
fn rsa_2048() {
    rsa(2048, Encoding::Pkcs8);
}

/// The upstream NBD test suite's size (primes of 1216 bits), in both
/// encodings.
#[test]
fn rsa_2432_pkcs8() {
    rsa(2432, Encoding::Pkcs8);
}

#[test]
fn rsa_2432_pkcs1() {
    rsa(2432, Encoding::Traditional);
}

#[test]
fn rsa_2560() {
    rsa(2560, Encoding::Pkcs8);
}

#[test]
fn rsa_3000() {
    rsa(3000, Encoding::Traditional);
}

#[test]
fn rsa_3584() {
    rsa(3584, Encoding::Pkcs8);
}

#[test]
fn rsa_4096() {
    rsa(4096, Encoding::Traditional);
}

/// An 8192-bit key takes OpenSSL anywhere from seconds to minutes to make;
/// past 20 s this test says so and skips rather than hold the suite.
#[test]
fn rsa_8192_if_quick_to_make() {
    // The harness's build of the binaries comes first, so it does not eat
    // into the 20 s.
    bin_dir();
    let pki = Pki::new();
    let mut child = Command::new("openssl")
        .current_dir(pki.dir.path())
        .args(genpkey_args(
            "RSA",
            &["rsa_keygen_bits:8192"],
            "rsa8192.p8.pem",
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "openssl genpkey 8192: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("SKIPPED: openssl took over 20 s to make an 8192-bit RSA key");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let key = ServerKey::from_generated(pki, "rsa8192", "rsa8192.p8.pem", Encoding::Pkcs8);
    // One PSS and one PKCS#1 scheme: every 8192-bit signature is costly.
    serves(&key, &[RSA_PRIORITIES[0], RSA_PRIORITIES[3]]);
}

#[test]
fn ecdsa_p256_sec1() {
    let key = ServerKey::new(
        "p256",
        "EC",
        &["ec_paramgen_curve:P-256"],
        Encoding::Traditional,
    );
    serves(&key, &[TLS12]);
}

#[test]
fn ecdsa_p384() {
    let key = ServerKey::new("p384", "EC", &["ec_paramgen_curve:P-384"], Encoding::Pkcs8);
    serves(&key, &[TLS12]);
}

#[test]
fn ed25519() {
    let key = ServerKey::new("ed25519", "ED25519", &[], Encoding::Pkcs8);
    serves(&key, &[TLS12]);
}

/// Keys no signer here takes stop the daemon at start with one line that
/// names the file, the key and what would work.
#[test]
fn unusable_keys_stop_the_daemon_with_one_line() {
    for (name, alg, opts, what) in [
        (
            "rsa1024",
            "RSA",
            &["rsa_keygen_bits:1024"][..],
            "RSA 1024 bits",
        ),
        (
            "p521",
            "EC",
            &["ec_paramgen_curve:P-521"][..],
            "ECDSA P-521",
        ),
        ("ed448", "ED448", &[][..], "Ed448"),
    ] {
        let key = ServerKey::new(name, alg, opts, Encoding::Pkcs8);
        let out = key.refused();
        assert!(!out.status.success(), "{name}: the daemon started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expect = format!(
            "volumed: error: configure NBD TLS: NBD TLS key {}: {what} is not supported {SUPPORTED}",
            key.key.display()
        );
        let line = stderr
            .lines()
            .find(|l| l.starts_with("volumed: error:"))
            .unwrap_or_else(|| panic!("{name}: no error line in:\n{stderr}"));
        assert_eq!(line, expect, "{name}");
    }
}
