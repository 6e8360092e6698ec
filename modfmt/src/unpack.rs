//! OCI layer unpacking into an in-memory [`FsTree`], file contents into the
//! [`ObjectStore`]. Layers are applied in manifest order; whiteouts (`.wh.NAME`) and
//! opaque markers (`.wh..wh..opq`) hide what lower layers put there, never what the
//! same layer wrote. The crate's `tar` module frames the archive (headers, PAX records,
//! long names, padding); this module decides what each member (or TOC record) does to
//! the tree.
//!
//! Safety: entry names with `..` are refused (`unsafe_path`, naming the entry), and so
//! are names that would pass through a symlink or a non-directory; symlink targets are
//! stored verbatim and never followed; hardlink targets must be earlier entries of the
//! tree (no `..`, no absolute target, not a directory). `trusted.overlay.*` xattrs from
//! an archive are escaped (`trusted.overlay.overlay.*`) so an image can never steer
//! overlayfs.

use std::io::{self, BufRead, Read};

use powernode_proto::ErrorCode;
use sha2::{Digest as _, Sha256};

use crate::composefs::encode_dev;
use crate::error::{stream_error_code, BlobDigestMismatch, ModuleErrorCode};
use crate::store::{ObjectStore, StoreError};
use crate::tar::{Member, Members, TarMember};
use crate::tree::{FsTree, Inode, Kind, Meta, TreeError, PERM_MASK};
use crate::verity::VerityDigest;

/// Layer compression, from the (signed) manifest's media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        Ok(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Self::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Self::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Self::Zstd,
            other => return Err(UnpackError::UnsupportedMediaType(other.to_string())),
        })
    }
}

/// A reader that hashes a blob while it streams and fails at EOF (with
/// [`BlobDigestMismatch`]) if the SHA-256 differs from `expected` (`sha256:HEX`), or as
/// soon as it exceeds `max_size`. Pullers put it between the network and the unpacker.
#[derive(Debug)]
pub struct DigestingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: String,
    read: u64,
    max_size: u64,
    done: bool,
}

impl<R: Read> DigestingReader<R> {
    pub fn new(inner: R, expected: &str, max_size: u64) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            expected: expected.to_string(),
            read: 0,
            max_size,
            done: false,
        }
    }
}

impl<R: Read> Read for DigestingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let mismatch = |actual: String, expected: &str| {
            io::Error::other(BlobDigestMismatch {
                expected: expected.to_string(),
                actual,
            })
        };
        if self.read > self.max_size {
            return Err(mismatch(
                format!("<more than {} bytes>", self.max_size),
                &self.expected,
            ));
        }
        if n == 0 {
            self.done = true;
            let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
            if self.expected.strip_prefix("sha256:") != Some(actual.as_str()) {
                return Err(mismatch(actual, &self.expected));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("layer entry {entry:?}: {reason}")]
    UnsafePath { entry: String, reason: String },
    #[error("layer entry {entry:?}: unsupported entry type {kind}")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("layer entry {entry:?}: malformed header")]
    BadHeader {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the layer")]
    Read(#[source] io::Error),
    #[error("storing a file of the layer")]
    Store(#[from] StoreError),
}

impl ModuleErrorCode for UnpackError {
    fn code(&self) -> ErrorCode {
        match self {
            UnpackError::UnsupportedMediaType(_)
            | UnpackError::UnsupportedEntry { .. }
            | UnpackError::BadHeader { .. } => ErrorCode::UnsupportedMediaType,
            UnpackError::UnsafePath { .. } => ErrorCode::UnsafePath,
            UnpackError::Read(e) => stream_error_code(e),
            UnpackError::Store(e) => e.code(),
        }
    }
}

/// Counts for one layer (the dedup test reads `new_bytes`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub files: u64,
    pub new_objects: u64,
    pub new_bytes: u64,
    pub deduplicated_objects: u64,
}

/// Applies layers, bottom first, to one tree.
#[derive(Debug)]
pub struct Unpacker<'a> {
    store: &'a ObjectStore,
    tree: FsTree,
    layer: u32,
    max_unpacked: u64,
}

/// The most one layer may unpack to (its tar stream, decompressed), whatever the
/// store could take: more is a decompression bomb, not a module.
pub const MAX_LAYER_UNPACKED_BYTES: u64 = 64 << 30;

/// A layer's decompressed tar stream, refused (`layer_too_large`) once it passes
/// `limit` bytes: a gzip or zstd bomb stops here, before it fills the store (on a
/// tmpfs, PID 1's memory) or spins the decoder for ever after the archive's end.
struct Bounded<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R> Bounded<R> {
    fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            read: 0,
            limit,
        }
    }
}

