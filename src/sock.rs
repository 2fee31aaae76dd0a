//! [`Sock`]: the proxy's TCP stream to the app.
//!
//! Two things set it apart from a bare `TcpStream`:
//!
//! - **One-buffer vectored writes go out with `send(2)`.** hyper writes through
//!   `poll_write_vectored`, and tokio turns that into `writev(2)`, which takes the file-system
//!   path (`fdget_pos`, `vfs_writev`, `sock_write_iter`) to reach the socket. Most writes of a
//!   proxied exchange are one buffer (a request head without body, a response head, one body
//!   chunk); `send(2)` reaches the socket directly. Two or more buffers of up to 4 KiB in all
//!   (a small response's head and body) are copied into one and sent the same way; larger
//!   ones go out in one `writev(2)`.
//! - **An answer the app sent before closing is read, not lost.** An app may answer a request
//!   before reading its body (a 413, a 401, a 501) and close the connection. With the body
//!   unread, its kernel resets the connection, and the proxy's next body write fails. hyper's
//!   client gives up on a failed write, even with the answer already read into its buffer or
//!   waiting in the socket, so the caller would get a 502 for a request the app did answer. A
//!   write that fails with a reset is reported done instead, and later writes are discarded
//!   until a read finds the connection's end: hyper goes on to read whatever the app sent. An
//!   app that sent nothing fails the exchange at that read, as it would have at the write; once
//!   the end has been read, writes fail as on any closed connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

/// The proxy's connection to the app.
pub struct Sock {
    stream: TcpStream,
    /// The app reset the connection: writes are discarded until the read side ends.
    discarding: bool,
    /// A read found the connection's end (or an error): nothing more will come from the app.
    read_ended: bool,
}

impl Sock {
    pub fn new(stream: TcpStream) -> Sock {
        Sock { stream, discarding: false, read_ended: false }
    }

    /// `written` as it is, unless it failed because the app reset the connection before the
    /// proxy read to the connection's end: then `len` (all of it), and discarding from now on.
    fn unless_answered(&mut self, written: Poll<io::Result<usize>>, len: usize) -> Poll<io::Result<usize>> {
        let Poll::Ready(Err(e)) = &written else { return written };
        if self.read_ended || !matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) {
            return written;
        }
        debug!(error = %e, "the app reset its connection; discarding the rest of the request to read what the app sent before");
        self.discarding = true;
        Poll::Ready(Ok(len))
    }
}

/// Buffers this small in all are copied into one and sent with `send(2)`: the copy costs less
/// than `writev(2)`'s detour. hyper writes a small response as its head and its body.
const GATHER_MAX: usize = 4096;

/// `bufs` with `send(2)` when only one of them is non-empty or all fit [`GATHER_MAX`], else
/// with `writev(2)`.
pub fn write_vectored<W: AsyncWrite + ?Sized>(
    stream: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
    match (nonempty.next(), nonempty.next()) {
        // `TcpStream::poll_write` is `send(2)` with `MSG_NOSIGNAL`, as is `Accepted`'s.
        (Some(one), None) => stream.poll_write(cx, one),
        (Some(_), Some(_)) if bufs.iter().map(|b| b.len()).sum::<usize>() <= GATHER_MAX => {
            let mut gathered = [0u8; GATHER_MAX];
            let mut len = 0;
            for b in bufs {
                gathered[len..len + b.len()].copy_from_slice(b);
                len += b.len();
            }
            // Bytes written count across `bufs` in order, as `writev(2)`'s do.
            stream.poll_write(cx, &gathered[..len])
        }
        _ => stream.poll_write_vectored(cx, bufs),
    }
}

impl AsyncRead for Sock {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let (filled, room) = (buf.filled().len(), buf.remaining() > 0);
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        // Read to the connection's end: a write from now on (a new request on what hyper may
        // take for a reusable connection) must fail as a write to a closed connection does.
        if matches!(&read, Poll::Ready(r) if r.is_err() || (room && buf.filled().len() == filled)) {
            self.read_ended = true;
            self.discarding = false;
        }
        read
    }
}

