//! Polling the socket for the next request for a short while before the
//! thread sleeps, as qemu's iothreads do (`poll-max-ns`, 32 µs by default).
//!
//! Why: a client that sends its next request as soon as it has the reply
//! (fio at QD1, a guest's synchronous reads) makes the NBD thread sleep and
//! wake once per request, and on a VM waking a sleeping vCPU costs tens of
//! microseconds: on this 2-vCPU machine 4 KiB reads at QD1 ran at 80k IOPS
//! with volumed and fio on one CPU and at 12k on two (docs/performance.md,
//! "Polling before sleeping"). Spinning on a non-blocking `recv` for up to
//! `--nbd-poll` (default [`POLL_MAX`]) catches the next request without the sleep.
//!
//! Only when it is likely to pay, and never at the expense of other work:
//! the session marks itself quiet (nothing in flight, every reply written)
//! before it waits, a connection polls only while its last wait in that
//! state was shorter than [`POLL_MAX`], and only while it is the one
//! connection its thread serves (polling one socket would delay every other
//! connection of the thread). A connection that goes idle polls
//! once, finds nothing, and sleeps from then on until a request comes
//! quickly again. TLS sessions do not poll (their reads go through rustls).

use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// The default of `--nbd-poll`: how long a quiet session spins for its
/// next request.
pub const POLL_MAX: Duration = Duration::from_micros(50);

/// Set by the session while it has nothing to do but wait for a request.
#[derive(Clone, Default)]
pub struct Quiet(Arc<AtomicBool>);