impl<R: BufRead> Read for Bounded<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Bounded<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.read > self.limit {
            return Err(io::Error::other(crate::error::CodedStreamError {
                code: ErrorCode::LayerTooLarge,
                message: format!(
                    "the layer unpacks to more than {} bytes (the store's free space, at most \
                     {MAX_LAYER_UNPACKED_BYTES})",
                    self.limit
                ),
            }));
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.read = self.read.saturating_add(n as u64);
        self.inner.consume(n);
    }
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Splits an archive path into components: leading `/` and `.` components dropped,
/// `..` refused. The empty list is the root.
fn components<'p>(entry: &str, raw: &'p [u8]) -> Result<Vec<&'p [u8]>, UnpackError> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::UnsafePath {
                    entry: entry.to_string(),
                    reason: "path contains `..`".into(),
                })
            }
            c if c.contains(&0) => {
                // Only a PAX record can smuggle one in; no kernel name contains NUL.
                return Err(UnpackError::UnsafePath {
                    entry: entry.to_string(),
                    reason: "path contains a NUL byte".into(),
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn tree_err(entry: &str, e: TreeError) -> UnpackError {
    UnpackError::UnsafePath {
        entry: entry.to_string(),
        reason: e.to_string(),
    }
}

impl<'a> Unpacker<'a> {
    pub fn new(store: &'a ObjectStore) -> Self {
        Self {
            store,
            tree: FsTree::new(),
            layer: 0,
            max_unpacked: MAX_LAYER_UNPACKED_BYTES,
        }
    }

    /// Lowers the bound on what one layer may unpack to (tests; a caller with its
    /// own budget). The store's free space bounds it too.
    pub fn with_max_unpacked(mut self, bytes: u64) -> Self {
        self.max_unpacked = bytes;
        self
    }

    pub fn tree(&self) -> &FsTree {
        &self.tree
    }

    pub fn into_tree(self) -> FsTree {
        self.tree
    }

    /// Applies one layer blob. `reader` is read to its end, so a digesting reader's
    /// check always runs; a failure leaves objects already stored (harmless, named by
    /// their content, collected by gc) and the tree half-applied (discard it).
    pub fn apply_layer<R: Read>(
        &mut self,
        media_type: &str,
        reader: R,
    ) -> Result<LayerStats, UnpackError> {
        self.apply_layer_buffered(media_type, io::BufReader::with_capacity(STREAM_BUF, reader))
    }

    /// [`apply_layer`](Self::apply_layer) for a reader with its own buffers (a
    /// registry stream): file contents go from those buffers to the store uncopied.
    pub fn apply_layer_buffered<R: BufRead>(
        &mut self,
        media_type: &str,
        mut reader: R,
    ) -> Result<LayerStats, UnpackError> {
        let compression = Compression::from_media_type(media_type)?;
        self.layer += 1;
        match self.apply_decoded(compression, &mut reader) {
            Ok(stats) => {
                io::copy(&mut reader, &mut io::sink()).map_err(UnpackError::Read)?;
                Ok(stats)
            }
            Err(e) => {
                // A blob tampered with usually breaks the decoder or the tar parser
                // before EOF; reading the rest lets the digesting reader say so
                // (`digest_mismatch`, or the puller's own code), which is the truth
                // where "bad header" would only be a symptom.
                match io::copy(&mut reader, &mut io::sink()) {
                    Err(stream) => Err(UnpackError::Read(stream)),
                    Ok(_) => Err(e),
                }
            }
        }
    }

    fn apply_decoded<R: BufRead>(
        &mut self,
        compression: Compression,
        reader: &mut R,
    ) -> Result<LayerStats, UnpackError> {
        let limit = self
            .store
            .available_bytes()
            .map_or(self.max_unpacked, |free| free.min(self.max_unpacked));
        Ok(match compression {
            Compression::None => self.apply_tar(Bounded::new(&mut *reader, limit))?,
            Compression::Gzip => {
                let mut d = flate2::bufread::MultiGzDecoder::new(&mut *reader);
                let mut d = Bounded::new(io::BufReader::with_capacity(STREAM_BUF, &mut d), limit);
                let s = self.apply_tar(&mut d)?;
                io::copy(&mut d, &mut io::sink()).map_err(UnpackError::Read)?;
                s
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(&mut *reader)
                    .map_err(UnpackError::Read)?;
                let mut d = Bounded::new(io::BufReader::with_capacity(STREAM_BUF, &mut d), limit);
                let s = self.apply_tar(&mut d)?;
                io::copy(&mut d, &mut io::sink()).map_err(UnpackError::Read)?;
                s
            }
        })
    }

    fn apply_tar<R: BufRead>(&mut self, reader: R) -> Result<LayerStats, UnpackError> {
        let mut members = Members::new(reader);
        let mut stats = LayerStats::default();
        while let Some(mut member) = members.next_member().map_err(UnpackError::Read)? {
            stats.entries += 1;
            self.apply_member(&mut member, &mut members, &mut stats)?;
        }
        // Drain what follows the end-of-archive blocks.
        let mut rest = members.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::Read)?;
        Ok(stats)
    }

    /// Applies one tar member: the tar-specific part (extension headers, the header,
    /// the content straight from the stream's buffers), then [`Self::apply_node`],
    /// which a TOC record goes through as well.
    fn apply_member<R: BufRead>(
        &mut self,
        member: &mut Member,
        members: &mut Members<R>,
        stats: &mut LayerStats,
    ) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let raw_path = member.path_bytes().into_owned();
        let name = lossy(&raw_path);
        let etype = member.header().entry_type();
        if matches!(
            etype,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let path = components(&name, &raw_path)?;
        if self.apply_whiteout(&name, &path)? {
            return Ok(());
        }
        let raw = raw_meta_of(member, &name)?;
        let kind = kind_of(member, &name)?;
        let mut content = members.content(member.size());
        self.apply_node(
            &name,
            &path,
            &raw,
            kind,
            Content::Stream(&mut content),
            stats,
        )
    }

    /// Applies one TOC record whose content (if any) is already in the store.
    /// `fresh` are the objects this pull fetched: the first reference to one counts as
    /// new, every other as deduplicated (as a tar layer would count them).
    pub(crate) fn apply_record(
        &mut self,
        raw_path: &[u8],
        raw: &RawMeta,
        kind: EntryKind,
        digest: Option<VerityDigest>,
        fresh: &mut std::collections::HashSet<VerityDigest>,
        stats: &mut LayerStats,
    ) -> Result<(), UnpackError> {
        stats.entries += 1;
        let name = lossy(raw_path);
        let path = components(&name, raw_path)?;
        if self.apply_whiteout(&name, &path)? {
            return Ok(());
        }
        let content = match digest {
            Some(d) => Content::Stored(d, fresh.remove(&d)),
            None => Content::Empty,
        };
        self.apply_node(&name, &path, raw, kind, content, stats)
    }

    pub(crate) fn start_layer(&mut self) {
        self.layer += 1;
    }

    /// Whiteouts act on the tree and add nothing; true when `path` was one.
    fn apply_whiteout(&mut self, name: &str, path: &[&[u8]]) -> Result<bool, UnpackError> {
        let layer = self.layer;
        let Some((last, parent_path)) = path.split_last() else {
            return Ok(false);
        };
        if *last == OPAQUE_MARKER {
            let dir = self
                .tree
                .ensure_dir(parent_path, layer)
                .map_err(|e| tree_err(name, e))?;
            self.tree.clear_lower(dir, layer);
            return Ok(true);
        }
        let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) else {
            return Ok(false);
        };
        if hidden.starts_with(WHITEOUT_PREFIX) || hidden.is_empty() {
            // Other `.wh..wh.` metadata (aufs) carries nothing we use.
            return Ok(true);
        }
        if hidden == b"." || hidden == b".." {
            return Err(UnpackError::UnsafePath {
                entry: name.to_string(),
                reason: "whiteout of `.` or `..`".into(),
            });
        }
        let parent = match self.tree.lookup(parent_path) {
            Ok(Some(p)) => p,
            Ok(None) | Err(TreeError::NotFound { .. }) => return Ok(true),
            Err(e) => return Err(tree_err(name, e)),
        };
        if !matches!(self.tree.inode(parent).kind, Kind::Dir(_)) {
            return Ok(true);
        }
        if self
            .tree
            .entry_layer(parent, hidden)
            .is_some_and(|l| l < layer)
        {
            self.tree.unlink(parent, hidden);
        }
        Ok(true)
    }

    /// The one definition of what an entry does to the tree, for tar entries and TOC
    /// records alike.
    fn apply_node(
        &mut self,
        name: &str,
        path: &[&[u8]],
        raw: &RawMeta,
        kind: EntryKind,
        content: Content<'_>,
        stats: &mut LayerStats,
    ) -> Result<(), UnpackError> {
        let layer = self.layer;
        let meta = raw.to_meta(name)?;
        let Some((last, parent_path)) = path.split_last() else {
            // The root itself (`./`): only a directory may describe it.
            if kind != EntryKind::Dir {
                return Err(UnpackError::UnsafePath {
                    entry: name.to_string(),
                    reason: "the archive root is not a directory".into(),
                });
            }
            self.tree.inode_mut(FsTree::ROOT).meta = meta;
            return Ok(());
        };
        let parent = self
            .tree
            .ensure_dir(parent_path, layer)
            .map_err(|e| tree_err(name, e))?;

        let kind = match kind {
            EntryKind::Dir => {
                let existing = self.tree.lookup(path).map_err(|e| tree_err(name, e))?;
                if let Some(id) = existing {
                    if matches!(self.tree.inode(id).kind, Kind::Dir(_)) {
                        // A directory entry over a directory updates its metadata and
                        // keeps the children (a later layer re-listing `/usr/`).
                        self.tree.inode_mut(id).meta = meta;
                        self.tree.link(parent, last, id, layer);
                        return Ok(());
                    }
                }
                Kind::Dir(Default::default())
            }
            EntryKind::File { size } => {
                stats.files += 1;
                match content {
                    _ if size == 0 => Kind::File { size, digest: None },
                    Content::Stream(reader) => {
                        let ins = self.store.insert_buffered(reader, None)?;
                        if ins.size != size {
                            return Err(UnpackError::BadHeader {
                                entry: name.to_string(),
                                source: io::Error::other("entry shorter than its header says"),
                            });
                        }
                        if ins.new {
                            stats.new_objects += 1;
                            stats.new_bytes += ins.size;
                        } else {
                            stats.deduplicated_objects += 1;
                        }
                        Kind::File {
                            size,
                            digest: Some(ins.digest),
                        }
                    }
                    Content::Stored(digest, fresh) => {
                        if !self.store.contains(&digest) {
                            return Err(StoreError::Missing(digest).into());
                        }
                        if fresh {
                            stats.new_objects += 1;
                            stats.new_bytes += size;
                        } else {
                            stats.deduplicated_objects += 1;
                        }
                        Kind::File {
                            size,
                            digest: Some(digest),
                        }
                    }
                    Content::Empty => {
                        return Err(UnpackError::BadHeader {
                            entry: name.to_string(),
                            source: io::Error::other("a non-empty file without content"),
                        })
                    }
                }
            }
            EntryKind::Symlink(target) => {
                if target.is_empty() || target.contains(&0) {
                    return Err(UnpackError::BadHeader {
                        entry: name.to_string(),
                        source: io::Error::other("symlink target empty or with a NUL byte"),
                    });
                }
                Kind::Symlink(target)
            }
            EntryKind::Hardlink(target) => {
                if target.first() == Some(&b'/') {
                    return Err(UnpackError::UnsafePath {
                        entry: name.to_string(),
                        reason: format!("hardlink to absolute path {:?}", lossy(&target)),
                    });
                }
                let tpath = components(name, &target)?;
                let found = self.tree.lookup(&tpath).map_err(|e| tree_err(name, e))?;
                let Some(id) = found.filter(|_| !tpath.is_empty()) else {
                    return Err(UnpackError::UnsafePath {
                        entry: name.to_string(),
                        reason: format!(
                            "hardlink target {:?} is not in the layer tree",
                            lossy(&target)
                        ),
                    });
                };
                if matches!(self.tree.inode(id).kind, Kind::Dir(_)) {
                    return Err(UnpackError::UnsafePath {
                        entry: name.to_string(),
                        reason: "hardlink to a directory".into(),
                    });
                }
                self.tree.link(parent, last, id, layer);
                return Ok(());
            }
            EntryKind::CharDev { major, minor } | EntryKind::BlockDev { major, minor } => {
                // Linux device numbers: 12-bit major, 20-bit minor.
                if major > 0xfff || minor > 0xf_ffff {
                    return Err(UnpackError::BadHeader {
                        entry: name.to_string(),
                        source: io::Error::other("device number out of range"),
                    });
                }
                let dev = encode_dev(major, minor);
                if matches!(kind, EntryKind::CharDev { .. }) {
                    Kind::CharDev(dev)
                } else {
                    Kind::BlockDev(dev)
                }
            }
            EntryKind::Fifo => Kind::Fifo,
        };
        let id = self.tree.add_inode(Inode { meta, kind });
        self.tree.link(parent, last, id, layer);
        Ok(())
    }
}

/// Where a regular file's content comes from.
enum Content<'r> {
    /// The tar member itself: stored (and hashed) while read.
    Stream(&'r mut dyn BufRead),
    /// Already in the store under this digest (a TOC record); true when this pull
    /// fetched it.
    Stored(VerityDigest, bool),
    /// Nothing (a TOC record without a digest).
    Empty,
}

/// An entry's metadata as the archive states it: xattr names not yet escaped, ids not
/// yet narrowed. [`RawMeta::to_meta`] is the check both tar entries and TOC records
/// pass through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawMeta {
    /// Mode bits from the header (only [`PERM_MASK`] survives).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub xattrs: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
}

