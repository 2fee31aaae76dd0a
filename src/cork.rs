//! Write coalescing for HTTP/2 client connections.
//!
//! h2 writes and flushes its socket once per DATA frame of 256 bytes or more (it keeps such a
//! payload out of its buffer and sends it with `writev` before it takes the next frame), so a
//! client with 320 streams answered at once costs 320 `writev` calls, each waking the client.
//! [`Corked`] keeps what h2 writes and answers the first flush of a round without a syscall,
//! rescheduling its task; by the task's next poll every other ready task (the streams whose
//! responses arrived in the same batch) has run, and h2's closing flush of that poll writes
//! all of it at once. The delay is one turn of the scheduler's run queue, never a timer.
//!
//! Nothing is left behind: the connection task is always woken after a deferred flush, h2
//! flushes at the end of every poll of an open connection, and a shutdown writes out what is
//! pending before it closes the socket.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Up to this much is gathered before it is written without waiting for the flush.
const GATHER: usize = 64 * 1024;
/// A gather buffer larger than this is given back once written (idle connections are many).
const KEEP: usize = 16 * 1024;

pub struct Corked<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    pos: usize,
    /// The last flush was acknowledged without writing; the next one writes.
    deferred: bool,
}

impl<T> Corked<T> {
    pub fn new(inner: T) -> Self {
        Corked { inner, buf: Vec::new(), pos: 0, deferred: false }
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
        self.deferred = false;
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
        if !this.deferred {
            // Let the other ready tasks add to this write first; come back right after them.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
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
    fn writes_of_one_round_leave_in_one_call_and_the_task_is_woken_to_send_them() {
        let calls = Calls::default();
        let mut io = Corked::new(calls.clone());
        let wakes = Arc::new(CountWake(0.into()));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut p = Pin::new(&mut io);
        assert!(matches!(p.as_mut().poll_write(&mut cx, b"frame 1;"), Poll::Ready(Ok(8))));
        // The first flush is deferred, with a wake so that the task comes back.
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(calls.0.lock().unwrap().is_empty());
        let bufs = [IoSlice::new(b"frame 2"), IoSlice::new(b";")];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &bufs), Poll::Ready(Ok(8))));
        // The next flush writes both in one call.
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(*calls.0.lock().unwrap(), vec![b"frame 1;frame 2;".to_vec()]);
    }

    #[test]
    fn shutdown_writes_what_is_pending_and_large_writes_keep_their_order() {
        let calls = Calls::default();
        let mut io = Corked::new(calls.clone());
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
}
