//! OCI layer unpacking into an in-memory [`FsTree`], file contents into the
//! [`ObjectStore`]. Layers are applied in manifest order; whiteouts (`.wh.NAME`) and
//! opaque markers (`.wh..wh..opq`) hide what lower layers put there, never what the
//! same layer wrote.
//!
//! Safety: entry names with `..` are refused (`unsafe_path`, naming the entry), and so
//! are names that would pass through a symlink or a non-directory; symlink targets are
//! stored verbatim and never followed; hardlink targets must be earlier entries of the
//! tree (no `..`, no absolute target, not a directory). `trusted.overlay.*` xattrs from
//! an archive are escaped (`trusted.overlay.overlay.*`) so an image can never steer
//! overlayfs.

use std::borrow::Cow;
use std::io::{self, BufRead, Read};

use powernode_proto::ErrorCode;
use sha2::{Digest as _, Sha256};

use crate::composefs::encode_dev;
use crate::error::{stream_error_code, BlobDigestMismatch, ModuleErrorCode};
use crate::store::{ObjectStore, StoreError};
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
        }
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
        Ok(match compression {
            Compression::None => self.apply_tar(&mut *reader)?,
            Compression::Gzip => {
                let mut d = flate2::bufread::MultiGzDecoder::new(&mut *reader);
                let mut d = io::BufReader::with_capacity(STREAM_BUF, &mut d);
                let s = self.apply_tar(&mut d)?;
                io::copy(&mut d, &mut io::sink()).map_err(UnpackError::Read)?;
                s
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(&mut *reader)
                    .map_err(UnpackError::Read)?;
                let mut d = io::BufReader::with_capacity(STREAM_BUF, &mut d);
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
        let mut content = members.content(member.size);
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

/// What [`raw_meta_of`] and [`kind_of`] read of a tar member: the tar crate's entries
/// (the publisher's TOC) and [`Member`]s (the node's unpacker) alike.
pub(crate) trait TarMember {
    fn header(&self) -> &tar::Header;
    /// Content size (a PAX `size` record wins over the header).
    fn size(&self) -> u64;
    fn link_name_bytes(&self) -> Option<Cow<'_, [u8]>>;
    fn pax_extensions(&mut self) -> io::Result<Option<tar::PaxExtensions<'_>>>;
}

impl<R: Read> TarMember for tar::Entry<'_, R> {
    fn header(&self) -> &tar::Header {
        tar::Entry::header(self)
    }
    fn size(&self) -> u64 {
        tar::Entry::size(self)
    }
    fn link_name_bytes(&self) -> Option<Cow<'_, [u8]>> {
        tar::Entry::link_name_bytes(self)
    }
    fn pax_extensions(&mut self) -> io::Result<Option<tar::PaxExtensions<'_>>> {
        tar::Entry::pax_extensions(self)
    }
}

/// One tar member as [`Members`] frames it: its header, with the GNU long name / long
/// link and PAX records that came before it.
#[derive(Debug)]
pub(crate) struct Member {
    header: tar::Header,
    size: u64,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// The value of the first well-formed PAX record named `key`.
fn pax_value<'a>(pax: &'a Option<Vec<u8>>, key: &[u8]) -> Option<&'a [u8]> {
    tar::PaxExtensions::new(pax.as_deref()?)
        .filter_map(|f| f.ok())
        .find(|f| f.key_bytes() == key)
        .map(|f| f.value_bytes())
}

/// A GNU long name or link, without its trailing NUL.
fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(&[0]).unwrap_or(b)
}

impl Member {
    /// GNU long name, else PAX `path`, else the header's (ustar prefix included).
    pub(crate) fn path_bytes(&self) -> Cow<'_, [u8]> {
        if let Some(b) = &self.long_name {
            return Cow::Borrowed(strip_nul(b));
        }
        match pax_value(&self.pax, b"path") {
            Some(v) => Cow::Borrowed(v),
            None => self.header.path_bytes(),
        }
    }
}

