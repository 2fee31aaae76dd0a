//! [`Accepted`]: a client socket that joins the runtime's epoll set only once it must wait.
//!
//! tokio adds every socket it wraps to its epoll set (`epoll_ctl(ADD)`) and takes it out again
//! before closing it (`epoll_ctl(DEL)`): two system calls per connection, about 5% of the
//! proxy's CPU when every request comes on a connection of its own. Yet such a connection
//! seldom waits on its client: the request arrives with the connection (a client writes it
//! right after connecting), and the answer fits the socket's send buffer. So an accepted
//! socket is read and written with plain non-blocking calls, and handed to tokio at the first
//! call that would block (`EWOULDBLOCK`), or when a caller asks to wait for it (parking, the
//! TLS handshake). A connection that never had to wait closes without either `epoll_ctl`.
//!
//! Nothing is lost at the hand-over: epoll reports a socket that became readable before it
//! was added (the kernel checks the socket's state when adding it), so bytes that arrive
//! between the call that found none and the hand-over still wake the task.

use std::io::{self, Read as _, Write as _};
use std::mem;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The most one read takes while the socket is not tokio's: a large body's buffer is not
/// zeroed whole for each read of it.
const FIRST_READS_MAX: usize = 64 * 1024;

/// A listening socket whose connections are accepted as [`Accepted`] sockets.
pub struct Listener(AsyncFd<mio::net::TcpListener>);

impl Listener {
    /// Takes over a bound listener (one `epoll_ctl` pair, once).
    pub fn new(listener: TcpListener) -> io::Result<Listener> {
        let listener = mio::net::TcpListener::from_std(listener.into_std()?);
        // Deprecated because a type could report a descriptor it does not own; a listener owns
        // its own for as long as it is registered. (The replacement is `unsafe`, which this
        // crate forbids.)
        #[allow(deprecated)]
        let watched = AsyncFd::with_interest(listener, Interest::READABLE)?;
        Ok(Listener(watched))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// The next connection, with its peer: non-blocking and close-on-exec (mio's
    /// `accept4(2)` sets both in the one call), and outside the epoll set.
    pub async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            // `try_io` forgets the readiness when the call would block, and the loop waits again.
            if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
                return accepted.map(|(s, peer)| (Accepted::Unwatched(s.into()), peer));
            }
        }
    }
}

/// An accepted client socket: outside the epoll set until a call would block, then tokio's.
pub enum Accepted {
    Unwatched(std::net::TcpStream),
    Watched(TcpStream),
    /// Handing it over failed (the runtime could not add it): the socket is closed.
    Gone,
}

impl Accepted {
    /// The socket as tokio's, added to the epoll set if it is not yet.
    pub fn watched(&mut self) -> io::Result<&mut TcpStream> {
        if let Accepted::Unwatched(_) = self {
            let Accepted::Unwatched(s) = mem::replace(self, Accepted::Gone) else { unreachable!() };
            *self = Accepted::Watched(TcpStream::from_std(s)?);
        }
        match self {
            Accepted::Watched(s) => Ok(s),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Tokio's socket, for code that needs one (the TLS handshake).
    pub fn into_watched(mut self) -> io::Result<TcpStream> {
        self.watched()?;
        let Accepted::Watched(s) = self else { unreachable!("`watched` leaves the socket tokio's or fails") };
        Ok(s)
    }

    /// Waits until there are bytes to read (or the connection's end).
    pub async fn readable(&mut self) -> io::Result<()> {
        self.watched()?.readable().await
    }

    /// `call` on the socket while it is outside the epoll set; `None` when the socket is
    /// tokio's, which it becomes here when `call` would block: the caller then polls it there.
    fn unwatched<T>(&mut self, mut call: impl FnMut(&std::net::TcpStream) -> io::Result<T>) -> Option<io::Result<T>> {
        let Accepted::Unwatched(s) = self else { return None };
        loop {
            match call(s) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                done => return Some(done),
            }
        }
        self.watched().err().map(Err)
    }
}

impl AsyncRead for Accepted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // A plain read wants its buffer initialized: zeroed, and only while the socket is not
        // tokio's (a connection's first request), up to what one read of a socket can bring.
        let most = buf.remaining().min(FIRST_READS_MAX);
        if let Some(read) = me.unwatched(|mut s| s.read(buf.initialize_unfilled_to(most))) {
            return Poll::Ready(read.map(|n| buf.advance(n)));
        }
        Pin::new(me.watched()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    /// `send(2)` with `MSG_NOSIGNAL`, as tokio's.
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(written) = me.unwatched(|mut s| s.write(buf)) {
            return Poll::Ready(written);
        }
        Pin::new(me.watched()?).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(written) = me.unwatched(|mut s| s.write_vectored(bufs)) {
            return Poll::Ready(written);
        }
        Pin::new(me.watched()?).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(done) = me.unwatched(|s| s.shutdown(std::net::Shutdown::Write)) {
            return Poll::Ready(done);
        }
        Pin::new(me.watched()?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request that came with its connection is read and answered with plain calls; the
    /// socket joins the epoll set at the first read that finds nothing, and bytes that come
    /// after that still wake the reader.
    #[tokio::test]
    async fn a_socket_joins_the_epoll_set_only_when_a_call_would_block() {
        let l = Listener::new(crate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        // On loopback the bytes are in the accepted socket's queue once the write returns.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut a, peer) = l.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let mut buf = [0u8; 64];
        let n = a.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        a.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        assert!(matches!(a, Accepted::Unwatched(_)), "nothing had to wait");

        // Nothing to read now: the read would block, and the socket becomes tokio's.
        let mut rb = ReadBuf::new(&mut buf);
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_read(cx, &mut rb))).await;
        assert!(first.is_pending());
        assert!(matches!(a, Accepted::Watched(_)));
        client.write_all(b"next").await.unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), a.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"next");

        let mut answer = [0u8; 38];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    }

    /// Closing a connection that never waited sends its end as any close does.
    #[tokio::test]
    async fn a_connection_that_never_waited_ends_as_any_other() {
        let l = Listener::new(crate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut a, _) = l.accept().await.unwrap();
        a.write_all(b"bye").await.unwrap();
        a.shutdown().await.unwrap();
        assert!(matches!(a, Accepted::Unwatched(_)));
        drop(a);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }
}