impl RawMeta {
    fn to_meta(&self, name: &str) -> Result<Meta, UnpackError> {
        let mut xattrs = std::collections::BTreeMap::new();
        for (xname, value) in &self.xattrs {
            let stored = if xname.starts_with(OVERLAY_XATTR_PREFIX) {
                // Escaped: overlayfs unescapes one level and shows the original name,
                // but never acts on it.
                [
                    b"trusted.overlay.overlay.",
                    &xname[OVERLAY_XATTR_PREFIX.len()..],
                ]
                .concat()
            } else {
                xname.clone()
            };
            if !(stored.starts_with(b"user.")
                || stored.starts_with(b"trusted.")
                || stored.starts_with(b"security."))
            {
                return Err(UnpackError::UnsupportedEntry {
                    entry: name.to_string(),
                    kind: format!("xattr {}", lossy(xname)),
                });
            }
            xattrs.insert(stored, value.clone());
        }
        let to32 = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| UnpackError::BadHeader {
                entry: name.to_string(),
                source: io::Error::other(format!("{what} exceeds 32 bits")),
            })
        };
        Ok(Meta {
            perm: self.mode & PERM_MASK,
            uid: to32(self.uid, "uid")?,
            gid: to32(self.gid, "gid")?,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
            xattrs,
        })
    }
}

