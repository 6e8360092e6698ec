//! Module format shared by the publisher (server) and the node agent: fs-verity
//! digests, the in-memory file tree, OCI layer unpacking into a content-addressed object
//! store, the composefs EROFS image (byte-identical on both sides), the publisher's
//! entry point that builds a module (image + reproducible tar layer) from a folder, and
//! the layer table of contents ([`toc`]) that lets a node fetch only the files it lacks.
//! Every error maps to a wire code ([`error::ModuleErrorCode`]); the errors a puller's
//! stream carries live in [`error`] too, below the store and the unpacker.
//!
//! It must never touch the network or mount anything: pulling lives in the agent's
//! `modules` (registry client, signatures) and mounting in `modules::mount`. It must
//! never use an object or path it has not verified: objects are re-hashed against their
//! names (or kernel-verified with fs-verity), archive paths that escape are refused.

pub mod composefs;
pub mod error;
pub mod publish;
pub mod signed_payload;
pub mod store;
mod tar;
#[doc(hidden)]
pub mod testutil;
pub mod toc;
pub mod tree;
pub mod unpack;
pub mod verity;

use powernode_proto::ErrorCode;

use crate::error::ModuleErrorCode;
use crate::verity::VerityDigest;

/// What [`install_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallReport {
    pub image: VerityDigest,
    /// The image was already in the store: no layer was read.
    pub already_present: bool,
    pub layers: unpack::LayerStats,
    /// Time spent applying layers (opening, fetching and unpacking them all).
    pub unpack_time: std::time::Duration,
    /// Time spent building, checking and recording the image (the final flush included).
    pub commit_time: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The puller could not open layer `index` (404, registry down...): its own code.
    #[error("fetching layer {index}")]
    Fetch {
        index: usize,
        #[source]
        source: error::CodedStreamError,
    },
    #[error("unpacking layer {index}")]
    Unpack {
        index: usize,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("recording the module image")]
    Store(#[from] store::StoreError),
    /// The caller's last check before the image is recorded failed (e.g. the
    /// signature, checked while the layers streamed).
    #[error("refused before the image was recorded")]
    Refused(#[source] error::CodedStreamError),
}

impl ModuleErrorCode for InstallError {
    fn code(&self) -> ErrorCode {
        match self {
            InstallError::Fetch { source, .. } => source.code,
            InstallError::Unpack { source, .. } => source.code(),
            InstallError::Store(e) => e.code(),
            InstallError::Refused(source) => source.code,
        }
    }
}

/// The node's whole install step for one module: unless the signed image `expected`
/// is already in the store, open each layer (`open_layer(i)` gives its media type and
/// a verified stream, e.g. a [`unpack::DigestingReader`] over the registry response;
/// bottom first), apply it, and record the rebuilt image, refusing it unless its
/// fs-verity digest is `expected`. Layers are only opened when needed, so an unchanged
/// module fetches nothing.
pub fn install_image<R, F>(
    store: &store::ObjectStore,
    expected: &VerityDigest,
    layer_count: usize,
    mut open_layer: F,
) -> Result<InstallReport, InstallError>
where
    R: std::io::Read,
    F: FnMut(usize) -> Result<(String, R), error::CodedStreamError>,
{
    install_image_with(store, expected, layer_count, |i| {
        open_layer(i).map(|(media_type, reader)| LayerInput::Stream {
            media_type,
            reader: std::io::BufReader::with_capacity(1 << 20, reader),
        })
    })
}

/// How a puller hands over one layer.
#[derive(Debug)]
pub enum LayerInput<R> {
    /// The whole blob as a verified stream of this media type.
    Stream { media_type: String, reader: R },
    /// The layer's signed TOC; the puller already stored the objects the store lacked
    /// (`fetched`), so the tree comes from the TOC alone.
    Toc {
        toc: toc::Toc,
        /// Where the TOC starts in the blob (content ranges lie before it).
        data_end: u64,
        fetched: std::collections::HashSet<VerityDigest>,
    },
}

/// [`install_image`] for pullers that can also hand over a layer as its TOC, and
/// whose streams have buffers of their own (file contents go from them to the store
/// uncopied).
pub fn install_image_with<R, F>(
    store: &store::ObjectStore,
    expected: &VerityDigest,
    layer_count: usize,
    open_layer: F,
) -> Result<InstallReport, InstallError>
where
    R: std::io::BufRead,
    F: FnMut(usize) -> Result<LayerInput<R>, error::CodedStreamError>,
{
    install_image_gated(store, expected, layer_count, open_layer, || Ok(()))
}

/// [`install_image_with`], with `gate` run once every layer is applied (or the image
/// found already stored) and before anything is recorded or reported: a puller that
/// checks the signature while the layers stream joins that check here. Objects
/// written before a failing gate stay unreferenced (gc collects them); the image is
/// not recorded.
pub fn install_image_gated<R, F, G>(
    store: &store::ObjectStore,
    expected: &VerityDigest,
    layer_count: usize,
    mut open_layer: F,
    gate: G,
) -> Result<InstallReport, InstallError>
where
    R: std::io::BufRead,
    F: FnMut(usize) -> Result<LayerInput<R>, error::CodedStreamError>,
    G: FnOnce() -> Result<(), error::CodedStreamError>,
{
    let mut report = InstallReport {
        image: *expected,
        already_present: true,
        layers: unpack::LayerStats::default(),
        unpack_time: std::time::Duration::ZERO,
        commit_time: std::time::Duration::ZERO,
    };
    if store.has_image(expected) {
        gate().map_err(InstallError::Refused)?;
        return Ok(report);
    }
    report.already_present = false;
    let started = std::time::Instant::now();
    let writeback = EarlyWriteback::start(store);
    let mut unpacker = unpack::Unpacker::new(store);
    for index in 0..layer_count {
        let input = open_layer(index).map_err(|source| InstallError::Fetch { index, source })?;
        let s = match input {
            LayerInput::Stream { media_type, reader } => {
                unpacker.apply_layer_buffered(&media_type, reader)
            }
            LayerInput::Toc {
                toc,
                data_end,
                fetched,
            } => unpacker.apply_toc(&toc, data_end, &fetched),
        }
        .map_err(|source| InstallError::Unpack { index, source })?;
        report.layers.entries += s.entries;
        report.layers.files += s.files;
        report.layers.new_objects += s.new_objects;
        report.layers.new_bytes += s.new_bytes;
        report.layers.deduplicated_objects += s.deduplicated_objects;
    }
    drop(writeback);
    report.unpack_time = started.elapsed();
    gate().map_err(InstallError::Refused)?;
    let started = std::time::Instant::now();
    store.commit_image_checked(unpacker.tree(), Some(expected))?;
    report.commit_time = started.elapsed();
    Ok(report)
}

/// While layers unpack on a disk store, a thread starts the writeback of each large
/// object as soon as it is placed (`POSIX_FADV_DONTNEED` on Linux writes dirty pages
/// back without waiting; they are not dropped while dirty) and flushes the filesystem
/// every 200 ms when small objects were placed. So the disk writes objects while later
/// ones are still being fetched and hashed, and the one `syncfs` before the image is
/// recorded finds little left to do; durability still rests on that final `syncfs`.
/// The thread waits on the disk, not the unpacker. On tmpfs there is no thread. Pulling
/// the 200 MiB bench module into a store on ext4 here, the image step (whose `syncfs`
/// waits for the tail) took 1-4 ms on a quiet disk, vs 12-16 ms with a blind `syncfs`
/// every 200 ms.
struct EarlyWriteback<'s> {
    store: &'s store::ObjectStore,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<'s> EarlyWriteback<'s> {
    const PERIOD: std::time::Duration = std::time::Duration::from_millis(200);
    /// Kicks (open objects) that may wait for the thread.
    const BACKLOG: usize = 64;

    fn start(store: &'s store::ObjectStore) -> Self {
        let mut me = Self {
            store,
            thread: None,
        };
        if store.on_tmpfs() {
            return me;
        }
        // Without a handle on the directory (or a thread) there is just no early flush.
        let Ok(dir) = std::fs::File::open(store.root()) else {
            return me;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<store::Kick>(Self::BACKLOG);
        let thread = std::thread::Builder::new()
            .name("store-writeback".into())
            .spawn(move || {
                let mut small = false;
                let mut last = std::time::Instant::now();
                loop {
                    let wait = Self::PERIOD.saturating_sub(last.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(store::Kick::Object(f)) => {
                            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
                        }
                        Ok(store::Kick::Small) => small = true,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if last.elapsed() >= Self::PERIOD {
                        if std::mem::take(&mut small) {
                            let _ = rustix::fs::syncfs(&dir);
                        }
                        last = std::time::Instant::now();
                    }
                }
            });
        if let Ok(t) = thread {
            store.set_writeback(Some(tx));
            me.thread = Some(t);
        }
        me
    }
}

impl Drop for EarlyWriteback<'_> {
    fn drop(&mut self) {
        // Dropping the sender ends the thread after what it was already given.
        self.store.set_writeback(None);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("composefs image digest {actual} does not match the signed {expected}")]
pub struct ImageDigestMismatch {
    pub expected: VerityDigest,
    pub actual: VerityDigest,
}

impl ModuleErrorCode for ImageDigestMismatch {
    fn code(&self) -> ErrorCode {
        ErrorCode::VerityMismatch
    }
}

/// The image we rebuilt must be the one the publisher signed.
pub fn check_image_digest(
    expected: &VerityDigest,
    actual: &VerityDigest,
) -> Result<(), ImageDigestMismatch> {
    if expected == actual {
        Ok(())
    } else {
        Err(ImageDigestMismatch {
            expected: *expected,
            actual: *actual,
        })
    }
}
