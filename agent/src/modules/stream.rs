//! Streamed GETs for the registry client (blobs and byte ranges of any size): the
//! request is sent, and its body received, counted, checked and handed over, on a
//! thread of its own with a single-threaded runtime ([`BlobReader`]), so the network
//! overlaps with whatever the caller does with the bytes.
//!
//! The stall timeout is ours, not reqwest's `read_timeout`: reqwest re-arms its read
//! timer when a chunk is delivered and checks it before looking for the next one, so a
//! consumer busy for longer than the timeout (hashing or unpacking a big file) finds
//! the body "timed out" with the data waiting in the socket. Here the timer runs only
//! while the read-ahead thread actually waits for the network: when the consumer is
//! busy the thread is parked on the full hand-over channel, nothing is awaited, and
//! TCP flow control holds the registry back. So a slow but moving link finishes, and
//! a registry that sends nothing for the stall timeout (before the response head or
//! mid-body) fails the read with `registry_unreachable`, naming the registry and the
//! blob.
//!
//! It must never hand over a byte past the limit it was given, nor an EOF before the
//! digest it was given checked out.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use powernode_proto::ErrorCode;
use sha2::{Digest as _, Sha256};

use super::error::{BlobDigestMismatch, CodedStreamError};

/// Read-ahead batch size and how many batches may wait: enough to keep the network
/// busy while a large file is hashed and written, little enough to stay small.
const READ_AHEAD_CHUNK: usize = 1 << 20;
const READ_AHEAD_CHUNKS: usize = 8;

/// Received bytes as they came (hyper's buffers, or a filled `Vec`), never copied on
/// the way to the reader.
type Chunk = Box<dyn AsRef<[u8]> + Send>;

/// What the body is checked against on the read-ahead thread.
#[derive(Debug, Clone)]
pub(super) enum Check {
    /// A whole blob: at most `size` bytes, hashing to `expected` (`sha256:HEX`).
    Digest { expected: String, size: u64 },
    /// A byte range: at most this many bytes, handed over unchecked (the caller
    /// checks them against the signed table of contents).
    Limit(u64),
}

/// A streamed GET: the request, the status that means "stream the body", and what
/// the messages name.
pub(super) struct StreamRequest {
    pub req: reqwest::RequestBuilder,
    pub want: u16,
    pub check: Check,
    pub count: Arc<AtomicU64>,
    pub stall: Duration,
    /// `HOST[:PORT]` of the registry.
    pub registry: String,
    /// What is fetched, e.g. `blob modules/x@sha256:...`.
    pub what: String,
}

/// The response head, as far as the registry client needs it.
#[derive(Debug, Clone, Default)]
pub(super) struct Head {
    pub status: u16,
    pub challenge: Option<String>,
    pub content_range: Option<String>,
}

/// What starting a streamed GET gave.
pub(super) enum Streamed {
    /// The wanted status: the body streams into the reader.
    Ok(BlobReader, Head),
    /// Another status (a bearer challenge, 404, a range not served...): no body.
    NotOk(Head),
    Unreachable(reqwest::Error),
    /// No response head within the stall timeout.
    Stalled,
}

/// A body read ahead by a thread (network, count, check), handed over in batches of
/// received buffers. EOF comes only after the check passed; a mismatch, a broken
/// connection or a stall arrives as an error with its code. Dropping the reader stops
/// the thread at its next batch and closes the connection.
pub struct BlobReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<Chunk>>>,
    batch: std::vec::IntoIter<Chunk>,
    chunk: Option<Chunk>,
    pos: usize,
    done: bool,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("pos", &self.pos)
            .field("done", &self.done)
            .finish()
    }
}

fn blob_mismatch(expected: &str, actual: String) -> io::Error {
    io::Error::other(BlobDigestMismatch {
        expected: expected.to_string(),
        actual,
    })
}

fn unreachable(message: String) -> io::Error {
    io::Error::other(CodedStreamError {
        code: ErrorCode::RegistryUnreachable,
        message,
    })
}

impl BlobReader {
    fn new(rx: std::sync::mpsc::Receiver<io::Result<Vec<Chunk>>>) -> Self {
        Self {
            rx,
            batch: Vec::new().into_iter(),
            chunk: None,
            pos: 0,
            done: false,
        }
    }

