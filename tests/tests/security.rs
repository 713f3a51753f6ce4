//! Security basics: a private control socket and data dir, and NBD over TLS
//! (required on TCP, offered on the Unix socket, optionally with client
//! certificates), checked with libnbd and qemu as the TLS clients.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use nbd_proto::{REP_ERR_INVALID, REP_ERR_TLS_REQD, Uri};
use volumed_tests::pki::Pki;
use volumed_tests::raw::Raw;
use volumed_tests::{TestDaemon, nbd_py, nbd_py_output, qemu_io, run_ok, volumed_bin};

fn start_tls(pki: &Pki, client_auth: bool) -> TestDaemon {
    let env = pki.daemon_env(client_auth);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestDaemon::start_with_env(&refs)
}

/// libnbd's TLS URI for `name`, trusting (and presenting) what `client`
/// holds.
fn tls_uri(d: &TestDaemon, name: &str, client: &Path) -> String {
    Uri::tcp(SocketAddr::from(([127, 0, 0, 1], d.nbd_port)), name, true)
        .with_param("tls-certificates", &client.display().to_string())
        .to_string()
}

/// qemu-io over TLS with qemu's x509 credentials from `client`.
fn qemu_io_tls(d: &TestDaemon, name: &str, client: &Path, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    ));
    c.arg("--image-opts").arg(format!(
        "driver=nbd,host=127.0.0.1,port={},export={name},tls-creds=tls0",
        d.nbd_port
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("run qemu-io")
}

/// URIs naming certificate files need libnbd's explicit consent.
const CONNECT: &str = "h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(URI)\n";

const READ_BACK: &str = "h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(URI)\n\
     assert h.get_tls_negotiated()\n\
     assert h.pread(1 << 20, 0) == b'\\x5a' * (1 << 20)\n\
     assert h.pread(1 << 20, 63 << 20) == b'\\xa5' * (1 << 20)\n\
     h.shutdown()\n";

/// The error a libnbd connection ends with, or None if it connected.
fn libnbd_refused(uri: &str) -> Option<String> {
    let out = nbd_py_output(uri, &format!("{CONNECT}h.shutdown()\n"));
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn control_socket_and_data_dir_are_private() {
    let d = TestDaemon::start();
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let mode = std::fs::metadata(d.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "data dir mode {mode:o}");
    d.finish();

    // A data dir others can write to is refused at start, with the fix.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(volumed_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--nbd-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("writable by group or others") && err.contains("chmod go-w"),
        "{err}"
    );
}

#[test]
fn nbd_tls_required_on_tcp_offered_on_unix() {
    let pki = Pki::new();
    let d = start_tls(&pki, false);
    assert_eq!(d.vol_json(&["status"])["nbd_tls"], "required");
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    let uri = d.vol_json(&["inspect", "data"])["uri"].clone();
    assert_eq!(
        uri,
        format!("nbds://127.0.0.1:{}/data", d.nbd_port),
        "the URI says TLS"
    );

    // qemu writes over TLS, libnbd reads back over TLS, with and without a
    // client certificate (the server does not ask for one here).
    let out = qemu_io_tls(
        &d,
        "data",
        &pki.client("client"),
        &["write -P 0x5a 0 1M", "write -P 0xa5 63M 1M", "flush"],
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for client in ["client", "anonymous"] {
        nbd_py(&tls_uri(&d, "data", &pki.client(client)), READ_BACK);
    }
    // nbdcopy over TLS and over the plain Unix socket give the same bytes.
    let tls_copy = d.dir.path().join("tls.img");
    let unix_copy = d.dir.path().join("unix.img");
    run_ok(Command::new("nbdcopy").args([
        &tls_uri(&d, "data", &pki.client("client")),
        tls_copy.to_str().unwrap(),
    ]));
    run_ok(Command::new("nbdcopy").args([&d.unix_uri("data"), unix_copy.to_str().unwrap()]));
    assert!(std::fs::read(&tls_copy).unwrap() == std::fs::read(&unix_copy).unwrap());

    // The Unix socket also upgrades when asked (no host name to verify).
    let unix_tls = Uri::unix(&d.nbd_socket(), "data", true)
        .with_param(
            "tls-certificates",
            &pki.client("anonymous").display().to_string(),
        )
        .with_param("tls-verify-peer", "false")
        .to_string();
    nbd_py(&unix_tls, READ_BACK);

    // Plaintext on TCP is refused, by libnbd and by qemu.
    let err = libnbd_refused(&d.uri("data")).expect("plaintext TCP must be refused");
    assert!(err.to_lowercase().contains("tls"), "{err}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &d.uri("data")])
        .output()
        .unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "qemu-io without TLS got in: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A client that does not trust our CA refuses the server.
    assert!(libnbd_refused(&tls_uri(&d, "data", &pki.client("rogue"))).is_some());

    // Byte by byte: before STARTTLS every option but STARTTLS and ABORT
    // gets NBD_REP_ERR_TLS_REQD, even the export list; a STARTTLS with data
    // is invalid; NBD_OPT_EXPORT_NAME cannot be refused, so it closes.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&3u32.to_be_bytes()).unwrap();
    for (opt, data) in [
        (3u32, &b""[..]),
        (7, &[0, 0, 0, 4, b'd', b'a', b't', b'a', 0, 0][..]),
        (8, &b""[..]),
        (0x4242, &b"x"[..]),
    ] {
        r.option(opt, data);
        let (typ, msg) = r.reply();
        assert_eq!(typ, REP_ERR_TLS_REQD, "option {opt}");
        assert!(String::from_utf8_lossy(&msg).contains("STARTTLS"));
    }
    r.option(5, b"junk");
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    r.option(1, b"data");
    assert!(r.closed());
    // A client without fixed newstyle cannot do TLS at all.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(r.closed());
    // STARTTLS acknowledged, then garbage instead of a TLS handshake.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&3u32.to_be_bytes()).unwrap();
    r.option(5, b"");
    assert_eq!(r.reply().0, 1);
    r.0.write_all(b"this is not a TLS ClientHello\r\n").unwrap();
    // rustls answers with an alert, then the server closes.
    let mut rest = Vec::new();
    let end = r.0.read_to_end(&mut rest);
    assert!(
        end.is_ok() || end.as_ref().unwrap_err().kind() == std::io::ErrorKind::ConnectionReset,
        "{end:?}"
    );
    assert!(
        rest.len() < 64,
        "{} bytes after a bad handshake",
        rest.len()
    );

    // After all that the daemon serves TLS clients as before.
    nbd_py(&tls_uri(&d, "data", &pki.client("client")), READ_BACK);
    d.finish();
}

#[test]
fn nbd_tls_with_client_certificates() {
    let pki = Pki::new();
    let d = start_tls(&pki, true);
    assert_eq!(d.vol_json(&["status"])["nbd_tls"], "required+client-cert");
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    let out = qemu_io_tls(
        &d,
        "data",
        &pki.client("client"),
        &["write -P 0x5a 0 1M", "write -P 0xa5 63M 1M"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nbd_py(&tls_uri(&d, "data", &pki.client("client")), READ_BACK);
    // No certificate, or one from a CA the server does not trust: refused.
    for client in ["anonymous", "rogue-client"] {
        assert!(
            libnbd_refused(&tls_uri(&d, "data", &pki.client(client))).is_some(),
            "{client} got in"
        );
    }
    let out = qemu_io_tls(&d, "data", &pki.client("anonymous"), &["read 0 4k"]);
    assert!(
        !out.status.success(),
        "qemu without a client certificate got in"
    );
    // The plain Unix socket stays open to local users, who are guarded by
    // its directory's permissions.
    qemu_io(&d.unix_uri("data"), &["read -P 0x5a 0 1M"]);
    nbd_py(&tls_uri(&d, "data", &pki.client("client")), READ_BACK);
    d.finish();
}

#[test]
fn nbd_tls_bad_configuration_is_refused_at_start() {
    let pki = Pki::new();
    let p = |n: &str| pki.path(n).display().to_string();
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--nbd-tls-cert".into(), p("server-cert.pem")],
            "--nbd-tls-key",
        ),
        (
            vec!["--nbd-tls-client-ca".into(), p("ca-cert.pem")],
            "--nbd-tls-cert",
        ),
        (
            vec![
                "--nbd-tls-cert".into(),
                p("missing.pem"),
                "--nbd-tls-key".into(),
                p("server-key.pem"),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--nbd-tls-cert".into(),
                garbage.display().to_string(),
                "--nbd-tls-key".into(),
                p("server-key.pem"),
            ],
            "holds no PEM certificate",
        ),
        (
            vec![
                "--nbd-tls-cert".into(),
                p("server-cert.pem"),
                "--nbd-tls-key".into(),
                p("client-key.pem"),
            ],
            "do not make a usable pair",
        ),
        (
            vec![
                "--nbd-tls-cert".into(),
                p("server-cert.pem"),
                "--nbd-tls-key".into(),
                p("server-key.pem"),
                "--nbd-tls-client-ca".into(),
                garbage.display().to_string(),
            ],
            "holds no PEM certificate",
        ),
    ];
    for (args, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(volumed_bin())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--nbd-listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in:\n{err}"
        );
    }
}