impl TarMember for Member {
    fn header(&self) -> &tar::Header {
        &self.header
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn link_name_bytes(&self) -> Option<Cow<'_, [u8]>> {
        if let Some(b) = &self.long_link {
            return Some(Cow::Borrowed(strip_nul(b)));
        }
        match pax_value(&self.pax, b"linkpath") {
            Some(v) => Some(Cow::Borrowed(v)),
            None => self.header.link_name_bytes(),
        }
    }
    fn pax_extensions(&mut self) -> io::Result<Option<tar::PaxExtensions<'_>>> {
        Ok(self.pax.as_deref().map(tar::PaxExtensions::new))
    }
}

fn framing(msg: &str) -> io::Error {
    io::Error::other(msg.to_string())
}

/// Tar framing over a [`BufRead`], so a member's content can be handed to the store
/// as slices of the stream's own buffers (the tar crate's entries only `Read`, which
/// costs a copy of every byte). The framing is the tar crate's, step for step
/// (`Entries::next` without `raw` or `ignore_zeros`): headers checksummed, GNU long
/// names / links and PAX local records attached to the member they precede, a PAX
/// `size` winning over the header's, content padded to 512 bytes, the archive ending
/// at the first all-zero block or at EOF; the publisher's TOC (built with the tar
/// crate) and this agree on every member.
pub(crate) struct Members<R> {
    inner: R,
    /// Bytes consumed so far, and where the next header starts.
    pos: u64,
    next: u64,
}

const TAR_BLOCK: u64 = 512;

impl<R: BufRead> Members<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            pos: 0,
            next: 0,
        }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Consumes `n` bytes (the rest of a member's content and its padding).
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Err(framing("unexpected EOF during skip"));
            }
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.inner.consume(k);
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    /// A whole block; `false` at a clean EOF, an error at a partial block.
    fn read_block(&mut self, block: &mut [u8]) -> io::Result<bool> {
        let mut read = 0;
        while read < block.len() {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                if read == 0 {
                    return Ok(false);
                }
                return Err(framing("failed to read entire block"));
            }
            let k = buf.len().min(block.len() - read);
            block[read..read + k].copy_from_slice(&buf[..k]);
            self.inner.consume(k);
            self.pos += k as u64;
            read += k;
        }
        Ok(true)
    }

    /// The next header (extension headers included), its PAX `size` applied from
    /// `pax`, which describes the member after the extension headers.
    fn next_raw(&mut self, pax: Option<&[u8]>) -> io::Result<Option<Member>> {
        let delta = self.next - self.pos;
        self.skip(delta)?;
        let mut header = tar::Header::new_old();
        if !self.read_block(header.as_mut_bytes())? {
            return Ok(None);
        }
        if header.as_bytes().iter().all(|&b| b == 0) {
            return Ok(None);
        }
        self.next = self.pos;
        let bytes = header.as_bytes();
        let sum = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .fold(0u32, |a, &b| a + u32::from(b))
            + 8 * 32;
        if sum != header.cksum()? {
            return Err(framing("archive header checksum mismatch"));
        }
        let t = header.entry_type();
        let extension = t.is_gnu_longname()
            || t.is_gnu_longlink()
            || t.is_pax_local_extensions()
            || t.is_pax_global_extensions();
        let mut size = header.entry_size()?;
        if let Some(pax) = pax.filter(|_| !extension) {
            // As the tar crate: the first `size` record, if it is a number.
            let record = tar::PaxExtensions::new(pax)
                .map_while(|f| f.ok())
                .find(|f| f.key() == Ok("size"));
            if let Some(v) = record
                .and_then(|f| f.value().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                size = v;
            }
        }
        let padded = size
            .checked_add(TAR_BLOCK - 1)
            .ok_or_else(|| framing("size overflow"))?
            & !(TAR_BLOCK - 1);
        self.next = self
            .next
            .checked_add(padded)
            .ok_or_else(|| framing("size overflow"))?;
        Ok(Some(Member {
            header,
            size,
            long_name: None,
            long_link: None,
            pax: None,
        }))
    }

    /// An extension member's content, read whole (at most its size).
    fn read_all(&mut self, size: u64) -> io::Result<Vec<u8>> {
        let mut v = Vec::with_capacity(usize::try_from(size.min(128 << 10)).unwrap_or(0));
        self.content(size).read_to_end(&mut v)?;
        Ok(v)
    }

    /// The next member, with the extension headers before it applied; `None` at the
    /// end of the archive.
    pub(crate) fn next_member(&mut self) -> io::Result<Option<Member>> {
        let mut long_name = None;
        let mut long_link = None;
        let mut pax: Option<Vec<u8>> = None;
        let mut processed = 0;
        loop {
            processed += 1;
            let Some(mut member) = self.next_raw(pax.as_deref())? else {
                if processed > 1 {
                    return Err(framing(
                        "members found describing a future member but no future member found",
                    ));
                }
                return Ok(None);
            };
            let h = &member.header;
            let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
            let t = h.entry_type();
            let slot = match () {
                _ if recognized && t.is_gnu_longname() => &mut long_name,
                _ if recognized && t.is_gnu_longlink() => &mut long_link,
                _ if recognized && t.is_pax_local_extensions() => &mut pax,
                _ => {
                    member.long_name = long_name;
                    member.long_link = long_link;
                    member.pax = pax;
                    return Ok(Some(member));
                }
            };
            if slot.is_some() {
                return Err(framing(
                    "two extension entries of one kind describing the same member",
                ));
            }
            *slot = Some(self.read_all(member.size)?);
        }
    }

    /// The content of the member just returned: at most `size` bytes, straight from
    /// the stream's buffers.
    pub(crate) fn content(&mut self, size: u64) -> MemberContent<'_, R> {
        MemberContent {
            members: self,
            left: size,
        }
    }
}

