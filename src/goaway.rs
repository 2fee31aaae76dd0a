//! A graceful HTTP/2 GOAWAY that leaves clients the time to see it (DESIGN §4.2).
//!
//! hyper (through h2) shuts an HTTP/2 connection down in two phases: a GOAWAY with the largest
//! stream id and a PING, then, once the client acknowledges that PING, a GOAWAY with the last
//! stream it took. One round trip is the least RFC 9113 §6.8 allows, and a client can lose the
//! race: a stream it queued before it read the first GOAWAY may leave after the
//! acknowledgement (an HTTP/2 library may send control frames such as PING acknowledgements
//! ahead of new streams). Such a stream arrives after the final GOAWAY and is refused
//! (`REFUSED_STREAM`): safe to retry, but an error for every client that does not.
//!
//! [`GraceRead`] holds the client's PING acknowledgements that arrive within [`GOAWAY_GRACE`]
//! of the first GOAWAY and hands them to h2 when the grace ends: the final GOAWAY comes that
//! much later, and the streams opened meanwhile are served. It finds them by following the
//! frame boundaries of what the client sends (a 9-byte header and a length per frame): no copy
//! and no allocation on the way through; a frame is taken out only during a grace.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long after the first GOAWAY a client may still open streams that are served.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// The client connection preface (`PRI * HTTP/2.0…`) before the first frame.
const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// When the graceful shutdown of one connection began; set by whoever asks hyper for it.
#[derive(Debug, Default)]
pub struct Grace(OnceLock<Instant>);

impl Grace {
    /// Call just before asking hyper for the graceful shutdown. Later calls change nothing.
    pub fn start(&self) {
        let _ = self.0.set(Instant::now() + GOAWAY_GRACE);
    }

    fn until(&self) -> Option<Instant> {
        self.0.get().copied()
    }
}

/// Where the reader is in the client's frame stream.
#[derive(Debug)]
struct Frames {
    /// Bytes of the connection preface still to come.
    preface: usize,
    /// The next frame's header, as much of it as has arrived.
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload: usize,
    /// The current frame is being held.
    holding: bool,
}

impl Frames {
    fn new() -> Self {
        Frames { preface: PREFACE_LEN, header: [0; HEADER_LEN], header_len: 0, payload: 0, holding: false }
    }

    /// Between two frames: held bytes can go in here.
    fn at_boundary(&self) -> bool {
        self.preface == 0 && self.header_len == 0 && self.payload == 0
    }

    /// Follows `data`, just read, through the frame stream. With `hold`, every PING
    /// acknowledgement whose header lies whole in `data` moves to `held` (its payload too,
    /// whenever it arrives); the other bytes close up to the front. Returns how many remain.
    fn process(&mut self, data: &mut [u8], hold: bool, held: &mut Vec<u8>) -> usize {
        let (mut r, mut w) = (0, 0);
        while r < data.len() {
            let left = data.len() - r;
            if self.preface > 0 {
                let k = self.preface.min(left);
                pass(data, &mut r, &mut w, k);
                self.preface -= k;
            } else if self.payload > 0 {
                let k = self.payload.min(left);
                if self.holding {
                    held.extend_from_slice(&data[r..r + k]);
                    r += k;
                } else {
                    pass(data, &mut r, &mut w, k);
                }
                self.payload -= k;
                self.holding &= self.payload > 0;
            } else {
                let whole_here = self.header_len == 0 && left >= HEADER_LEN;
                let k = (HEADER_LEN - self.header_len).min(left);
                self.header[self.header_len..self.header_len + k].copy_from_slice(&data[r..r + k]);
                self.header_len += k;
                if self.header_len < HEADER_LEN {
                    // Split across reads: it has begun to go through, so it is never held.
                    pass(data, &mut r, &mut w, k);
                    continue;
                }
                self.header_len = 0;
                let h = self.header;
                self.payload = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                if hold && whole_here && h[3] == PING && h[4] & ACK != 0 {
                    held.extend_from_slice(&data[r..r + k]);
                    r += k;
                    self.holding = self.payload > 0;
                } else {
                    pass(data, &mut r, &mut w, k);
                }
            }
        }
        w
    }
}

/// Keeps `k` bytes at `r` by moving them to `w` (no move while nothing was taken out).
fn pass(data: &mut [u8], r: &mut usize, w: &mut usize, k: usize) {
    if *r != *w {
        data.copy_within(*r..*r + k, *w);
    }
    *r += k;
    *w += k;
}

/// The read side of an HTTP/2 client connection, holding PING acknowledgements during a
/// [`Grace`] (see the module documentation). Writes pass through.
pub struct GraceRead<T> {
    inner: T,
    grace: Arc<Grace>,
    frames: Frames,
    held: Vec<u8>,
    /// Fires when the grace ends and the held bytes are due.
    due: Option<Pin<Box<Sleep>>>,
}

