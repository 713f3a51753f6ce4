//! Bounded resources on the NBD side: a client that pipelines requests and
//! never reads, a flood of idle connections, the connection cap and the
//! negotiation deadline, and the log lines for connections turned away.
//! Everything runs against the real daemon binary.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nbd_proto::decode::{Wire, header, header_rest};
use nbd_proto::{
    Command, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, GREETING_LEN, Greeting, InfoRequest,
    META_BASE_ALLOCATION, MetaRequest, OPT_ABORT, OPT_GO, OPT_SET_META_CONTEXT, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_META_CONTEXT,
    REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REQUEST_HEADER_LEN, Request, Uri,
};
use volumed_tests::pki::Pki;
use volumed_tests::raw::Raw;
use volumed_tests::{TestDaemon, nbd_py, nbd_py_output, nbdinfo_json, qemu_io};

/// Fixed newstyle and no zeroes.
const CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

const MIB: u64 = 1 << 20;
const REQUEST_LEN: u64 = REQUEST_HEADER_LEN as u64;

/// The pid of the daemon `d` runs: the `volumed` process whose command line
/// names its data dir.
fn daemon_pid(d: &TestDaemon) -> u32 {
    let data = d.data_dir();
    let data = data.to_str().unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_volumed = args
            .first()
            .is_some_and(|a| a.ends_with(b"/volumed") || *a == b"volumed");
        if is_volumed && args.contains(&data.as_bytes()) {
            return pid;
        }
    }
    panic!("no volumed process serves {data}");
}

/// Resident set of `pid` in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// (send queue, receive queue) in bytes of the loopback TCP socket from
/// `local` to `remote`, as the kernel reports them in /proc/net/tcp.
fn tcp_queues(local: u16, remote: u16) -> (u64, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = (
        format!("0100007F:{local:04X}"),
        format!("0100007F:{remote:04X}"),
    );
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && f[1] == want.0 && f[2] == want.1 {
            let (tx, rx) = f[4].split_once(':').unwrap();
            return (
                u64::from_str_radix(tx, 16).unwrap(),
                u64::from_str_radix(rx, 16).unwrap(),
            );
        }
    }
    panic!("no socket {local} -> {remote} in /proc/net/tcp");
}

/// Raises this process's open-file limit to `want` (or the hard limit); the
/// daemon it starts inherits it.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur >= want {
        return;
    }
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: setrlimit reads the struct; raising the soft limit up to the
    // hard one needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    assert!(
        lim.rlim_cur >= want,
        "RLIMIT_NOFILE hard limit {} is below {want}",
        lim.rlim_max
    );
}

fn request(buf: &mut Vec<u8>, command: Command, cookie: u64, offset: u64, len: u32) {
    let req = Request {
        flags: 0,
        command,
        cookie,
        offset,
        length: len,
    };
    buf.extend_from_slice(&req.encode());
}

/// Fixed newstyle, structured replies, base:allocation on `name`, then
/// NBD_OPT_GO: the client is in transmission when this returns.
fn negotiate_structured(port: u16, name: &str) -> Raw {
    let mut r = Raw::connect(port);
    r.0.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    let d = MetaRequest {
        name: name.to_owned(),
        queries: vec![META_BASE_ALLOCATION.to_owned()],
    }
    .encode()
    .unwrap();
    r.option(OPT_SET_META_CONTEXT, &d);
    assert_eq!(r.reply().0, REP_META_CONTEXT);
    assert_eq!(r.reply().0, REP_ACK);
    r.go(name);
    r
}

/// Reads one reply to a request without data: (flags, type, cookie,
/// payload). A simple reply (which the server may send for any such
/// request) reads as a final chunk of type 0, or of type error.
fn reply_chunk(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).unwrap();
    let mut h = magic.to_vec();
    h.resize(4 + header_rest(magic).expect("a reply magic"), 0);
    s.read_exact(&mut h[4..]).unwrap();
    match header(&h).unwrap() {
        (Wire::Simple { errno, cookie }, _) => {
            let typ = if errno == 0 { 0 } else { REPLY_TYPE_ERROR };
            (REPLY_FLAG_DONE, typ, cookie, errno.to_be_bytes().to_vec())
        }
        (
            Wire::Chunk {
                flags, typ, cookie, ..
            },
            len,
        ) => {
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).unwrap();
            (flags, typ, cookie, payload)
        }
    }
}

/// libnbd's URI of export `data` over TLS with the credentials in `client`.
fn tls_uri(d: &TestDaemon, client: &std::path::Path) -> String {
    Uri::tcp(SocketAddr::from(([127, 0, 0, 1], d.nbd_port)), "data", true)
        .with_param("tls-certificates", &client.display().to_string())
        .to_string()
}