/// One member's content (see [`Members::content`]).
pub(crate) struct MemberContent<'m, R> {
    members: &'m mut Members<R>,
    left: u64,
}

impl<R: BufRead> Read for MemberContent<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for MemberContent<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.left == 0 {
            return Ok(&[]);
        }
        let left = usize::try_from(self.left).unwrap_or(usize::MAX);
        let buf = self.members.inner.fill_buf()?;
        Ok(&buf[..buf.len().min(left)])
    }

    fn consume(&mut self, n: usize) {
        self.members.inner.consume(n);
        self.members.pos += n as u64;
        self.left -= n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one framing saw of each member.
    #[derive(Debug, PartialEq)]
    struct Seen {
        path: Vec<u8>,
        link: Option<Vec<u8>>,
        kind: u8,
        size: u64,
        pax: Vec<(Vec<u8>, Vec<u8>)>,
        content: Vec<u8>,
    }

    fn pax_list(p: Option<tar::PaxExtensions<'_>>) -> Vec<(Vec<u8>, Vec<u8>)> {
        p.into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.key_bytes().to_vec(), e.value_bytes().to_vec()))
            .collect()
    }

    fn with_tar_crate(bytes: &[u8]) -> io::Result<Vec<Seen>> {
        let mut a = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let mut seen = Seen {
                path: e.path_bytes().into_owned(),
                link: e.link_name_bytes().map(|l| l.into_owned()),
                kind: e.header().entry_type().as_byte(),
                size: e.size(),
                pax: pax_list(e.pax_extensions()?),
                content: Vec::new(),
            };
            e.read_to_end(&mut seen.content)?;
            out.push(seen);
        }
        Ok(out)
    }

    /// Through [`Members`], read in small pieces so buffers split everywhere.
    fn with_members(bytes: &[u8], piece: usize) -> io::Result<Vec<Seen>> {
        let mut m = Members::new(io::BufReader::with_capacity(piece, bytes));
        let mut out = Vec::new();
        while let Some(mut e) = m.next_member()? {
            let mut seen = Seen {
                path: e.path_bytes().into_owned(),
                link: TarMember::link_name_bytes(&e).map(|l| l.into_owned()),
                kind: e.header.entry_type().as_byte(),
                size: e.size,
                pax: pax_list(TarMember::pax_extensions(&mut e)?),
                content: Vec::new(),
            };
            m.content(e.size).read_to_end(&mut seen.content)?;
            out.push(seen);
        }
        Ok(out)
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(7);
        h
    }

    fn sample() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(150));
        let data = crate::testutil::pseudo_random(70_001, 4);
        b.append_data(
            &mut header(tar::EntryType::Regular, 70_001),
            &long,
            &data[..],
        )
        .unwrap();
        b.append_data(&mut header(tar::EntryType::Regular, 0), "empty", &b""[..])
            .unwrap();
        let target = format!("{}/target", "t".repeat(120));
        b.append_link(&mut header(tar::EntryType::Symlink, 0), "sym", &target)
            .unwrap();
        b.append_pax_extensions([
            ("SCHILY.xattr.user.k", &b"v\0x"[..]),
            ("path", &b"pax/named"[..]),
            ("mtime", &b"12.5"[..]),
        ])
        .unwrap();
        b.append_data(
            &mut header(tar::EntryType::Regular, 3),
            "ignored",
            &b"abc"[..],
        )
        .unwrap();
        b.append_data(&mut header(tar::EntryType::Directory, 0), "dir/", &b""[..])
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn members_frame_as_the_tar_crate_does() {
        let tar = sample();
        let expected = with_tar_crate(&tar).unwrap();
        assert_eq!(expected.len(), 5, "{expected:?}");
        assert_eq!(expected[3].path, b"pax/named");
        for piece in [1, 7, 512, 4096, 1 << 20] {
            assert_eq!(
                with_members(&tar, piece).unwrap(),
                expected,
                "piece {piece}"
            );
        }
        // No end blocks, trailing garbage after them, a cut inside a header or inside
        // content: the same verdicts (cut content reads short, as with the tar crate).
        let mut no_end = tar.clone();
        no_end.truncate(tar.len() - 1024);
        let mut garbage = tar.clone();
        garbage.extend_from_slice(b"trailing bytes after the end");
        for bytes in [no_end, garbage, tar[..700].to_vec(), tar[..70_000].to_vec()] {
            let a = with_tar_crate(&bytes).map_err(|e| e.to_string());
            let b = with_members(&bytes, 4096).map_err(|e| e.to_string());
            assert_eq!(a.is_ok(), b.is_ok(), "{a:?} vs {b:?}");
            if let (Ok(a), Ok(b)) = (a, b) {
                assert_eq!(a, b);
            }
        }
        // A checksum broken by one flipped byte is refused.
        let mut bad = tar.clone();
        bad[1100] ^= 1;
        assert!(with_tar_crate(&bad).is_err());
        assert!(with_members(&bad, 4096).is_err());
    }

    #[test]
    fn a_pax_size_record_wins_over_the_header() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"5"[..])]).unwrap();
        // The header says 3, the PAX record 5: both readers take 5 bytes.
        let mut h = header(tar::EntryType::Regular, 3);
        h.set_path("f").unwrap();
        h.set_cksum();
        let mut raw = b.into_inner().unwrap();
        // Without the end-of-archive blocks `into_inner` adds.
        raw.truncate(raw.len() - 1024);
        raw.extend_from_slice(h.as_bytes());
        let mut content = b"abcde".to_vec();
        content.resize(512, 0);
        raw.extend_from_slice(&content);
        raw.extend_from_slice(&[0u8; 1024]);
        let expected = with_tar_crate(&raw).unwrap();
        assert_eq!(expected[0].content, b"abcde");
        assert_eq!(with_members(&raw, 64).unwrap(), expected);
    }
}