/// What kind of node an entry makes (contents aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
    },
    Symlink(Vec<u8>),
    /// Target path, as stored (checked when applied).
    Hardlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// The header and PAX records of a tar entry.
pub(crate) fn raw_meta_of(entry: &mut impl TarMember, name: &str) -> Result<RawMeta, UnpackError> {
    let bad = |source| UnpackError::BadHeader {
        entry: name.to_string(),
        source,
    };
    let h = entry.header();
    let mut raw = RawMeta {
        mode: h.mode().map_err(bad)?,
        uid: h.uid().map_err(bad)?,
        gid: h.gid().map_err(bad)?,
        mtime: h.mtime().map_err(bad)?,
        mtime_nsec: 0,
        xattrs: Default::default(),
    };
    if let Some(exts) = entry.pax_extensions().map_err(bad)? {
        for ext in exts {
            let ext = ext.map_err(bad)?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let num = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| bad(io::Error::other(format!("PAX {key} is not a number"))))
            };
            match key {
                "uid" => raw.uid = num()?,
                "gid" => raw.gid = num()?,
                "mtime" => {
                    let v = std::str::from_utf8(value).unwrap_or("");
                    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
                    // Negative (pre-1970) times clamp to 0; EROFS times are unsigned.
                    raw.mtime = secs.parse::<u64>().unwrap_or(0);
                    let digits: String = frac.chars().take(9).collect();
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                        raw.mtime_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
                    }
                }
                k if k.starts_with(PAX_XATTR_PREFIX) => {
                    let xname = &k.as_bytes()[PAX_XATTR_PREFIX.len()..];
                    raw.xattrs.insert(xname.to_vec(), value.to_vec());
                }
                _ => {}
            }
        }
    }
    Ok(raw)
}

