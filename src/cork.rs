//! Write coalescing for HTTP/2 client connections.
//!
//! h2 writes and flushes its socket once per DATA frame of 256 bytes or more (it keeps such a
//! payload out of its buffer and sends it with `writev` before it takes the next frame), so a
//! client with 320 streams answered at once costs 320 `writev` calls, each waking the client.
//! [`Corked`] keeps what h2 writes and answers a flush without a syscall, holding the bytes
//! until [`Releases::release`]:
//! - The binary's runtime calls it just before it parks (`on_thread_park`, see
//!   `app::runtime`), that is once every task that was ready has run and every app response
//!   that arrived in this busy period is in its connection's buffer. This is what an event loop
//!   that writes at the end of its iteration does (HAProxy): under load a client gets its
//!   streams' answers in one write and sends its next requests together, instead of settling
//!   into a write per one or two streams. An idle runtime parks at once, so a lone request
//!   waits for nothing.
//! - [`Releases::watchdog`] releases at most [`MAX_HOLD`] after the first hold, for a runtime
//!   that stays busy, or one without the hook (in-process tests, the demo).
//!
//! Nothing is left behind: a held flush always gets its task woken, h2 flushes at the end of
//! every poll of an open connection, a buffer over 64 KiB is written without waiting, and a
//! shutdown writes out what is pending before it closes the socket.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Up to this much is gathered before it is written without waiting for the flush.
const GATHER: usize = 64 * 1024;
/// A gather buffer larger than this is given back once written (idle connections are many).
const KEEP: usize = 16 * 1024;

/// How long a held flush waits for a runtime that stays busy, before the 1 ms rounding of
/// tokio's timer.
pub const MAX_HOLD: Duration = Duration::from_millis(1);

/// Flushes held until the runtime has nothing else to run.
///
/// Released just before the runtime parks (see the module documentation), or by the watchdog.
#[derive(Default)]
pub struct Releases {
    /// The tasks holding a flush.
    held: Mutex<Vec<Waker>>,
    /// Counts releases, changed only with `held` locked; a flush held at an older generation
    /// may write.
    generation: AtomicU64,
    /// Wakes the watchdog when the first flush of a period is held.
    first: Notify,
}

impl Releases {
    /// Wakes every task holding a flush. Cheap when none is.
    pub fn release(&self) {
        let wakers = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if held.is_empty() {
                return;
            }
            self.generation.fetch_add(1, Ordering::Release);
            std::mem::take(&mut *held)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Holds a flush: returns the generation to compare against later.
    pub(crate) fn hold(&self, waker: &Waker) -> u64 {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            self.first.notify_one();
        }
        held.push(waker.clone());
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn released_since(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) != generation
    }

    /// Releases held flushes at most [`MAX_HOLD`] after the first is held, when the runtime
    /// has not parked by then. Runs for the life of the process.
    pub async fn watchdog(self: Arc<Self>) {
        loop {
            self.first.notified().await;
            tokio::time::sleep(MAX_HOLD).await;
            self.release();
        }
    }
}

pub struct Corked<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    pos: usize,
    /// A flush is held until a release after this generation.
    held: Option<u64>,
    releases: Arc<Releases>,
}

impl<T> Corked<T> {
    pub fn new(inner: T, releases: Arc<Releases>) -> Self {
        Corked { inner, buf: Vec::new(), pos: 0, held: None, releases }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.pos = 0;
        self.buf.clear();
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        self.held = None;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.pending() + total > GATHER {
            // Too much to gather: what is pending goes first, then this goes straight out.
            ready!(this.poll_drain(cx))?;
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.buf.reserve(total);
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() == 0 {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        match this.held {
            None => {
                // Let every other ready task add to this write first.
                this.held = Some(this.releases.hold(cx.waker()));
                return Poll::Ready(Ok(()));
            }
            Some(g) if !this.releases.released_since(g) => return Poll::Ready(Ok(())),
            Some(_) => {}
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    /// Records each write call as one entry.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Calls {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct CountWake(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn shutdown_writes_what_is_pending_and_large_writes_keep_their_order() {
        let calls = Calls::default();
        let mut io = Corked::new(calls.clone(), Arc::default());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut p = Pin::new(&mut io);
        let _ = p.as_mut().poll_write(&mut cx, b"head;");
        let big = vec![7u8; GATHER];
        assert!(matches!(p.as_mut().poll_write(&mut cx, &big), Poll::Ready(Ok(n)) if n == GATHER));
        let _ = p.as_mut().poll_write(&mut cx, b"tail");
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(matches!(p.as_mut().poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        let written: Vec<u8> = calls.0.lock().unwrap().concat();
        assert_eq!(written.len(), 5 + GATHER + 4);
        assert!(written.starts_with(b"head;") && written.ends_with(b"tail"));
    }

    #[test]
    fn a_held_flush_writes_only_after_a_release_and_the_release_wakes_the_task() {
        let calls = Calls::default();
        let releases = Arc::new(Releases::default());
        let mut io = Corked::new(calls.clone(), releases.clone());
        let wakes = Arc::new(CountWake(0.into()));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut p = Pin::new(&mut io);
        let woken = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        let _ = p.as_mut().poll_write(&mut cx, b"stream 1;");
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        // Polled again before the runtime ran out of work (another stream's response): still held.
        let bufs = [IoSlice::new(b"stream 2"), IoSlice::new(b";")];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &bufs), Poll::Ready(Ok(9))));
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(calls.0.lock().unwrap().is_empty());
        assert_eq!(woken(), 0);
        releases.release();
        assert_eq!(woken(), 1);
        releases.release();
        assert_eq!(woken(), 1, "a connection is woken once per hold");
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(*calls.0.lock().unwrap(), vec![b"stream 1;stream 2;".to_vec()]);
        // The next round holds again.
        let _ = p.as_mut().poll_write(&mut cx, b"stream 3;");
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(calls.0.lock().unwrap().len(), 1);
        releases.release();
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(calls.0.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_releases_a_hold_within_max_hold_on_a_runtime_that_never_parks() {
        let releases = Arc::new(Releases::default());
        tokio::spawn(releases.clone().watchdog());
        tokio::task::yield_now().await;
        let wakes = Arc::new(CountWake(0.into()));
        let generation = releases.hold(&Waker::from(wakes.clone()));
        let start = tokio::time::Instant::now();
        // This runtime has no park hook: only the watchdog can release.
        while !releases.released_since(generation) {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        // Tokio's timer rounds a deadline up to its next 1 ms tick.
        assert!(start.elapsed() <= MAX_HOLD + Duration::from_micros(1100), "{:?}", start.elapsed());
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
