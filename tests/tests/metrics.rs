//! `--metrics-listen`: Prometheus text over HTTP, counted from real NBD
//! traffic, clean under `promtool check metrics`.

use std::process::{Command, Stdio};

use volumed_tests::s3::free_port;
use volumed_tests::{TestDaemon, qemu_io, run_ok};

fn scrape(port: u16, accept: Option<&str>) -> String {
    let mut c = Command::new("curl");
    c.args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]);
    if let Some(a) = accept {
        c.args(["-H", &format!("Accept: {a}")]);
    }
    run_ok(&mut c)
}

/// The value of the sample `name` exactly as written (name and labels).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[test]
fn counts_real_traffic_and_lints_clean() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = TestDaemon::start_with_env(&[("VOLUMED_METRICS_LISTEN", &listen)]);
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    qemu_io(
        &d.uri("data"),
        &[
            "write 0 1M",
            "write 4M 4k",
            "read 0 8k",
            "discard 8M 512k",
            "flush",
        ],
    );
    let text = scrape(port, None);
    let v = |n: &str| sample(&text, n);
    assert_eq!(
        v(r#"volumed_volume_requests_total{volume="data",op="write"}"#),
        2.0
    );
    assert_eq!(
        v(r#"volumed_volume_bytes_total{volume="data",op="write"}"#),
        (1 << 20) as f64 + 4096.0
    );
    assert_eq!(
        v(r#"volumed_volume_requests_total{volume="data",op="read"}"#),
        1.0
    );
    assert_eq!(
        v(r#"volumed_volume_bytes_total{volume="data",op="read"}"#),
        8192.0
    );
    assert_eq!(
        v(r#"volumed_volume_bytes_total{volume="data",op="trim"}"#),
        (512 << 10) as f64
    );
    assert!(v(r#"volumed_volume_requests_total{volume="data",op="flush"}"#) >= 1.0);
    assert_eq!(
        v(r#"volumed_nbd_request_duration_seconds_count{op="write"}"#),
        2.0
    );
    assert_eq!(
        v(r#"volumed_nbd_request_duration_seconds_bucket{le="+Inf",op="write"}"#),
        2.0
    );
    // Three chunks written since no snapshot: 1 MiB is two, 4 KiB one.
    assert_eq!(
        v(r#"volumed_volume_changed_bytes{volume="data"}"#),
        (3 * (512 << 10)) as f64
    );
    assert!(v(r#"volumed_volume_allocated_bytes{volume="data"}"#) >= (1 << 20) as f64);
    assert!(v("volumed_nbd_connections_accepted_total{}") >= 1.0);

    // A snapshot: the changed bytes drop to zero, the store was used.
    let s = d.vol_json(&["snapshot", "create", "data", "--wait"]);
    assert_eq!(s["state"], "completed");
    let text = scrape(port, None);
    assert_eq!(
        sample(&text, r#"volumed_volume_changed_bytes{volume="data"}"#),
        0.0
    );
    assert!(
        sample(
            &text,
            r#"volumed_store_request_duration_seconds_count{op="put_if_absent"}"#
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"volumed_store_errors_total{op="put",kind="transient"}"#
        ),
        0.0
    );

    // The classic text format lints clean; OpenMetrics is there for who asks.
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    use std::io::Write;
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let om = scrape(port, Some("application/openmetrics-text; version=1.0.0"));
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert!(om.contains("# TYPE volumed_volume_requests counter"));
    d.finish();
}

#[test]
fn off_by_default_and_a_taken_port_stops_the_start() {
    let d = TestDaemon::start();
    let status = d.vol_json(&["status"]);
    assert!(status.is_object());
    assert!(!d.log().contains("metrics listening"), "{}", d.log());
    d.finish();

    // The port is taken: the daemon refuses to start, in one line.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(volumed_tests::volumed_bin())
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--nbd-listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", &addr])
        .env_remove("VOLUMED_STORE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bind the metrics listener"), "{err}");

    let out = Command::new(volumed_tests::volumed_bin())
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--metrics-listen",
            "nowhere",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-listen"));
}
