//! Real NBD clients against attached volumes, over TCP and the Unix socket.

use std::process::Command;

use volumed_tests::{TestDaemon, nbd_py, nbd_py_output, nbdinfo_json, qemu_io, run_ok};

#[test]
fn nbdinfo_and_qemu_img_see_size_and_name_over_tcp_and_unix() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "data", "--size", "3G"]);
    d.vol_ok(&["attach", "data"]);
    for uri in [d.uri("data"), d.unix_uri("data")] {
        let info = nbdinfo_json(&uri);
        let e = &info["exports"][0];
        assert_eq!(e["export-name"], "data", "{uri}");
        assert_eq!(e["export-size"], 3u64 << 30, "{uri}");
        assert_eq!(e["can_flush"], true);
        assert_eq!(e["can_fua"], true);
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["block_size_preferred"], 512 << 10);

        let out = run_ok(Command::new("qemu-img").args(["info", "--output=json", &uri]));
        let qi: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(qi["virtual-size"], 3u64 << 30, "{uri}");
        assert_eq!(qi["format"], "raw");
    }
    // NBD_OPT_LIST shows attached volumes only.
    d.vol_ok(&["create", "hidden", "--size", "1M"]);
    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", &d.uri("")]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data"]);
    d.finish();
}

#[test]
fn data_survives_detach_attach_restart_and_kill_after_flush() {
    let mut d = TestDaemon::start();
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    // qemu-io writes over TCP; libnbd writes over the Unix socket with FUA
    // and with a plain write followed by FLUSH.
    qemu_io(
        &d.uri("data"),
        &["write -P 0x5a 0 1M", "write -P 0xa5 63M 1M"],
    );
    nbd_py(
        &d.unix_uri("data"),
        "h = nbd.NBD(); h.connect_uri(URI)\n\
         h.pwrite(b'\\x11' * 4096, 8 << 20, nbd.CMD_FLAG_FUA)\n\
         h.pwrite(b'hello volumed', 16 << 20)\n\
         h.flush()\n\
         h.shutdown()\n",
    );
    let check = |d: &TestDaemon| {
        qemu_io(
            &d.uri("data"),
            &[
                "read -P 0x5a 0 1M",
                "read -P 0xa5 63M 1M",
                "read -P 0 1M 1M",
            ],
        );
        let out = nbd_py(
            &d.unix_uri("data"),
            "h = nbd.NBD(); h.connect_uri(URI)\n\
             assert h.pread(4096, 8 << 20) == b'\\x11' * 4096\n\
             print(h.pread(13, 16 << 20).decode())\n\
             h.shutdown()\n",
        );
        assert_eq!(out.trim(), "hello volumed");
    };
    check(&d);
    d.vol_ok(&["detach", "data"]);
    d.vol_ok(&["attach", "data"]);
    check(&d);
    d.restart();
    check(&d);
    // Flushed writes survive kill -9.
    nbd_py(
        &d.uri("data"),
        "h = nbd.NBD(); h.connect_uri(URI)\nh.pwrite(b'\\x77' * 65536, 32 << 20)\nh.flush()\nh.shutdown()\n",
    );
    d.kill9();
    d.start_again();
    check(&d);
    qemu_io(&d.uri("data"), &["read -P 0x77 32M 64k"]);
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

#[test]
fn many_requests_in_flight_on_several_connections() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "par", "--size", "256M"]);
    d.vol_ok(&["attach", "par"]);
    // libnbd's async API keeps 64 requests in flight on each of 4
    // connections; every block is stamped with its own index.
    let out = nbd_py(
        &d.uri("par"),
        r#"
BS = 65536
N = 2048
hs = []
for _ in range(4):
    h = nbd.NBD(); h.connect_uri(URI); hs.append(h)
errors = []
def done(err):
    if err.value: errors.append(err.value)
    return 1  # retire the command
def drain(h, limit):
    while h.aio_in_flight() > limit:
        h.poll(-1)
for i in range(N):
    h = hs[i % 4]
    buf = nbd.Buffer.from_bytearray(bytearray(i.to_bytes(4, 'little') * (BS // 4)))
    h.aio_pwrite(buf, i * BS, completion=done)
    drain(h, 64)
for h in hs:
    drain(h, 0)
hs[0].flush()
bad = 0
for i in range(N):
    if hs[(i + 1) % 4].pread(BS, i * BS) != i.to_bytes(4, 'little') * (BS // 4):
        bad += 1
for h in hs: h.shutdown()
print(bad, len(errors))
"#,
    );
    assert_eq!(
        out.trim(),
        "0 0",
        "blocks with wrong content, failed writes"
    );
    d.finish();
}

#[test]
fn detach_disconnects_the_export_clients() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "v", "--size", "16M"]);
    d.vol_ok(&["attach", "v"]);
    let mut client = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import nbd, os, sys, time\n\
             h = nbd.NBD(); h.connect_uri(os.environ['URI'])\n\
             h.pwrite(b'x' * 512, 0)\n\
             print('connected', flush=True)\n\
             sys.stdin.readline()\n\
             try:\n    h.pread(512, 0)\n    print('still served')\n\
             except nbd.Error as e:\n    print('disconnected')\n",
        )
        .env("URI", d.uri("v"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    d.vol_ok(&["detach", "v"]);
    drop(client.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "disconnected");
    client.wait().unwrap();
    // And a new connection is refused: the export is gone.
    let out = nbd_py_output(&d.uri("v"), "h = nbd.NBD(); h.connect_uri(URI)\n");
    assert!(!out.status.success());
    d.finish();
}
