//! [`FreezingProxy`]: a TCP proxy that can stop forwarding without closing anything, which is
//! what a network partition looks like to both ends: their sockets stay open and silent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards every connection made to [`FreezingProxy::addr`] to an upstream address until
/// frozen. Frozen, it reads and writes nothing more on any connection, open or new, and
/// closes none: the peers see a partition, not a disconnection. Dropping it closes everything.
#[derive(Debug)]
pub struct FreezingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    frozen: AtomicBool,
    /// Freeze right after forwarding client bytes that hold this.
    trigger: Mutex<Option<Vec<u8>>>,
    /// Local ports of the connections to upstream (PostgreSQL's `client_port`).
    upstream_ports: Mutex<Vec<u16>>,
    stop: CancellationToken,
}

impl FreezingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_owned();
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                loop {
                    let accepted = tokio::select! {
                        () = shared.stop.cancelled() => return,
                        a = listener.accept() => a,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    tokio::spawn(connection(client, upstream.clone(), Arc::clone(&shared)));
                }
            }
        });
        Ok(Self { addr, shared })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding on every connection, now and for good.
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
    }

    /// Freezes (see [`FreezingProxy::freeze`]) right after forwarding to upstream the client
    /// bytes that contain `pattern`: upstream gets that request, its answer never arrives.
    pub fn freeze_after(&self, pattern: &[u8]) {
        *self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(pattern.to_vec());
    }

    /// Whether the proxy is frozen.
    pub fn is_frozen(&self) -> bool {
        self.shared.frozen.load(Ordering::SeqCst)
    }

    /// The local ports of every connection made to upstream so far (for PostgreSQL, the
    /// `client_port` of `pg_stat_activity`).
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.shared
            .upstream_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn connection(client: TcpStream, upstream: String, shared: Arc<Shared>) {
    if shared.frozen.load(Ordering::SeqCst) {
        // Nothing gets through a partition, a new connection neither.
        shared.stop.cancelled().await;
        drop(client);
        return;
    }
    let server = tokio::select! {
        () = shared.stop.cancelled() => return,
        s = TcpStream::connect(&upstream) => s,
    };
    let Ok(server) = server else { return };
    if let Ok(local) = server.local_addr() {
        shared
            .upstream_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(local.port());
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Each half ends only when the proxy is dropped (or its peer closes while not frozen).
    let up = pump(client_read, server_write, Arc::clone(&shared), true);
    let down = pump(server_read, client_write, Arc::clone(&shared), false);
    tokio::select! {
        () = shared.stop.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copies `from` to `to` until either closes or the proxy freezes; frozen, it keeps both open
/// and silent until the proxy is dropped. `to_upstream` marks the direction the freeze
/// pattern is looked for in.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    to_upstream: bool,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    // The end of the previous read, so that a pattern split over two reads is found.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let read = tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
            r = from.read(&mut buf) => r,
        };
        if shared.frozen.load(Ordering::SeqCst) {
            // Frozen while reading: what was read, or that the peer closed or reset, is not
            // passed on (a FIN reaching the other side would end the partition).
            break;
        }
        let n = read.context("reading")?;
        if n == 0 {
            return Ok(());
        }
        let chunk = &buf[..n];
        let trigger = to_upstream
            .then(|| {
                shared
                    .trigger
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .flatten();
        to.write_all(chunk).await.context("writing")?;
        if let Some(pattern) = trigger {
            tail.extend_from_slice(chunk);
            if tail.windows(pattern.len()).any(|w| w == pattern.as_slice()) {
                shared.frozen.store(true, Ordering::SeqCst);
                break;
            }
            let keep = pattern.len().saturating_sub(1).min(tail.len());
            tail.drain(..tail.len() - keep);
        }
    }
    // Frozen: hold both sockets, say nothing, until the proxy goes.
    shared.stop.cancelled().await;
    drop((from, to));
    Ok(())
}
