//! The content-addressed object store: one directory, shared by every module and
//! version, holding regular-file contents and composefs images named by their
//! fs-verity digest in the composefs layout `objects/XX/REST` (the objects directory
//! is what overlayfs mounts as the data-only lower layer).
//!
//! ```text
//! ROOT/objects/ab/cdef...   object (mode 0444; fs-verity enabled where supported)
//! ROOT/images/HEX           object digests the image HEX references, one per line
//! ROOT/tmp/                 objects being written (removed by gc)
//! ```
//!
//! Objects are only renamed into place once their digest is known, so a name always
//! matches its content when it was written. Where the filesystem has fs-verity the
//! kernel computes that digest itself (enabling fs-verity builds the Merkle tree; the
//! measured digest names the object: one pass over the data, not a userspace hash
//! and then the kernel's) and enforces it on every read afterwards; where it has not
//! (tmpfs), objects are hashed in userspace while they are written and
//! [`ObjectStore::verify`] re-hashes before use, except objects this handle itself wrote
//! or already re-hashed (see [`Hashed`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use powernode_proto::ErrorCode;

use crate::composefs::{self, ImageError};
use crate::error::{stream_error_code, ModuleErrorCode};
use crate::tree::FsTree;
use crate::verity::{self, Threads, VerityDigest, VerityError, VerityHasher};

/// How objects are protected after they are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerityMode {
    /// fs-verity is enabled on every object; the kernel checks every read and overlayfs
    /// can mount with `verity=require`.
    Kernel,
    /// No fs-verity here: objects are re-hashed in userspace before use.
    Userspace,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: i/o")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the object stream")]
    Stream(#[source] io::Error),
    #[error("object digest {actual} does not match the expected {expected}")]
    VerityMismatch {
        expected: VerityDigest,
        actual: VerityDigest,
    },
    #[error("object {0} is not in the store")]
    Missing(VerityDigest),
    #[error("image {0} is not in the store")]
    ImageMissing(VerityDigest),
    #[error("{path}: malformed image reference list")]
    BadRefs { path: PathBuf },
    #[error("fs-verity on {path}")]
    Verity {
        path: PathBuf,
        #[source]
        source: VerityError,
    },
    #[error("building the composefs image")]
    Image(#[from] ImageError),
}

impl ModuleErrorCode for StoreError {
    fn code(&self) -> ErrorCode {
        match self {
            StoreError::VerityMismatch { .. } => ErrorCode::VerityMismatch,
            // A stream error is the puller's (digest check, network): it wraps its own
            // code; without one, the blob did not decode.
            StoreError::Stream(e) => stream_error_code(e),
            StoreError::Image(_) => ErrorCode::UnsupportedMediaType,
            StoreError::Missing(_) | StoreError::ImageMissing(_) => ErrorCode::NotFound,
            _ => ErrorCode::Internal,
        }
    }
}

/// What [`ObjectStore::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub digest: VerityDigest,
    pub size: u64,
    /// False when an object with this digest was already there (deduplicated).
    pub new: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    pub kept_objects: u64,
    pub removed_objects: u64,
    pub removed_bytes: u64,
    pub removed_images: u64,
}

/// What this handle wrote since it was opened (a boot reports them: a second boot
/// with unchanged modules adds nothing).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// New objects placed (deduplicated ones not counted) and their bytes.
    pub objects_added: u64,
    pub bytes_added: u64,
    /// Objects in the store fs-verity was enabled on, and the time all enable ioctls
    /// took (the kernel reads the whole file to build its Merkle tree; the time also
    /// covers written files that named an object already there, whose digest only
    /// the kernel computed).
    pub verity_enabled: u64,
    pub verity_enable_ns: u64,
    /// Userspace mode: objects [`ObjectStore::verify`] re-hashed, and their bytes.
    pub objects_rehashed: u64,
    pub bytes_rehashed: u64,
    /// Userspace mode: checks answered without a re-hash, because this handle wrote
    /// or re-hashed that very file before.
    pub rehash_skipped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    objects_added: AtomicU64,
    bytes_added: AtomicU64,
    verity_enabled: AtomicU64,
    verity_enable_ns: AtomicU64,
    objects_rehashed: AtomicU64,
    bytes_rehashed: AtomicU64,
    rehash_skipped: AtomicU64,
}