impl Quiet {
    pub fn set(&self, quiet: bool) {
        self.0.store(quiet, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// Read halves alive on this thread (an NBD thread serves its
    /// connections, and drops them, on itself).
    static ON_THREAD: Arc<AtomicUsize> = Arc::default();
}

/// A connection's read half that may poll its socket before sleeping.
pub struct Polled<R> {
    inner: R,
    /// The count of read halves of the thread this one was made on.
    neighbours: Arc<AtomicUsize>,
    /// The socket, while `inner` keeps it open; `None`: never poll, and
    /// never tell that the client has sent nothing more.
    fd: Option<RawFd>,
    quiet: Quiet,
    /// When the session, quiet, first found nothing to read; cleared when
    /// data comes.
    idle_since: Option<Instant>,
    /// Whether the last quiet wait was shorter than `window`.
    hot: bool,
    /// How long to poll (`--nbd-poll`).
    window: Duration,
    /// Quiet waits that polling ended, and ones that polled in vain.
    pub(crate) caught: u64,
    pub(crate) missed: u64,
}

impl<R> Polled<R> {
    /// `fd` must be the socket `inner` reads, open for as long as `inner`
    /// lives; a zero `window` never polls.
    pub fn new(inner: R, fd: Option<RawFd>, quiet: Quiet, window: Duration) -> Self {
        let neighbours = ON_THREAD.with(Arc::clone);
        neighbours.fetch_add(1, Ordering::Relaxed);
        Polled {
            inner,
            neighbours,
            fd,
            quiet,
            idle_since: None,
            hot: true,
            window,
            caught: 0,
            missed: 0,
        }
    }

    /// Whether blocking the thread now would hold anyone up: another
    /// connection on the thread, or bytes from this client queued on the
    /// socket. Without a socket to ask: yes.
    pub fn others_wait(&self) -> bool {
        let Some(fd) = self.fd else { return true };
        if self.neighbours.load(Ordering::Relaxed) > 1 {
            return true;
        }
        let mut byte = 0u8;
        // SAFETY: `recv` writes at most one byte into `byte`; MSG_PEEK
        // leaves it on the socket; `fd` is open while `inner` is.
        let n = unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // 0 is the client's end of stream, also something to read.
        n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
    }

    fn arrived(&mut self) {
        if let Some(t) = self.idle_since.take() {
            self.hot = t.elapsed() < self.window;
        }
    }
}

impl<R> Drop for Polled<R> {
    fn drop(&mut self) {
        self.neighbours.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Polled<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut me.inner).poll_read(cx, buf) {
            me.arrived();
            return Poll::Ready(r);
        }
        // Pending: `inner` has registered the waker, so giving up below is
        // an ordinary wait.
        let Some(fd) = me.fd.filter(|_| me.quiet.get() && !me.window.is_zero()) else {
            return Poll::Pending;
        };
        let since = *me.idle_since.get_or_insert_with(Instant::now);
        if !me.hot || buf.remaining() == 0 || me.neighbours.load(Ordering::Relaxed) > 1 {
            return Poll::Pending;
        }
        let deadline = since + me.window;
        loop {
            // SAFETY: `recv` writes at most `remaining` bytes into the
            // unfilled part, and we mark as filled only what it wrote; `fd`
            // is open while `inner` is (see `new`).
            let n = unsafe {
                let spare = buf.unfilled_mut();
                libc::recv(
                    fd,
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: `recv` initialised these `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                me.caught += 1;
                me.arrived();
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => return Poll::Ready(Err(e)),
            }
            if Instant::now() >= deadline {
                me.missed += 1;
                me.hot = false;
                return Poll::Pending;
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A quiet session catches a request that comes within the window by
    /// polling; after a longer wait it stops polling (and still reads what
    /// comes, through the reactor); a busy session never polls.
    #[tokio::test]
    async fn polls_only_while_quiet_and_hot() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let quiet = Quiet::default();
        let mut r = Polled::new(a, Some(fd), quiet.clone(), POLL_MAX);
        let mut byte = [0u8; 1];
        let b = b.into_std().unwrap();
        // Sends `what` from another thread after `after`: the test's
        // runtime is blocked while it polls.
        let send_later = |b: std::os::unix::net::UnixStream, what: &'static [u8], after| {
            std::thread::spawn(move || {
                std::thread::sleep(after);
                use std::io::Write;
                (&b).write_all(what).unwrap();
                b
            })
        };

        quiet.set(true);
        r.window = Duration::from_secs(5);
        let t = send_later(b, b"x", Duration::from_millis(20));
        r.read_exact(&mut byte).await.unwrap();
        assert_eq!((&byte, r.caught, r.missed), (b"x", 1, 0));
        assert!(r.hot);
        let b = t.join().unwrap();

        // A wait longer than the window: one poll in vain, then cold.
        r.window = Duration::from_millis(5);
        let t = send_later(b, b"y", Duration::from_millis(50));
        r.read_exact(&mut byte).await.unwrap();
        assert_eq!((&byte, r.caught, r.missed), (b"y", 1, 1));
        assert!(!r.hot, "a wait longer than the window turns polling off");
        let b = t.join().unwrap();

        // Cold: the next wait sleeps at once, however long it is.
        let t = send_later(b, b"z", Duration::from_millis(20));
        r.read_exact(&mut byte).await.unwrap();
        assert_eq!((&byte, r.caught, r.missed), (b"z", 1, 1));
        let b = t.join().unwrap();

        // Busy: no polling at all, hot or not.
        quiet.set(false);
        r.hot = true;
        r.window = Duration::from_secs(5);
        let t = send_later(b, b"w", Duration::from_millis(20));
        r.read_exact(&mut byte).await.unwrap();
        assert_eq!((&byte, r.caught, r.missed), (b"w", 1, 1));
        let b = t.join().unwrap();

        // Quiet and hot, but another connection on the thread: no polling.
        quiet.set(true);
        let (other, _peer) = tokio::net::UnixStream::pair().unwrap();
        let other = Polled::new(other, None, Quiet::default(), POLL_MAX);
        let t = send_later(b, b"v", Duration::from_millis(20));
        r.read_exact(&mut byte).await.unwrap();
        assert_eq!((&byte, r.caught, r.missed), (b"v", 1, 1));
        drop(other);
        let mut b = tokio::net::UnixStream::from_std(t.join().unwrap()).unwrap();
        b.shutdown().await.unwrap();
    }

    /// A connection tells whether blocking its thread would hold anyone up:
    /// bytes queued on its socket (left there for the read) or buffered by
    /// its read half, another connection on the thread, or no socket to ask.
    #[tokio::test]
    async fn tells_whether_anyone_waits_on_the_thread() {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let r = Polled::new(a, Some(fd), Quiet::default(), Duration::ZERO);
        assert!(!r.others_wait(), "nothing sent, alone on the thread");
        b.write_all(b"x").await.unwrap();
        assert!(r.others_wait(), "a byte queued");
        let mut r = tokio::io::BufReader::new(r);
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x", "the peek left the byte for the read");
        assert!(!r.get_ref().others_wait());
        // A byte the read half has buffered counts as much as one queued.
        use crate::nbd::session::Reader;
        b.write_all(b"yz").await.unwrap();
        r.read_exact(&mut byte).await.unwrap();
        assert!(!r.get_ref().others_wait(), "the socket is drained");
        assert!(Reader::others_wait(&r), "but 'z' waits in the buffer");
        r.read_exact(&mut byte).await.unwrap();
        assert!(!Reader::others_wait(&r));

        let (other, _peer) = tokio::net::UnixStream::pair().unwrap();
        let other = Polled::new(other, None, Quiet::default(), POLL_MAX);
        assert!(
            r.get_ref().others_wait(),
            "another connection on the thread"
        );
        assert!(other.others_wait(), "no socket to ask");
        drop(other);
        b.shutdown().await.unwrap();
        assert!(
            r.get_ref().others_wait(),
            "the client's end of stream is to be read"
        );
    }
}
