//! The leanest relay on drainproxy's own runtime: the bench's second floor.
//!
//! One app connection per client connection, bytes copied both ways as they come, no HTTP
//! parsing: the same current-thread tokio runtime and socket options as drainproxy, and one
//! buffer per direction for the connection's life. Whatever it costs per request is the
//! kernel's TCP path, the scheduler and tokio's event loop; an HTTP proxy adds its HTTP work on
//! top. The bench runs it beside HAProxy in `mode tcp`, so the floor is not one program's
//! artifact.
//!
//! `cargo run --release --example relay -- LISTEN APP [WORK_NS]`, e.g. `127.0.0.1:18320
//! 127.0.0.1:18080`. With `WORK_NS`, each read is followed by that many nanoseconds of busy
//! work before it is forwarded (two per request), standing in for an HTTP proxy's parsing and
//! rewriting: `bench/proxy/work_sweep.py` measures what such work costs on the shared core.
//! Loopback only in the bench; it stops when killed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// One read's worth: a 1 KiB answer with its head, or a 16 KiB request in two reads at most.
const BUF: usize = 16 * 1024;

/// Busy for `work`: CPU spent as HTTP work would spend it. Without work, not even a clock
/// read: the bare relay is the bench's floor.
fn busy(work: Duration) {
    if work.is_zero() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}

/// Copies one direction until either side ends; the buffer is allocated once per direction.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, work: Duration) {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        busy(work);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // The peer sees the end as it happened (a client that closes after its last request).
    let _ = to.shutdown().await;
}

async fn relay(client: TcpStream, app: SocketAddr, work: Duration) {
    let Ok(upstream) = TcpStream::connect(app).await else { return };
    // Both sides without Nagle, as every proxy in the bench runs them.
    if client.set_nodelay(true).is_err() || upstream.set_nodelay(true).is_err() {
        return;
    }
    let (client_read, client_write) = client.into_split();
    let (app_read, app_write) = upstream.into_split();
    tokio::spawn(pump(client_read, app_write, work));
    pump(app_read, client_write, work).await;
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, app, work) = match args.as_slice() {
        [listen, app] => (listen, app, "0"),
        [listen, app, work] => (listen, app, work.as_str()),
        _ => bail!("usage: relay LISTEN APP [WORK_NS] (e.g. 127.0.0.1:18320 127.0.0.1:18080 700)"),
    };
    let work = Duration::from_nanos(work.parse().with_context(|| format!("bad WORK_NS {work}: nanoseconds"))?);
    let listen: SocketAddr = listen.parse().with_context(|| format!("bad listen address {listen}"))?;
    let app: SocketAddr = app.parse().with_context(|| format!("bad app address {app}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot bind {listen}"))?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(relay(client, app, work));
        }
    })
}