/// The file an object's digest was computed from by this handle: hashed as it was
/// written (and then renamed into place), or re-hashed by [`ObjectStore::verify`].
///
/// Why a userspace check may trust it without reading it again: the digest came from
/// bytes this process hashed itself, the store directory belongs to PID 1 (root, mode
/// 0700; objects are 0444), and this record lives only in this process's memory, so
/// nothing written by an earlier boot or by another process is ever in it. Changing
/// the file since would take root, which could as well change this process. As a
/// cheap guard against accidents, the file must still be the same inode with the
/// same size and change time (a write or chmod moves the change time); anything else
/// is re-hashed. Kernel mode keeps no record: the kernel checks every read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hashed {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Hashed {
    fn of(m: &fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug)]
pub struct ObjectStore {
    root: PathBuf,
    objects: PathBuf,
    images: PathBuf,
    tmp: PathBuf,
    mode: VerityMode,
    counters: Counters,
    /// Userspace mode: objects whose digest this handle computed from the file in
    /// place (see [`Hashed`]); never filled from disk.
    hashed: std::sync::Mutex<HashMap<VerityDigest, Hashed>>,
    /// While an install runs on a disk store: where placed objects go to have their
    /// writeback started early (see [`Writeback`]).
    writeback: std::sync::Mutex<Option<std::sync::mpsc::SyncSender<Kick>>>,
}

/// The digest of an object being written, as far as it is known.
enum PendingDigest {
    Hasher(VerityHasher),
    /// Kernel mode: only the size is counted; the kernel hashes once written.
    Kernel {
        size: u64,
    },
}

impl PendingDigest {
    fn update(&mut self, data: &[u8]) {
        match self {
            PendingDigest::Hasher(h) => h.update(data),
            PendingDigest::Kernel { size } => *size += data.len() as u64,
        }
    }
}

/// What an insert tells the early-writeback thread.
#[derive(Debug)]
pub(crate) enum Kick {
    /// A large object just placed: start writing it back now.
    Object(File),
    /// Small objects were placed: the next periodic flush has something to do.
    Small,
}

