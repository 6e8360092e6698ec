//! [`LossyProxy`]: a loopback TCP relay between a node and the server that loses
//! exactly one answer, the way a reset or a timeout loses it: the request reaches
//! the server and is processed, the answer never reaches the node.
//!
//! The bytes are TLS and stay opaque: the relay only follows the record framing of
//! the client's side to know when its handshake is over. On the first connection,
//! once the client sends its first `application_data` record (TLS 1.3: its
//! `Finished`, then the request; TLS 1.2: the request), the server has nothing left
//! that the client needs for the handshake, so everything the server sends from then
//! on (session tickets, then the answer) is swallowed; when more than
//! [`ANSWER_BYTES`] have come (an enrollment answer carries two PEM certificates,
//! tickets are a few dozen bytes each) or the server closes, the client's connection
//! is closed. Later connections are relayed untouched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Swallowed bytes after which the answer counts as sent (and lost).
pub const ANSWER_BYTES: usize = 1024;

const APPLICATION_DATA: u8 = 23;

/// A relay on 127.0.0.1 that drops the answer of its first connection; ends its
/// tasks (and closes every socket) when dropped.
#[derive(Debug)]
pub struct LossyProxy {
    pub addr: SocketAddr,
    dropped: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl LossyProxy {
    /// Relays to `upstream` (`host:port`).
    pub fn drop_first_answer(upstream: &str) -> Result<Self> {
        let upstream: SocketAddr = upstream
            .parse()
            .with_context(|| format!("upstream address {upstream}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("proxy runtime")?;
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("proxy bind")?;
        let addr = listener.local_addr()?;
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        runtime.spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let lossy = std::mem::take(&mut first);
                let counter = counter.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream, lossy, &counter).await;
                });
            }
        });
        Ok(Self {
            addr,
            dropped,
            runtime: Some(runtime),
        })
    }

    /// `https://127.0.0.1:PORT`, for an identity document's `control_plane_url`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// How many answers were swallowed (0 or 1).
    pub fn answers_dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    lossy: bool,
    dropped: &AtomicUsize,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    if !lossy {
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        return Ok(());
    }
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let asked = AtomicBool::new(false);
    let up = async {
        let mut records = RecordTypes::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            // Set before the bytes leave: whatever the server sends because of them
            // is read after this.
            if records.feed(&buf[..n]).contains(&APPLICATION_DATA) {
                asked.store(true, Ordering::SeqCst);
            }
            server_tx.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut swallowed = 0;
        loop {
            let n = server_rx.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if asked.load(Ordering::SeqCst) {
                swallowed += n;
                if swallowed > ANSWER_BYTES {
                    break;
                }
            } else {
                client_tx.write_all(&buf[..n]).await?;
            }
        }
        if asked.load(Ordering::SeqCst) {
            dropped.fetch_add(1, Ordering::SeqCst);
        }
        Ok::<_, std::io::Error>(())
    };
    // Whichever ends first ends both: dropping the halves closes both sockets.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Follows TLS record framing (5-byte header: type, version, length) in one
/// direction.
#[derive(Debug, Default)]
struct RecordTypes {
    header: [u8; 5],
    have: usize,
    skip: usize,
}

impl RecordTypes {
    /// The content types of the records whose header completes in `bytes`.
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<u8> {
        let mut types = Vec::new();
        while !bytes.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(bytes.len());
                self.skip -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
            self.have += k;
            bytes = &bytes[k..];
            if self.have == 5 {
                types.push(self.header[0]);
                self.skip = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.have = 0;
            }
        }
        types
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_types_follow_the_framing_across_reads() {
        let mut r = RecordTypes::default();
        // A 3-byte handshake record, then the header of a 2-byte application record
        // split across reads, then its body.
        assert_eq!(r.feed(&[22, 3, 3, 0, 3, 1, 2]), vec![22]);
        assert_eq!(r.feed(&[3, 23, 3]), Vec::<u8>::new());
        assert_eq!(r.feed(&[3, 0, 2, 9]), vec![23]);
        assert_eq!(r.feed(&[9, 20, 3, 3, 0, 1, 1]), vec![20]);
    }
}