    /// Sends the request from a new thread with its own single-threaded runtime and,
    /// when the status is the wanted one, streams the body there: each buffer hyper
    /// receives is counted, checked and handed over as is (no copy, no hop through
    /// another runtime thread). The caller waits only for the response head.
    pub(super) fn stream(r: StreamRequest) -> Streamed {
        enum HeadMsg {
            Head(bool, Head),
            Unreachable(reqwest::Error),
            Stalled,
        }
        let (head_tx, head_rx) = std::sync::mpsc::sync_channel::<HeadMsg>(1);
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_CHUNKS);
        let StreamRequest {
            req,
            want,
            check,
            count,
            stall,
            registry,
            what,
        } = r;
        let spawned = std::thread::Builder::new()
            .name("blob-read-ahead".into())
            .spawn(move || {
                // Without a runtime the head channel just closes: the caller says so.
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let mut resp = match tokio::time::timeout(stall, req.send()).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            let _ = head_tx.send(HeadMsg::Unreachable(e));
                            return;
                        }
                        Err(_) => {
                            let _ = head_tx.send(HeadMsg::Stalled);
                            return;
                        }
                    };
                    let header = |name: &str| {
                        resp.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let head = Head {
                        status: resp.status().as_u16(),
                        challenge: header("www-authenticate"),
                        content_range: header("content-range"),
                    };
                    let ok = head.status == want;
                    if head_tx.send(HeadMsg::Head(ok, head)).is_err() || !ok {
                        return;
                    }
                    let (limit, mut hasher) = match &check {
                        Check::Digest { size, .. } => (*size, Some(Sha256::new())),
                        Check::Limit(n) => (*n, None),
                    };
                    let mut read = 0u64;
                    let mut batch: Vec<Chunk> = Vec::new();
                    let mut batched = 0;
                    loop {
                        // The stall timer runs only here, while the network is awaited.
                        let mut bytes = match tokio::time::timeout(stall, resp.chunk()).await {
                            Ok(Ok(Some(b))) => b,
                            Ok(Ok(None)) => break,
                            Ok(Err(e)) => {
                                let _ = tx.send(Err(unreachable(format!(
                                    "registry {registry}: {what} broke off after {read} bytes: {}",
                                    crate::error_chain(&e)
                                ))));
                                return;
                            }
                            Err(_) => {
                                let _ = tx.send(Err(unreachable(format!(
                                    "registry {registry} stalled: nothing received for {stall:?} \
                                     while receiving {what} ({read} of {limit} bytes in)"
                                ))));
                                return;
                            }
                        };
                        let n = bytes.len() as u64;
                        count.fetch_add(n, Ordering::Relaxed);
                        let last = read + n >= limit;
                        if read + n > limit {
                            match &check {
                                Check::Digest { expected, .. } => {
                                    let actual = format!("<more than {limit} bytes>");
                                    let _ = tx.send(Err(blob_mismatch(expected, actual)));
                                    return;
                                }
                                // A range is cut where it was asked to end.
                                Check::Limit(_) => bytes.truncate((limit - read) as usize),
                            }
                        }
                        read += bytes.len() as u64;
                        if let Some(h) = hasher.as_mut() {
                            h.update(&bytes);
                        }
                        batched += bytes.len();
                        batch.push(Box::new(bytes));
                        if batched >= READ_AHEAD_CHUNK {
                            batched = 0;
                            if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                                return;
                            }
                        }
                        if last && hasher.is_none() {
                            break;
                        }
                    }
                    if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                        return;
                    }
                    // An empty batch is EOF, sent once the digest checked out.
                    let _ = match (&check, hasher) {
                        (Check::Digest { expected, .. }, Some(h)) => {
                            let actual = hex::encode(h.finalize());
                            if expected.strip_prefix("sha256:") == Some(actual.as_str()) {
                                tx.send(Ok(Vec::new()))
                            } else {
                                tx.send(Err(blob_mismatch(expected, actual)))
                            }
                        }
                        _ => tx.send(Ok(Vec::new())),
                    };
                });
            });
        if spawned.is_err() {
            return Streamed::NotOk(Head::default());
        }
        match head_rx.recv() {
            Ok(HeadMsg::Head(true, head)) => Streamed::Ok(Self::new(rx), head),
            Ok(HeadMsg::Head(false, head)) => Streamed::NotOk(head),
            Ok(HeadMsg::Unreachable(e)) => Streamed::Unreachable(e),
            Ok(HeadMsg::Stalled) => Streamed::Stalled,
            Err(_) => Streamed::NotOk(Head::default()),
        }
    }

    /// The same over any verified reader (filled 1 MiB buffers): the hand-over alone,
    /// for tests.
    #[cfg(test)]
    pub(super) fn spawn<R: Read + Send + 'static>(mut inner: R) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_CHUNKS);
        std::thread::Builder::new()
            .name("blob-read-ahead".into())
            .spawn(move || loop {
                let mut chunk = vec![0u8; READ_AHEAD_CHUNK];
                let mut filled = 0;
                while filled < chunk.len() {
                    match inner.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                chunk.truncate(filled);
                // An empty batch is EOF, sent once the digest checked out.
                let batch: Vec<Chunk> = if filled == 0 {
                    Vec::new()
                } else {
                    vec![Box::new(chunk)]
                };
                if tx.send(Ok(batch)).is_err() || filled == 0 {
                    return;
                }
            })?;
        Ok(Self::new(rx))
    }

    /// The current buffer's unread bytes, receiving the next batch when it is used up;
    /// empty at EOF.
    fn current(&mut self) -> io::Result<&[u8]> {
        loop {
            let len = self.chunk.as_ref().map_or(0, |c| (**c).as_ref().len());
            if self.pos < len {
                break;
            }
            if let Some(next) = self.batch.next() {
                self.chunk = Some(next);
                self.pos = 0;
                continue;
            }
            self.chunk = None;
            self.pos = 0;
            if self.done {
                return Ok(&[]);
            }
            match self.rx.recv() {
                Ok(Ok(batch)) if batch.is_empty() => self.done = true,
                Ok(Ok(batch)) => self.batch = batch.into_iter(),
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(unreachable("blob read-ahead thread ended early".into()));
                }
            }
        }
        Ok(self
            .chunk
            .as_ref()
            .map_or(&[][..], |c| &(**c).as_ref()[self.pos..]))
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let src = self.current()?;
        let n = buf.len().min(src.len());
        buf[..n].copy_from_slice(&src[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl io::BufRead for BlobReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.current()
    }
    fn consume(&mut self, amt: usize) {
        self.pos += amt;
    }
}