/// Objects at least this large get their own early writeback; smaller ones are left
/// to a periodic flush (one call per tiny file would cost more than it saves).
const KICK_MIN: u64 = 128 << 10;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static COPY_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
const COPY_BUF: usize = 1 << 20;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ObjectStore {
    /// Opens (creating) the store at `root` and probes whether its filesystem supports
    /// fs-verity.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let mut store = Self::open_with_mode(root, VerityMode::Userspace)?;
        store.mode = store.probe_verity()?;
        Ok(store)
    }

    /// Opens with a fixed mode (tests; or to force userspace checks).
    pub fn open_with_mode(root: &Path, mode: VerityMode) -> Result<Self, StoreError> {
        let objects = root.join("objects");
        let images = root.join("images");
        let tmp = root.join("tmp");
        for d in [&objects, &images, &tmp] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            objects,
            images,
            tmp,
            mode,
            counters: Counters::default(),
            hashed: std::sync::Mutex::new(HashMap::new()),
            writeback: std::sync::Mutex::new(None),
        })
    }

    fn probe_verity(&self) -> Result<VerityMode, StoreError> {
        let (path, mut f) = self.temp_file()?;
        let r = f.write_all(b"probe").map_err(io_err(&path));
        drop(f);
        let mode = r.and_then(|()| {
            let f = File::open(&path).map_err(io_err(&path))?;
            Ok(match verity::enable(&f) {
                Ok(()) => VerityMode::Kernel,
                Err(_) => VerityMode::Userspace,
            })
        });
        let _ = fs::remove_file(&path);
        mode
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes the store's filesystem can still take (`statvfs`), if it says.
    pub fn available_bytes(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.root).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    pub fn verity_mode(&self) -> VerityMode {
        self.mode
    }

    /// What this handle has written so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        StoreStats {
            objects_added: c.objects_added.load(Ordering::Relaxed),
            bytes_added: c.bytes_added.load(Ordering::Relaxed),
            verity_enabled: c.verity_enabled.load(Ordering::Relaxed),
            verity_enable_ns: c.verity_enable_ns.load(Ordering::Relaxed),
            objects_rehashed: c.objects_rehashed.load(Ordering::Relaxed),
            bytes_rehashed: c.bytes_rehashed.load(Ordering::Relaxed),
            rehash_skipped: c.rehash_skipped.load(Ordering::Relaxed),
        }
    }

    /// Userspace mode: records that `file`, now in place as `d`, was hashed by us.
    fn remember_hashed(&self, d: &VerityDigest, file: &File) {
        if self.mode != VerityMode::Userspace {
            return;
        }
        // Without its metadata the object is simply re-hashed when checked.
        if let (Ok(m), Ok(mut map)) = (file.metadata(), self.hashed.lock()) {
            map.insert(*d, Hashed::of(&m));
        }
    }

    fn forget_hashed(&self, d: &VerityDigest) {
        if let Ok(mut map) = self.hashed.lock() {
            map.remove(d);
        }
    }

    /// True when the file at `path` is still the one this handle hashed as `d`.
    fn hashed_here(&self, d: &VerityDigest, path: &Path) -> bool {
        let Some(seen) = self.hashed.lock().ok().and_then(|m| m.get(d).copied()) else {
            return false;
        };
        fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && Hashed::of(&m) == seen)
    }

    /// Enables fs-verity on `f`, counting the time (objects are counted where they
    /// are placed: a written file can turn out to name one already there).
    fn enable_verity(&self, f: &File, path: &Path) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        verity::enable(f).map_err(|source| StoreError::Verity {
            path: path.to_path_buf(),
            source,
        })?;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters
            .verity_enable_ns
            .fetch_add(ns, Ordering::Relaxed);
        Ok(())
    }

    /// The directory overlayfs mounts as the data-only lower layer.
    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    pub fn object_path(&self, d: &VerityDigest) -> PathBuf {
        let hex = d.to_hex();
        self.objects.join(&hex[..2]).join(&hex[2..])
    }

    pub fn contains(&self, d: &VerityDigest) -> bool {
        self.object_path(d).is_file()
    }

    fn temp_file(&self) -> Result<(PathBuf, File), StoreError> {
        loop {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = self.tmp.join(format!("in-{}-{n}", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => return Ok((path, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }

    /// Streams `reader` into the store, hashing while writing. With `expected`, a
    /// different digest is refused (`verity_mismatch`) and nothing is stored.
    pub fn insert<R: Read>(
        &self,
        mut reader: R,
        expected: Option<&VerityDigest>,
    ) -> Result<Inserted, StoreError> {
        let (tmp_path, mut file) = self.temp_file()?;
        let written = COPY_BUFFER.with_borrow_mut(|buf| {
            // One buffer per thread: a module has thousands of small files, and a
            // fresh zeroed MiB for each would cost more than hashing them.
            buf.resize(COPY_BUF, 0);
            let mut hasher = self.pending_digest();
            loop {
                // Whole buffers: large writes, and leaf hashing that can split over
                // threads (a stream hands over what it has, often less).
                let mut n = 0;
                while n < buf.len() {
                    match reader.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(StoreError::Stream(e)),
                    }
                }
                if n == 0 {
                    return Ok(hasher);
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_err(&tmp_path))?;
                if n < buf.len() {
                    return Ok(hasher);
                }
            }
        });
        self.place(tmp_path, file, written, expected)
    }

    /// [`insert`](Self::insert) from a reader's own buffers: each slice it hands over
    /// is hashed and written where it lies, never copied in userspace.
    pub fn insert_buffered(
        &self,
        reader: &mut dyn io::BufRead,
        expected: Option<&VerityDigest>,
    ) -> Result<Inserted, StoreError> {
        let (tmp_path, mut file) = self.temp_file()?;
        let mut hasher = self.pending_digest();
        let written = loop {
            let buf = match reader.fill_buf() {
                Ok([]) => break Ok(hasher),
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(StoreError::Stream(e)),
            };
            let n = buf.len();
            hasher.update(buf);
            if let Err(e) = file.write_all(buf) {
                break Err(io_err(&tmp_path)(e));
            }
            reader.consume(n);
        };
        self.place(tmp_path, file, written, expected)
    }

    /// Names a written temp file by its digest: moves it into place (or drops it when
    /// the object is already there), or removes it on any failure.
    fn place(
        &self,
        tmp_path: PathBuf,
        file: File,
        written: Result<PendingDigest, StoreError>,
        expected: Option<&VerityDigest>,
    ) -> Result<Inserted, StoreError> {
        // Kernel mode: fs-verity is enabled on the temp file now and the kernel's
        // measure names it. On any failure the file is closed (dropped with the
        // closure) and the temp file removed.
        let tmp = &tmp_path;
        let named = written.and_then(move |pending| {
            let (file, digest, size) = match pending {
                PendingDigest::Hasher(hasher) => {
                    let size = hasher.data_size();
                    (file, hasher.finalize(), size)
                }
                PendingDigest::Kernel { size } => {
                    let ro = self.seal(file, tmp)?;
                    let digest = verity::measure(&ro).map_err(|source| StoreError::Verity {
                        path: tmp.clone(),
                        source,
                    })?;
                    (ro, digest, size)
                }
            };
            if let Some(exp) = expected {
                if *exp != digest {
                    return Err(StoreError::VerityMismatch {
                        expected: *exp,
                        actual: digest,
                    });
                }
            }
            Ok((file, digest, size))
        });
        let (file, digest, size) = match named {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        let final_path = self.object_path(&digest);
        // An existing object of the right size is reused. A short one can only be a
        // write torn by a crash (objects are not fsynced one by one): replace it.
        if fs::metadata(&final_path).is_ok_and(|m| m.is_file() && m.len() == size) {
            drop(file);
            let _ = fs::remove_file(&tmp_path);
            return Ok(Inserted {
                digest,
                size,
                new: false,
            });
        }
        let placed = (|| {
            // No fsync per object (thousands per module): `commit_image` syncs the
            // filesystem once before it records an image, and objects are checked
            // against their names before use.
            if self.mode != VerityMode::Kernel {
                file.set_permissions(fs::Permissions::from_mode(0o444))
                    .map_err(io_err(&tmp_path))?;
            }
            let parent = final_path.parent().unwrap_or(&self.objects);
            fs::create_dir_all(parent).map_err(io_err(parent))?;
            fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
            Ok(file)
        })();
        match placed {
            Ok(file) => {
                // After the rename, which moves the inode's change time too.
                self.remember_hashed(&digest, &file);
                self.kick(file, size)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        }
        self.counters.objects_added.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_added.fetch_add(size, Ordering::Relaxed);
        if self.mode == VerityMode::Kernel {
            self.counters.verity_enabled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Inserted {
            digest,
            size,
            new: true,
        })
    }

    /// How an insert learns its digest: the kernel's measure after fs-verity is
    /// enabled, or a userspace hash while the bytes go by.
    fn pending_digest(&self) -> PendingDigest {
        match self.mode {
            VerityMode::Kernel => PendingDigest::Kernel { size: 0 },
            VerityMode::Userspace => {
                PendingDigest::Hasher(VerityHasher::with_threads(Threads::Auto))
            }
        }
    }

    /// Makes a written temp file read-only and enables fs-verity on it; returns it
    /// reopened read-only (fs-verity refuses a file still open for writing).
    fn seal(&self, file: File, tmp_path: &Path) -> Result<File, StoreError> {
        file.set_permissions(fs::Permissions::from_mode(0o444))
            .map_err(io_err(tmp_path))?;
        drop(file);
        let ro = File::open(tmp_path).map_err(io_err(tmp_path))?;
        self.enable_verity(&ro, tmp_path)?;
        Ok(ro)
    }

    /// Hands a placed object to the early-writeback thread, if one runs.
    fn kick(&self, file: File, size: u64) {
        let Ok(guard) = self.writeback.lock() else {
            return;
        };
        if let Some(tx) = guard.as_ref() {
            // Never waits: when the thread lags (a slow disk), the kick is dropped
            // and the final flush covers that object; open files never pile up.
            let _ = tx.try_send(if size >= KICK_MIN {
                Kick::Object(file)
            } else {
                Kick::Small
            });
        }
    }

    /// Installs (or with `None` removes) the early-writeback channel.
    pub(crate) fn set_writeback(&self, tx: Option<std::sync::mpsc::SyncSender<Kick>>) {
        if let Ok(mut guard) = self.writeback.lock() {
            *guard = tx;
        }
    }

    /// True when the store lives on tmpfs: nothing to write back, ever.
    pub(crate) fn on_tmpfs(&self) -> bool {
        const TMPFS_MAGIC: u64 = 0x0102_1994;
        File::open(&self.root)
            .ok()
            .and_then(|d| rustix::fs::fstatfs(&d).ok())
            .is_some_and(|s| s.f_type as u64 == TMPFS_MAGIC)
    }

    pub fn insert_bytes(&self, data: &[u8]) -> Result<Inserted, StoreError> {
        self.insert(data, None)
    }

    /// Checks that the object's content still matches its name: the kernel's measure
    /// where fs-verity is on, a userspace re-hash otherwise, unless this handle hashed
    /// that very file already (written from bytes it hashed, or re-hashed before; see
    /// [`Hashed`]). Objects from an earlier boot or another process are always
    /// re-hashed.
    pub fn verify(&self, d: &VerityDigest) -> Result<(), StoreError> {
        let path = self.object_path(d);
        if self.mode == VerityMode::Userspace && self.hashed_here(d, &path) {
            self.counters.rehash_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing(*d)),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let verity_err = |source| StoreError::Verity {
            path: path.clone(),
            source,
        };
        let actual = match self.mode {
            VerityMode::Kernel => match verity::measure(&f) {
                // Written before this filesystem had verity (or by an older agent):
                // enable it now; the kernel then computes the digest from the content.
                Err(VerityError::NotEnabled) => {
                    self.enable_verity(&f, &path)?;
                    self.counters.verity_enabled.fetch_add(1, Ordering::Relaxed);
                    verity::measure(&f).map_err(verity_err)?
                }
                r => r.map_err(verity_err)?,
            },
            VerityMode::Userspace => {
                // Taken before the read: a change while hashing moves the change time.
                let before = f.metadata().map_err(io_err(&path))?;
                let actual = verity::digest_reader(&f, Threads::Auto).map_err(io_err(&path))?;
                self.counters
                    .objects_rehashed
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_rehashed
                    .fetch_add(before.len(), Ordering::Relaxed);
                if actual == *d {
                    if let Ok(mut map) = self.hashed.lock() {
                        map.insert(*d, Hashed::of(&before));
                    }
                }
                actual
            }
        };
        if actual != *d {
            self.forget_hashed(d);
            // Out of the way, so the next pull fetches it again; gc removes it.
            let _ = fs::rename(&path, self.tmp.join(format!("corrupt-{}", d.to_hex())));
            return Err(StoreError::VerityMismatch {
                expected: *d,
                actual,
            });
        }
        Ok(())
    }

    /// Verifies an image and every object it references (userspace mode: before a
    /// mount; kernel mode: cheap measures, the kernel checks reads anyway).
    pub fn verify_image(&self, image: &VerityDigest) -> Result<(), StoreError> {
        self.verify(image)?;
        for d in self.image_objects(image)? {
            self.verify(&d)?;
        }
        Ok(())
    }

    /// Reads the image and every object it references in full and moves each one
    /// whose content does not match its name out of the store: with kernel
    /// fs-verity the read itself fails (`EIO`); in userspace mode the re-hash
    /// differs. If any object went, the image's reference list goes too, so
    /// [`has_image`](Self::has_image) is false and the next pull installs the image
    /// again, fetching only what is missing. Returns the objects moved away.
    ///
    /// For after a read of the mounted root failed: unlike [`verify`](Self::verify)
    /// in kernel mode (a measure, which never reads the data), this finds a corrupt
    /// block.
    pub fn scrub_image(&self, image: &VerityDigest) -> Result<Vec<VerityDigest>, StoreError> {
        let mut objects = self.image_objects(image)?;
        objects.push(*image);
        let mut bad = Vec::new();
        for d in objects {
            let path = self.object_path(&d);
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let intact = match verity::digest_reader(f, Threads::Auto) {
                Ok(actual) => actual == d,
                // fs-verity refused a block (EIO), or the object went bad another way.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => false,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if !intact {
                self.forget_hashed(&d);
                let away = self.tmp.join(format!("corrupt-{}", d.to_hex()));
                fs::rename(&path, &away).map_err(io_err(&path))?;
                bad.push(d);
            }
        }
        if !bad.is_empty() {
            let refs = self.refs_path(image);
            match fs::remove_file(&refs) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&refs)(e)),
            }
            self.sync()?;
        }
        Ok(bad)
    }

    fn refs_path(&self, image: &VerityDigest) -> PathBuf {
        self.images.join(image.to_hex())
    }

    /// Builds the composefs image of `tree`, stores it as an object and records which
    /// objects it references (for gc). Returns the image's fs-verity digest.
    pub fn commit_image(&self, tree: &FsTree) -> Result<VerityDigest, StoreError> {
        self.commit_image_checked(tree, None)
    }

    /// As [`commit_image`](Self::commit_image), but with `expected` (the signed digest)
    /// a different image is refused before anything is recorded (`verity_mismatch`).
    pub fn commit_image_checked(
        &self,
        tree: &FsTree,
        expected: Option<&VerityDigest>,
    ) -> Result<VerityDigest, StoreError> {
        let objects = tree.objects();
        for d in &objects {
            if !self.contains(d) {
                return Err(StoreError::Missing(*d));
            }
        }
        let image = composefs::build_image(tree)?;
        let ins = self.insert(&image[..], expected)?;
        let mut list = String::with_capacity(objects.len() * 65);
        for d in &objects {
            list.push_str(&d.to_hex());
            list.push('\n');
        }
        let (tmp_path, mut f) = self.temp_file()?;
        // One flush for everything: every object, the image and the list's bytes are
        // on disk before the list gets its name (the record). The rename reaches the
        // disk with the next journal commit; a crash before it only forgets the
        // record, and the next pull finds the objects in place.
        let written = f
            .write_all(list.as_bytes())
            .map_err(io_err(&tmp_path))
            .and_then(|()| self.sync());
        drop(f);
        let refs = self.refs_path(&ins.digest);
        if let Err(e) = written.and_then(|()| fs::rename(&tmp_path, &refs).map_err(io_err(&refs))) {
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }
        Ok(ins.digest)
    }

    /// Flushes the store's filesystem (one `syncfs` instead of one fsync per object).
    pub fn sync(&self) -> Result<(), StoreError> {
        let dir = File::open(&self.root).map_err(io_err(&self.root))?;
        rustix::fs::syncfs(&dir).map_err(|e| io_err(&self.root)(e.into()))
    }

    pub fn has_image(&self, image: &VerityDigest) -> bool {
        self.refs_path(image).is_file() && self.contains(image)
    }

    /// The image file (an object) to mount.
    pub fn image_path(&self, image: &VerityDigest) -> PathBuf {
        self.object_path(image)
    }

    pub fn image_objects(&self, image: &VerityDigest) -> Result<Vec<VerityDigest>, StoreError> {
        let path = self.refs_path(image);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::ImageMissing(*image))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        text.lines()
            .map(|l| {
                l.parse()
                    .map_err(|_| StoreError::BadRefs { path: path.clone() })
            })
            .collect()
    }

    /// Removes every object that no live image references (and the images that are not
    /// live, and leftover temp files). Refuses to run when a live image's reference list
    /// is missing: it cannot tell what that image needs.
    ///
    /// `live_images` must name every image that is mounted or about to be, and no
    /// insert may run at the same time (its temp file would be collected): the
    /// reconciler calls this between pulls.
    pub fn gc(&self, live_images: &[VerityDigest]) -> Result<GcStats, StoreError> {
        let mut keep = BTreeSet::new();
        for image in live_images {
            keep.insert(*image);
            keep.extend(self.image_objects(image)?);
        }
        let live: BTreeSet<String> = live_images.iter().map(|d| d.to_hex()).collect();
        let mut stats = GcStats::default();
        for e in fs::read_dir(&self.images).map_err(io_err(&self.images))? {
            let e = e.map_err(io_err(&self.images))?;
            if !live.contains(&*e.file_name().to_string_lossy()) {
                fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                stats.removed_images += 1;
            }
        }
        for e in fs::read_dir(&self.tmp).map_err(io_err(&self.tmp))? {
            let e = e.map_err(io_err(&self.tmp))?;
            let _ = fs::remove_file(e.path());
        }
        for sub in fs::read_dir(&self.objects).map_err(io_err(&self.objects))? {
            let sub = sub.map_err(io_err(&self.objects))?;
            let prefix = sub.file_name().to_string_lossy().into_owned();
            let dir = sub.path();
            for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let e = e.map_err(io_err(&dir))?;
                let name = format!("{prefix}{}", e.file_name().to_string_lossy());
                let keep_it = name
                    .parse::<VerityDigest>()
                    .is_ok_and(|d| keep.contains(&d));
                if keep_it {
                    stats.kept_objects += 1;
                    continue;
                }
                let path = e.path();
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if let Ok(d) = name.parse::<VerityDigest>() {
                    self.forget_hashed(&d);
                }
                fs::remove_file(&path).map_err(io_err(&path))?;
                stats.removed_objects += 1;
                stats.removed_bytes += len;
            }
            // Empty fan-out directories go too; a non-empty one simply stays.
            let _ = fs::remove_dir(&dir);
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_new_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        assert_eq!(store.stats(), StoreStats::default());
        let a = store.insert_bytes(b"hello world").unwrap();
        assert!(a.new);
        let again = store.insert_bytes(b"hello world").unwrap();
        assert!(!again.new);
        store.insert_bytes(&[7u8; 10_000]).unwrap();
        let s = store.stats();
        assert_eq!(s.objects_added, 2);
        assert_eq!(s.bytes_added, 10_011);
        // Userspace mode never calls the ioctl.
        assert_eq!((s.verity_enabled, s.verity_enable_ns), (0, 0));
        // A fresh handle on the same store starts from zero: stats are per boot.
        let reopened = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        assert_eq!(reopened.stats().objects_added, 0);
        assert!(reopened.contains(&a.digest));
    }

    #[test]
    fn an_object_this_handle_wrote_is_not_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let data = crate::testutil::pseudo_random(300_000, 7);
        let ins = store.insert_bytes(&data).unwrap();
        store.verify(&ins.digest).unwrap();
        store.verify(&ins.digest).unwrap();
        let s = store.stats();
        assert_eq!((s.objects_rehashed, s.bytes_rehashed), (0, 0));
        assert_eq!(s.rehash_skipped, 2);
        // Deduplicated into the same file: still the one it hashed.
        assert!(!store.insert_bytes(&data).unwrap().new);
        store.verify(&ins.digest).unwrap();
        assert_eq!(store.stats().objects_rehashed, 0);
    }

    #[test]
    fn an_object_present_before_open_is_re_hashed_once() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let data = crate::testutil::pseudo_random(300_000, 8);
        let d = earlier.insert_bytes(&data).unwrap().digest;
        drop(earlier);
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        // Inserting the same content finds it there and writes nothing: not ours.
        assert!(!store.insert_bytes(&data).unwrap().new);
        store.verify(&d).unwrap();
        let s = store.stats();
        assert_eq!((s.objects_rehashed, s.bytes_rehashed), (1, 300_000));
        assert_eq!(s.rehash_skipped, 0);
        // Once re-hashed by this handle, that file is known good.
        store.verify(&d).unwrap();
        assert_eq!(store.stats().objects_rehashed, 1);
        assert_eq!(store.stats().rehash_skipped, 1);
    }

    #[test]
    fn a_tampered_object_from_before_open_still_fails() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let data = crate::testutil::pseudo_random(100_000, 9);
        let d = earlier.insert_bytes(&data).unwrap().digest;
        // The earlier handle checked it (and would trust it); a new boot must not.
        earlier.verify(&d).unwrap();
        let path = earlier.object_path(&d);
        let mut bad = data.clone();
        bad[54_321] ^= 0x10;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, &bad).unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let e = store.verify(&d).unwrap_err();
        assert!(matches!(e, StoreError::VerityMismatch { .. }), "{e:?}");
        assert_eq!(store.stats().objects_rehashed, 1);
        assert!(!store.contains(&d));
    }

    #[test]
    fn a_fresh_object_replaced_by_another_file_is_re_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let data = crate::testutil::pseudo_random(100_000, 10);
        let d = store.insert_bytes(&data).unwrap().digest;
        let path = store.object_path(&d);
        let mut bad = data.clone();
        bad[1] ^= 0x01;
        // A new inode under the name (as a rename over it would leave).
        fs::remove_file(&path).unwrap();
        fs::write(&path, &bad).unwrap();
        let e = store.verify(&d).unwrap_err();
        assert!(matches!(e, StoreError::VerityMismatch { .. }), "{e:?}");
        assert_eq!(store.stats().objects_rehashed, 1);
        // Good content again: written (and trusted) afresh.
        assert!(store.insert_bytes(&data).unwrap().new);
        store.verify(&d).unwrap();
        assert_eq!(store.stats().objects_rehashed, 1);
    }

    #[test]
    fn verify_image_skips_what_the_install_wrote_and_re_hashes_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let mut layer = tar::Builder::new(Vec::new());
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let data = crate::testutil::pseudo_random(50_000, 2 * i as u64 + 21);
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            layer.append_data(&mut h, name, &data[..]).unwrap();
        }
        let layer = layer.into_inner().unwrap();
        let mut unpacker = crate::unpack::Unpacker::new(&store);
        unpacker
            .apply_layer("application/vnd.oci.image.layer.v1.tar", &layer[..])
            .unwrap();
        let image = store.commit_image(unpacker.tree()).unwrap();
        store.verify_image(&image).unwrap();
        let s = store.stats();
        assert_eq!(s.objects_rehashed, 0);
        assert_eq!(s.rehash_skipped, 4, "three objects and the image");
        let next_boot = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        next_boot.verify_image(&image).unwrap();
        assert_eq!(next_boot.stats().objects_rehashed, 4);
    }

    #[test]
    fn userspace_verify_catches_a_flipped_byte_and_moves_the_object_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let ins = store.insert_bytes(&data).unwrap();
        store.verify(&ins.digest).unwrap();
        // As found by the next boot (this handle trusts what it wrote itself).
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let path = store.object_path(&ins.digest);
        let mut bad = data.clone();
        bad[12_345] ^= 0x01;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, &bad).unwrap();
        match store.verify(&ins.digest) {
            Err(e @ StoreError::VerityMismatch { .. }) => {
                assert_eq!(e.code(), ErrorCode::VerityMismatch)
            }
            other => panic!("expected a verity mismatch, got {other:?}"),
        }
        // Out of the way: the next pull fetches it again.
        assert!(!store.contains(&ins.digest));
        assert!(matches!(
            store.verify(&ins.digest),
            Err(StoreError::Missing(_))
        ));
    }

    #[test]
    fn scrub_moves_a_corrupt_object_away_and_forgets_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open_with_mode(dir.path(), VerityMode::Userspace).unwrap();
        let big: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let mut layer = tar::Builder::new(Vec::new());
        for (name, data) in [("bin/busybox", big.clone()), ("etc/blob", vec![9u8; 9_000])] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            layer.append_data(&mut h, name, &data[..]).unwrap();
        }
        let layer = layer.into_inner().unwrap();
        let mut unpacker = crate::unpack::Unpacker::new(&store);
        unpacker
            .apply_layer("application/vnd.oci.image.layer.v1.tar", &layer[..])
            .unwrap();
        let tree = unpacker.tree().clone();
        let a = verity::digest_bytes(&big);
        let b = verity::digest_bytes(&[9u8; 9_000]);
        let image = store.commit_image(&tree).unwrap();
        assert!(store.has_image(&image));
        assert!(store.scrub_image(&image).unwrap().is_empty());
        assert!(store.has_image(&image));

        let path = store.object_path(&a);
        let mut bad = big.clone();
        bad[40_000] ^= 0x80;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, &bad).unwrap();
        assert_eq!(store.scrub_image(&image).unwrap(), [a]);
        assert!(!store.contains(&a));
        assert!(store.contains(&b), "intact objects stay");
        assert!(!store.has_image(&image), "the next pull installs it again");
        // Re-inserting the good content heals the store.
        assert!(store.insert_bytes(&big).unwrap().new);
    }

    #[test]
    fn open_probes_and_falls_back_to_userspace_without_fs_verity() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let probe_left = fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(probe_left, 0, "the probe file is removed");
        // Whatever the host filesystem is, the mode and the counters agree.
        let ins = store.insert_bytes(b"probe me").unwrap();
        store.verify(&ins.digest).unwrap();
        let s = store.stats();
        match store.verity_mode() {
            VerityMode::Kernel => assert_eq!(s.verity_enabled, 1),
            VerityMode::Userspace => assert_eq!(s.verity_enabled, 0),
        }
    }
}
