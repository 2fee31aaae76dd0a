//! [`Sock`]: a TCP stream whose one-buffer vectored writes go out with `send(2)`.
//!
//! hyper writes through `poll_write_vectored`, and tokio turns that into `writev(2)`, which
//! takes the file-system path (`fdget_pos`, `vfs_writev`, `sock_write_iter`) to reach the
//! socket. Most writes of a proxied exchange are one buffer (a request head without body, a
//! response head, one body chunk); `send(2)` reaches the socket directly. Two or more
//! buffers still go out in one `writev(2)`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The proxy's connection to the app.
pub struct Sock(pub TcpStream);

/// `bufs` with `send(2)` when only one of them is non-empty, else with `writev(2)`.
pub fn write_vectored(
    stream: Pin<&mut TcpStream>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
    match (nonempty.next(), nonempty.next()) {
        // `TcpStream::poll_write` is `send(2)` with `MSG_NOSIGNAL`.
        (Some(one), None) => stream.poll_write(cx, one),
        _ => stream.poll_write_vectored(cx, bufs),
    }
}

impl AsyncRead for Sock {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Sock {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        write_vectored(Pin::new(&mut self.0), cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        let mut sock = Sock(TcpStream::connect(l.local_addr().unwrap()).await.unwrap());
        let (mut peer, _) = l.accept().await.unwrap();
        let one = [io::IoSlice::new(b""), io::IoSlice::new(b"head"), io::IoSlice::new(b"")];
        assert_eq!(sock.write_vectored(&one).await.unwrap(), 4);
        let two = [io::IoSlice::new(b"ab"), io::IoSlice::new(b""), io::IoSlice::new(b"cd")];
        assert_eq!(sock.write_vectored(&two).await.unwrap(), 4);
        assert_eq!(sock.write_vectored(&[io::IoSlice::new(b"")]).await.unwrap(), 0);
        sock.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"headabcd");
    }
}