/// Opens a TCP connection and reads the greeting: the daemon took it.
fn greeted(port: u16) -> Option<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).ok()?;
    Greeting::parse(&g).ok().map(|_| s)
}

/// True if the peer closed `s` (EOF or reset) within `limit`.
fn closed_within(s: &mut impl Read, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut b = [0u8; 64];
    while Instant::now() < deadline {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
    }
    false
}

/// Still open: nothing to read and no EOF.
fn still_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

/// Waits until the daemon's log has a line for which `f` holds.
fn wait_log(d: &TestDaemon, limit: Duration, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let log = d.log();
        if let Some(l) = log.lines().find(|l| f(l)) {
            return l.to_owned();
        }
        assert!(Instant::now() < deadline, "no such line in the log:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds a `qemu-io` read of 4 KiB takes, start to exit.
fn qemu_read_latency(uri: &str) -> Duration {
    let t = Instant::now();
    qemu_io(uri, &["read 0 4k"]);
    t.elapsed()
}

#[test]
fn unread_replies_and_idle_connections_stay_bounded() {
    const IDLE: usize = 1000;
    const FLOOD: u64 = 100_000;
    const RSS_LIMIT: u64 = 256 * MIB;
    raise_nofile(8192);
    // The idle connections stay in negotiation for the whole test.
    let d = TestDaemon::start_with_env(&[("VOLUMED_NBD_HANDSHAKE_TIMEOUT", "10min")]);
    d.vol_ok(&["create", "big", "--size", "1G", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "big"]);
    d.vol_ok(&["create", "other", "--size", "64M"]);
    d.vol_ok(&["attach", "other"]);
    qemu_io(&d.uri("other"), &["write -P 0x5a 0 1M"]);
    let pid = daemon_pid(&d);

    // Data in every other chunk: a block status of the whole volume has
    // 16384 extents, a 128 KiB reply. Unbounded, 100,000 of them are 12 GiB.
    let chunk = 64 << 10;
    let chunks = (1u64 << 30) / chunk;
    let mut c = negotiate_structured(d.nbd_port, "big");
    let mut w = c.0.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let block = [0xa5u8; 4096];
        let mut buf = Vec::new();
        for i in 0..chunks / 2 {
            request(&mut buf, Command::Write, i, 2 * i * chunk, 4096);
            buf.extend_from_slice(&block);
        }
        w.write_all(&buf).unwrap();
    });
    for _ in 0..chunks / 2 {
        let (flags, typ, cookie, _) = reply_chunk(&mut c.0);
        assert_eq!((flags, typ), (REPLY_FLAG_DONE, 0), "write {cookie}");
    }
    writer.join().unwrap();
    let baseline = rss(pid);

    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| greeted(d.nbd_port).unwrap_or_else(|| panic!("idle connection {i} refused")))
        .collect();
    let with_idle = rss(pid);

    // The flood: 100,000 block-status requests, replies never read.
    let sent = Arc::new(AtomicU64::new(0));
    let mut flood_w = c.0.try_clone().unwrap();
    let flood = {
        let sent = Arc::clone(&sent);
        thread::spawn(move || {
            for batch in 0..FLOOD / 1000 {
                let mut buf = Vec::new();
                for i in 0..1000 {
                    request(&mut buf, Command::BlockStatus, batch * 1000 + i, 0, 1 << 30);
                }
                if flood_w.write_all(&buf).is_err() {
                    return;
                }
                sent.fetch_add(1000, Ordering::Relaxed);
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    // Other clients, on the flooded volume and another, meanwhile.
    thread::sleep(Duration::from_secs(1));
    let mut latencies = Vec::new();
    for _ in 0..3 {
        latencies.push(qemu_read_latency(&d.uri("other")));
        latencies.push(qemu_read_latency(&d.uri("big")));
        thread::sleep(Duration::from_millis(500));
    }
    let info = nbdinfo_json(&d.uri("other"));
    assert_eq!(info["exports"][0]["export-size"], 64 * MIB);
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let written = sent.load(Ordering::Relaxed);
    // What the client wrote and the kernel still holds, on either side, the
    // daemon has not read; it must stop reading once its window is full.
    let client_port = c.0.local_addr().unwrap().port();
    let queued = |(tx, _): (u64, u64), (_, rx): (u64, u64)| tx + rx;
    let pending = queued(
        tcp_queues(client_port, d.nbd_port),
        tcp_queues(d.nbd_port, client_port),
    );
    thread::sleep(Duration::from_millis(500));
    let pending_later = queued(
        tcp_queues(client_port, d.nbd_port),
        tcp_queues(d.nbd_port, client_port),
    );
    let taken = (written * REQUEST_LEN - pending) / REQUEST_LEN;

    eprintln!(
        "rss: baseline {} MiB, with {IDLE} idle connections {} MiB, peak under the flood {} MiB; \
         flood requests written {written} of {FLOOD}, read by the daemon {taken} \
         ({pending} bytes left unread, {pending_later} half a second later); \
         qemu-io 4k read latencies: {latencies:?}",
        baseline / MIB,
        with_idle / MIB,
        peak / MIB
    );
    assert!(peak < RSS_LIMIT, "daemon RSS peaked at {} MiB", peak / MIB);
    // Its window (128 requests), its read buffer (128 KiB of headers, 4681
    // requests) and replies in socket buffers, far below the flood.
    assert!(
        taken < FLOOD / 10,
        "the daemon read {taken} requests it had not answered: it does not push back"
    );
    assert_eq!(pending, pending_later, "the daemon kept reading");
    for l in &latencies {
        assert!(*l < Duration::from_secs(2), "a 4k read took {l:?}");
    }

    // Close everything; the daemon serves normally afterwards.
    c.0.shutdown(Shutdown::Both).unwrap();
    flood.join().unwrap();
    drop(c);
    let mut idle = idle;
    assert!(
        idle.iter_mut().all(still_open),
        "idle connections were closed"
    );
    drop(idle);
    qemu_io(
        &d.uri("big"),
        &[
            "write -P 0x3c 1M 64k",
            "read -P 0x3c 1M 64k",
            "read -P 0xa5 0 4k",
        ],
    );
    qemu_io(&d.uri("other"), &["read -P 0x5a 0 1M"]);
    eprintln!("rss after the flood: {} MiB", rss(pid) / MIB);
    d.finish();
}

#[test]
fn connections_above_the_cap_are_closed_at_once() {
    let d = TestDaemon::start_with_env(&[("VOLUMED_NBD_MAX_CONNECTIONS", "8")]);
    d.vol_ok(&["create", "v", "--size", "16M"]);
    d.vol_ok(&["attach", "v"]);
    // Six idle in negotiation, two in transmission: all count.
    let mut held: Vec<TcpStream> = (0..6).map(|_| greeted(d.nbd_port).unwrap()).collect();
    let serving: Vec<Raw> = (0..2)
        .map(|_| {
            let mut r = Raw::connect(d.nbd_port);
            r.0.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
            r.go("v");
            r
        })
        .collect();

    // The ninth is accepted by the kernel and closed at once, no greeting.
    let t = Instant::now();
    let mut ninth = TcpStream::connect(("127.0.0.1", d.nbd_port)).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(closed_within(&mut ninth, Duration::from_secs(2)));
    let refused_in = t.elapsed();
    let peer = ninth.local_addr().unwrap().to_string();
    let line = wait_log(&d, Duration::from_secs(2), |l| {
        l.contains("NBD connection refused") && l.contains(&peer)
    });
    assert!(
        line.contains(" WARN ") && line.contains("connection limit reached"),
        "{line}"
    );
    // The Unix socket shares the cap.
    let mut unix = std::os::unix::net::UnixStream::connect(d.nbd_socket()).unwrap();
    unix.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(closed_within(&mut unix, Duration::from_secs(2)));

    // When one closes, a new one is accepted.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        if let Some(s) = greeted(d.nbd_port) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no connection accepted after one closed"
        );
        thread::sleep(Duration::from_millis(50));
    };
    held.push(again);
    eprintln!("ninth connection closed after {refused_in:?}");

    drop(held);
    drop(serving);
    qemu_io(&d.uri("v"), &["write -P 7 0 4k", "read -P 7 0 4k"]);
    d.finish_expecting(&[], &["connection limit reached"]);
}

#[test]
fn silent_clients_are_dropped_at_the_deadline_and_refusals_are_logged() {
    let d = TestDaemon::start_with_env(&[("VOLUMED_NBD_HANDSHAKE_TIMEOUT", "1s")]);
    d.vol_ok(&["create", "v", "--size", "16M"]);
    d.vol_ok(&["attach", "v"]);

    // Says nothing after the greeting.
    let mut s = greeted(d.nbd_port).unwrap();
    let peer = s.local_addr().unwrap().to_string();
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    let line = wait_log(&d, Duration::from_secs(2), |l| l.contains(&peer));
    assert!(
        line.contains(" INFO ") && line.contains("handshake timed out"),
        "{line}"
    );

    // The deadline covers all of negotiation, not each read: a client
    // trickling options is cut off too.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
    let t = Instant::now();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(3) {
        r.option(OPT_STRUCTURED_REPLY, &[]);
        let mut h = [0u8; 20];
        if r.0.read_exact(&mut h).is_err() {
            closed = true;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(closed, "a trickling client outlived the deadline");

    // An unknown export: refused, logged with the peer once the client leaves.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
    let peer = r.0.local_addr().unwrap().to_string();
    let go = InfoRequest {
        name: "nope".into(),
        requests: Vec::new(),
    }
    .encode()
    .unwrap();
    r.option(OPT_GO, &go);
    assert_eq!(r.reply().0, REP_ERR_UNKNOWN);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    drop(r);
    let line = wait_log(&d, Duration::from_secs(2), |l| l.contains(&peer));
    assert!(
        line.contains(" INFO ") && line.contains("unknown export") && line.contains("nope"),
        "{line}"
    );

    // A burst: one line per second per reason, and the rest counted.
    thread::sleep(Duration::from_millis(1100));
    let before = d.log().lines().count();
    let burst: Vec<TcpStream> = (0..20).map(|_| greeted(d.nbd_port).unwrap()).collect();
    for mut s in burst {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(3)));
    }
    // Let the once-a-second flush report what was left out.
    thread::sleep(Duration::from_millis(2500));
    let log = d.log();
    let timeouts: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains("handshake timed out"))
        .collect();
    let lines = timeouts
        .iter()
        .filter(|l| l.contains("NBD connection refused"))
        .count();
    let counted: u64 = timeouts
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        lines <= 3,
        "{lines} lines for one burst:\n{}",
        timeouts.join("\n")
    );
    assert_eq!(
        lines as u64 + counted,
        20,
        "every refusal is a line or counted:\n{}",
        timeouts.join("\n")
    );

    // A real client negotiates well within the deadline.
    qemu_io(&d.uri("v"), &["write -P 9 0 4k", "read -P 9 0 4k"]);
    d.finish();
}

