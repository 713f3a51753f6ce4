//! A fault-injecting HTTP proxy in front of the S3 test server.
//!
//! volumed's S3 client talks HTTP/1.1 to the proxy, which forwards each
//! request to the real server unless a rule says to break it. It speaks just
//! enough HTTP for S3: request bodies by Content-Length (or chunked), and
//! responses by Content-Length, chunked, or none (HEAD, 204, 304).
//!
//! Faults, each applied to requests matching a method and a key substring,
//! every `every`-th match, at most `limit` times:
//! - `SlowDown`: 503 with S3's `SlowDown` error, the request never forwarded;
//! - `InternalError`: 500, never forwarded;
//! - `Reset`: the connection is reset before anything is forwarded;
//! - `Hang`: no answer ever comes (the client's timeout must fire);
//! - `LostResponse`: forwarded and done by the server, then the connection
//!   is reset instead of answering (a PUT that happened but looks failed);
//! - `TruncatedBody`: forwarded; the answer announces its full length but
//!   the connection closes halfway through the body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    SlowDown,
    InternalError,
    Reset,
    Hang,
    LostResponse,
    TruncatedBody,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::SlowDown,
        Fault::InternalError,
        Fault::Reset,
        Fault::Hang,
        Fault::LostResponse,
        Fault::TruncatedBody,
    ];
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub fault: Fault,
    /// `GET`, `PUT`, `HEAD`, `DELETE`, ... or any method when `None`.
    pub method: Option<&'static str>,
    /// A substring of the request path (`/chunks/`, `/manifests/`, ...).
    pub path_contains: Option<&'static str>,
    /// Inject on every n-th matching request (1: all of them).
    pub every: u64,
    /// Stop after this many injections.
    pub limit: Option<u64>,
}

impl Rule {
    pub fn new(fault: Fault) -> Self {
        Rule {
            fault,
            method: None,
            path_contains: None,
            every: 1,
            limit: None,
        }
    }
}

#[derive(Default)]
struct State {
    rule: Option<Rule>,
    matched: u64,
}

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    injected: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts the proxy on 127.0.0.1 in front of `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Self {
        let up: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream is http://ip:port");
        let state = Arc::new(Mutex::new(State::default()));
        let injected = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (st, inj, fwd) = (state.clone(), injected.clone(), forwarded.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let (st, inj, fwd) = (st.clone(), inj.clone(), fwd.clone());
                        tokio::spawn(async move {
                            let _ = serve(sock, up, st, inj, fwd).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = rx => {}
                }
            });
            // Hanging connections end with the runtime.
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        FaultProxy {
            addr: addr_rx.recv().expect("proxy address"),
            state,
            injected,
            forwarded,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, rule: Rule) {
        let mut st = self.state.lock().unwrap();
        st.rule = Some(rule);
        st.matched = 0;
    }

    pub fn clear(&self) {
        self.state.lock().unwrap().rule = None;
    }

    /// Requests broken so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP message head: the first line and the headers, raw.
struct Head {
    raw: Vec<u8>,
    first: String,
    content_length: Option<usize>,
    chunked: bool,
}

async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut first = String::new();
    let (mut content_length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        raw.extend_from_slice(line.as_bytes());
        let l = line.trim_end();
        if first.is_empty() {
            first = l.to_owned();
            continue;
        }
        if l.is_empty() {
            return Ok(Some(Head {
                raw,
                first,
                content_length,
                chunked,
            }));
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = v.parse().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
}

/// Reads a body as framed by `head` and returns its raw bytes (chunked
/// framing included, so it can be forwarded as is).
async fn read_body<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    head: &Head,
    has_body: bool,
) -> std::io::Result<Vec<u8>> {
    if !has_body {
        return Ok(Vec::new());
    }
    if head.chunked {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await?;
            out.extend_from_slice(line.as_bytes());
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t).await?;
                    out.extend_from_slice(t.as_bytes());
                    if t.trim().is_empty() {
                        return Ok(out);
                    }
                }
            }
            let mut buf = vec![0u8; size + 2];
            r.read_exact(&mut buf).await?;
            out.extend_from_slice(&buf);
        }
    }
    let mut buf = vec![0u8; head.content_length.unwrap_or(0)];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

fn decide(state: &Mutex<State>, method: &str, path: &str) -> Option<Fault> {
    let mut st = state.lock().unwrap();
    let rule = st.rule.clone()?;
    if rule.method.is_some_and(|m| m != method)
        || rule.path_contains.is_some_and(|p| !path.contains(p))
    {
        return None;
    }
    st.matched += 1;
    let n = st.matched;
    if !n.is_multiple_of(rule.every.max(1)) {
        return None;
    }
    if rule.limit.is_some_and(|l| n / rule.every.max(1) > l) {
        return None;
    }
    Some(rule.fault)
}

fn error_reply(status: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn reset(sock: TcpStream) {
    // SO_LINGER 0: close with a reset, as a dropped connection looks.
    let _ = sock.set_zero_linger();
    drop(sock);
}

async fn serve(
    sock: TcpStream,
    up_addr: SocketAddr,
    state: Arc<Mutex<State>>,
    injected: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut client = BufReader::new(sock);
    let mut upstream: Option<BufReader<TcpStream>> = None;
    loop {
        let Some(req) = read_head(&mut client).await? else {
            return Ok(());
        };
        let mut parts = req.first.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let body = read_body(&mut client, &req, true).await?;
        let fault = decide(&state, &method, &path);
        if fault.is_some() {
            injected.fetch_add(1, Ordering::SeqCst);
        }
        match fault {
            Some(Fault::SlowDown) => {
                client
                    .get_mut()
                    .write_all(&error_reply("503 Slow Down", "SlowDown"))
                    .await?;
                continue;
            }
            Some(Fault::InternalError) => {
                client
                    .get_mut()
                    .write_all(&error_reply("500 Internal Server Error", "InternalError"))
                    .await?;
                continue;
            }
            Some(Fault::Reset) => {
                reset(client.into_inner()).await;
                return Ok(());
            }
            Some(Fault::Hang) => {
                // Hold the connection, answer nothing, until the client gives up.
                let mut sink = [0u8; 4096];
                while client.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            _ => {}
        }
        if upstream.is_none() {
            upstream = Some(BufReader::new(TcpStream::connect(up_addr).await?));
        }
        let up = upstream.as_mut().expect("connected above");
        up.get_mut().write_all(&req.raw).await?;
        up.get_mut().write_all(&body).await?;
        let Some(resp) = read_head(up).await? else {
            return Ok(());
        };
        let status: u16 = resp
            .first
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let has_body = method != "HEAD" && status != 204 && status != 304 && status >= 200;
        let rbody = read_body(up, &resp, has_body).await?;
        forwarded.fetch_add(1, Ordering::SeqCst);
        match fault {
            Some(Fault::LostResponse) => {
                reset(client.into_inner()).await;
                return Ok(());
            }
            Some(Fault::TruncatedBody) if rbody.len() > 1 && !resp.chunked => {
                let c = client.get_mut();
                c.write_all(&resp.raw).await?;
                c.write_all(&rbody[..rbody.len() / 2]).await?;
                c.flush().await?;
                return Ok(());
            }
            _ => {}
        }
        let c = client.get_mut();
        c.write_all(&resp.raw).await?;
        c.write_all(&rbody).await?;
    }
}