/// The node kind of a tar entry (extension headers excluded by the caller).
pub(crate) fn kind_of(entry: &impl TarMember, name: &str) -> Result<EntryKind, UnpackError> {
    use tar::EntryType as T;
    let h = entry.header();
    let link = || {
        entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default()
    };
    Ok(match h.entry_type() {
        T::Directory => EntryKind::Dir,
        T::Regular | T::Continuous => EntryKind::File { size: entry.size() },
        T::Symlink => EntryKind::Symlink(link()),
        T::Link => EntryKind::Hardlink(link()),
        t @ (T::Char | T::Block) => {
            let bad = |source| UnpackError::BadHeader {
                entry: name.to_string(),
                source,
            };
            let major = h.device_major().map_err(bad)?.unwrap_or(0);
            let minor = h.device_minor().map_err(bad)?.unwrap_or(0);
            if t == T::Char {
                EntryKind::CharDev { major, minor }
            } else {
                EntryKind::BlockDev { major, minor }
            }
        }
        T::Fifo => EntryKind::Fifo,
        other => {
            return Err(UnpackError::UnsupportedEntry {
                entry: name.to_string(),
                kind: format!("{other:?}"),
            })
        }
    })
}

/// Buffer size for readers without buffers of their own (and decoders' output).
const STREAM_BUF: usize = 1 << 20;