impl AsyncWrite for Sock {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.discarding {
            return Poll::Ready(Ok(buf.len()));
        }
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.unless_answered(written, buf.len())
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = || bufs.iter().map(|b| b.len()).sum();
        if self.discarding {
            return Poll::Ready(Ok(len()));
        }
        let written = write_vectored(Pin::new(&mut self.stream), cx, bufs);
        self.unless_answered(written, len())
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.discarding {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Empty buffers around one non-empty buffer, and several non-empty buffers, all arrive
    /// whole and in order, and the counts hyper relies on are exact.
    #[tokio::test]
    async fn vectored_writes_arrive_whole_whichever_syscall_carries_them() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sock = Sock::new(TcpStream::connect(l.local_addr().unwrap()).await.unwrap());
        let (mut peer, _) = l.accept().await.unwrap();
        let one = [io::IoSlice::new(b""), io::IoSlice::new(b"head"), io::IoSlice::new(b"")];
        assert_eq!(sock.write_vectored(&one).await.unwrap(), 4);
        let two = [io::IoSlice::new(b"ab"), io::IoSlice::new(b""), io::IoSlice::new(b"cd")];
        assert_eq!(sock.write_vectored(&two).await.unwrap(), 4);
        assert_eq!(sock.write_vectored(&[io::IoSlice::new(b"")]).await.unwrap(), 0);
        // Gathered into one `send(2)` at the bound, and not past it; partial writes resume
        // where the count says.
        let mut big = Vec::new();
        for extra in [0usize, 1] {
            let (a, b) = (vec![b'x'; GATHER_MAX - 10], vec![b'y'; 10 + extra]);
            let mut sent = 0;
            while sent < a.len() + b.len() {
                let rest = if sent < a.len() {
                    vec![io::IoSlice::new(&a[sent..]), io::IoSlice::new(&b)]
                } else {
                    vec![io::IoSlice::new(&b[sent - a.len()..])]
                };
                sent += sock.write_vectored(&rest).await.unwrap();
            }
            big.extend_from_slice(&a);
            big.extend_from_slice(&b);
        }
        sock.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [&b"headabcd"[..], &big].concat());
    }

    /// A connection whose peer sent `answer` and then reset it; returned once the reset has
    /// arrived.
    async fn reset_after(answer: &[u8]) -> Sock {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = Sock::new(TcpStream::connect(l.local_addr().unwrap()).await.unwrap());
        let (mut peer, _) = l.accept().await.unwrap();
        peer.write_all(answer).await.unwrap();
        peer.set_zero_linger().unwrap();
        drop(peer);
        sock.stream.ready(tokio::io::Interest::ERROR).await.unwrap();
        sock
    }

    /// Reads to the connection's end; a reset ends it too.
    async fn read_all(sock: &mut Sock) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = sock.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// The app answered and reset the connection: the writes of the rest of the request are
    /// reported done (so hyper goes on to read), the answer is read whole, and once it has been
    /// read to the end a write fails as on any closed connection.
    #[tokio::test]
    async fn writes_after_the_app_answered_and_reset_are_discarded_until_the_answer_is_read() {
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
        let mut sock = reset_after(answer).await;
        assert_eq!(sock.write(b"body").await.unwrap(), 4);
        let two = [io::IoSlice::new(b"more"), io::IoSlice::new(b"body")];
        assert_eq!(sock.write_vectored(&two).await.unwrap(), 8);
        sock.flush().await.unwrap();
        assert_eq!(read_all(&mut sock).await, answer);
        assert!(sock.write(b"next request").await.is_err());
    }

    /// A reset with nothing sent before it still fails the exchange: the read after the
    /// discarded write finds the end at once, and the next write fails.
    #[tokio::test]
    async fn a_reset_with_nothing_sent_ends_the_exchange_at_the_next_read() {
        let mut sock = reset_after(b"").await;
        assert_eq!(sock.write(b"body").await.unwrap(), 4);
        assert_eq!(read_all(&mut sock).await, b"");
        let error = sock.write(b"more").await.unwrap_err();
        assert!(matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{error}");
    }
}