#[test]
fn tls_refusals_are_logged_with_the_peer() {
    let pki = Pki::new();
    let env = pki.daemon_env(true);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = TestDaemon::start_with_env(&refs);
    d.vol_ok(&["create", "data", "--size", "16M"]);
    d.vol_ok(&["attach", "data"]);

    // Plaintext on a TLS-only listener: refused, then the client leaves.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
    let peer = r.0.local_addr().unwrap().to_string();
    let go = InfoRequest {
        name: "data".into(),
        requests: Vec::new(),
    }
    .encode()
    .unwrap();
    r.option(OPT_GO, &go);
    assert_eq!(r.reply().0, REP_ERR_TLS_REQD);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    drop(r);
    let line = wait_log(&d, Duration::from_secs(2), |l| l.contains(&peer));
    assert!(
        line.contains(" INFO ") && line.contains("TLS required"),
        "{line}"
    );

    // STARTTLS, then something that is not a TLS handshake.
    let mut r = Raw::connect(d.nbd_port);
    r.0.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
    let peer = r.0.local_addr().unwrap().to_string();
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    r.0.write_all(&[0x55; 64]).unwrap();
    // Perhaps a TLS alert, then the close.
    assert!(closed_within(&mut r.0, Duration::from_secs(5)));
    let line = wait_log(&d, Duration::from_secs(2), |l| l.contains(&peer));
    assert!(
        line.contains(" INFO ") && line.contains("TLS handshake failed"),
        "{line}"
    );

    // A client without a certificate: the TLS handshake fails, logged.
    thread::sleep(Duration::from_millis(1100));
    let before = d.log().lines().count();
    let uri = tls_uri(&d, &pki.client("anonymous"));
    let out = nbd_py_output(
        &uri,
        "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(URI)\n",
    );
    assert!(
        !out.status.success(),
        "a client without a certificate got in"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while !d
        .log()
        .lines()
        .skip(before)
        .any(|l| l.contains(" INFO ") && l.contains("TLS handshake failed"))
    {
        assert!(
            Instant::now() < deadline,
            "no line for the refused certificate:\n{}",
            d.log()
        );
        thread::sleep(Duration::from_millis(50));
    }

    // A good client still gets in.
    let uri = tls_uri(&d, &pki.client("client"));
    nbd_py(
        &uri,
        "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(URI)\nassert h.get_size() == 16 << 20\nh.shutdown()\n",
    );
    d.finish();
}