impl<T> GraceRead<T> {
    /// `inner` starts with the client connection preface.
    pub fn new(inner: T, grace: Arc<Grace>) -> Self {
        GraceRead { inner, grace, frames: Frames::new(), held: Vec::new(), due: None }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GraceRead<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.held.is_empty() && this.frames.at_boundary() {
            // Registers the wake-up for when they are due, if they are not yet.
            let due = this.due.as_mut().is_none_or(|d| d.as_mut().poll(cx).is_ready());
            if due {
                let k = this.held.len().min(buf.remaining());
                buf.put_slice(&this.held[..k]);
                this.held.drain(..k);
                if this.held.is_empty() {
                    this.due = None;
                }
                return Poll::Ready(Ok(()));
            }
        }
        loop {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Ok(())); // the end of the stream
            }
            let until = this.grace.until();
            let hold = until.is_some_and(|t| Instant::now() < t);
            let kept = this.frames.process(&mut buf.filled_mut()[before..], hold, &mut this.held);
            buf.set_filled(before + kept);
            if let (Some(t), None, false) = (until, &this.due, this.held.is_empty()) {
                let mut due = Box::pin(tokio::time::sleep_until(t.into()));
                // Polled once so that the task is woken when the grace ends.
                if due.as_mut().poll(cx).is_pending() {
                    this.due = Some(due);
                }
            }
            if kept > 0 {
                return Poll::Ready(Ok(()));
            }
            // Everything read was held: read on (returning no bytes would mean the end).
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GraceRead<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A preface, a DATA frame, a PING acknowledgement, a HEADERS frame and a client PING.
    fn stream() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let ack = frame(PING, ACK, 0, b"12345678");
        let mut rest = frame(0x0, 0, 1, b"some data");
        let mut all = vec![b'P'; PREFACE_LEN];
        all.extend_from_slice(&rest);
        all.extend_from_slice(&ack);
        let tail = [frame(0x1, 0x5, 3, b"hpack"), frame(PING, 0, 0, b"abcdefgh")].concat();
        all.extend_from_slice(&tail);
        rest.extend_from_slice(&tail);
        (all, ack, rest)
    }

    /// Feeds `all` in pieces of `step` bytes; returns (what went through, what was held).
    fn feed(all: &[u8], step: usize, hold: bool) -> (Vec<u8>, Vec<u8>) {
        let mut frames = Frames::new();
        let (mut out, mut held) = (Vec::new(), Vec::new());
        for chunk in all.chunks(step) {
            let mut data = chunk.to_vec();
            let kept = frames.process(&mut data, hold, &mut held);
            out.extend_from_slice(&data[..kept]);
        }
        assert!(frames.at_boundary());
        (out, held)
    }

    #[test]
    fn only_a_ping_acknowledgement_is_held_however_the_reads_split_the_stream() {
        let (all, ack, rest) = stream();
        let preface = &all[..PREFACE_LEN];
        for step in [all.len(), 1, 2, 5, 9, 10, 17, 23] {
            let (out, held) = feed(&all, step, true);
            let whole_header = {
                // The acknowledgement's header starts at this offset; it is held only when it
                // arrives whole in one read.
                let at = PREFACE_LEN + 9 + 9;
                at / step == (at + HEADER_LEN - 1) / step
            };
            if whole_header {
                assert_eq!(held, ack, "step {step}");
                assert_eq!(out, [preface, &rest].concat(), "step {step}");
            } else {
                assert!(held.is_empty(), "step {step}");
                assert_eq!(out, all, "step {step}");
            }
        }
    }

    #[test]
    fn nothing_is_held_outside_a_grace() {
        let (all, _, _) = stream();
        for step in [all.len(), 1, 7] {
            assert_eq!(feed(&all, step, false), (all.clone(), Vec::new()));
        }
    }

    /// Through the reader: the acknowledgement is taken out during the grace and comes back,
    /// at a frame boundary, once the grace is over.
    #[tokio::test(start_paused = true)]
    async fn a_held_acknowledgement_comes_back_when_the_grace_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (all, ack, rest) = stream();
        let (mut client, server) = tokio::io::duplex(4096);
        let grace = Arc::new(Grace::default());
        grace.start();
        let mut reader = GraceRead::new(server, grace);
        client.write_all(&all).await.unwrap();
        let mut got = vec![0u8; all.len() - ack.len()];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[PREFACE_LEN..], &rest[..]);
        let started = tokio::time::Instant::now();
        let mut back = vec![0u8; ack.len()];
        reader.read_exact(&mut back).await.unwrap();
        assert_eq!(back, ack);
        assert!(started.elapsed() >= GOAWAY_GRACE - Duration::from_millis(10), "{:?}", started.elapsed());
    }
}
