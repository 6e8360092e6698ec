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

use std::io::{self, Read};

use powernode_proto::ErrorCode;
use sha2::{Digest as _, Sha256};

use crate::composefs::encode_dev;
use crate::store::{ObjectStore, StoreError};
use crate::tree::{FsTree, Inode, Kind, Meta, TreeError, PERM_MASK};
use crate::ModuleErrorCode;

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

/// What a puller wraps (as `io::Error::other`) in the layer stream's error when the blob
/// it streamed does not match its manifest digest. The unpacker reports it as
/// `digest_mismatch`.
#[derive(Debug, thiserror::Error)]
#[error("blob digest sha256:{actual} does not match the manifest's {expected}")]
pub struct BlobDigestMismatch {
    pub expected: String,
    pub actual: String,
}

/// Any other error a puller wants reported with its own code (e.g. `registry_unreachable`
/// when the connection drops mid-layer).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CodedStreamError {
    pub code: ErrorCode,
    pub message: String,
}

/// The code for an error that came out of a layer stream.
pub fn stream_error_code(e: &io::Error) -> ErrorCode {
    let inner = e.get_ref();
    if inner.is_some_and(|i| i.is::<BlobDigestMismatch>()) {
        return ErrorCode::DigestMismatch;
    }
    if let Some(c) = inner.and_then(|i| i.downcast_ref::<CodedStreamError>()) {
        return c.code;
    }
    // The bytes were what the manifest promised but do not decode as its media type.
    ErrorCode::UnsupportedMediaType
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

    fn apply_decoded<R: Read>(
        &mut self,
        compression: Compression,
        reader: &mut R,
    ) -> Result<LayerStats, UnpackError> {
        Ok(match compression {
            Compression::None => self.apply_tar(&mut *reader)?,
            Compression::Gzip => {
                let mut d = flate2::read::MultiGzDecoder::new(&mut *reader);
                let s = self.apply_tar(&mut d)?;
                io::copy(&mut d, &mut io::sink()).map_err(UnpackError::Read)?;
                s
            }
            Compression::Zstd => {
                let mut d =
                    zstd::stream::read::Decoder::new(&mut *reader).map_err(UnpackError::Read)?;
                let s = self.apply_tar(&mut d)?;
                io::copy(&mut d, &mut io::sink()).map_err(UnpackError::Read)?;
                s
            }
        })
    }

    fn apply_tar<R: Read>(&mut self, reader: R) -> Result<LayerStats, UnpackError> {
        let mut archive = tar::Archive::new(reader);
        let mut stats = LayerStats::default();
        let entries = archive.entries().map_err(UnpackError::Read)?;
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::Read)?;
            stats.entries += 1;
            self.apply_entry(&mut entry, &mut stats)?;
        }
        // Drain what tar leaves after its end-of-archive blocks.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::Read)?;
        Ok(stats)
    }

    fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, UnpackError> {
        let bad = |source| UnpackError::BadHeader {
            entry: name.to_string(),
            source,
        };
        let h = entry.header();
        let perm = h.mode().map_err(bad)? & PERM_MASK;
        let mut uid = h.uid().map_err(bad)?;
        let mut gid = h.gid().map_err(bad)?;
        let mut mtime = h.mtime().map_err(bad)?;
        let mut mtime_nsec = 0u32;
        let mut meta_xattrs = std::collections::BTreeMap::new();
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
                    "uid" => uid = num()?,
                    "gid" => gid = num()?,
                    "mtime" => {
                        let v = std::str::from_utf8(value).unwrap_or("");
                        let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
                        // Negative (pre-1970) times clamp to 0; EROFS times are unsigned.
                        mtime = secs.parse::<u64>().unwrap_or(0);
                        let digits: String = frac.chars().take(9).collect();
                        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                            mtime_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
                        }
                    }
                    k if k.starts_with(PAX_XATTR_PREFIX) => {
                        let xname = &k.as_bytes()[PAX_XATTR_PREFIX.len()..];
                        let stored = if xname.starts_with(OVERLAY_XATTR_PREFIX) {
                            // Escaped: overlayfs unescapes one level and shows the
                            // original name, but never acts on it.
                            [
                                b"trusted.overlay.overlay.",
                                &xname[OVERLAY_XATTR_PREFIX.len()..],
                            ]
                            .concat()
                        } else {
                            xname.to_vec()
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
                        meta_xattrs.insert(stored, value.to_vec());
                    }
                    _ => {}
                }
            }
        }
        let to32 = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| bad(io::Error::other(format!("{what} exceeds 32 bits"))))
        };
        Ok(Meta {
            perm,
            uid: to32(uid, "uid")?,
            gid: to32(gid, "gid")?,
            mtime,
            mtime_nsec,
            xattrs: meta_xattrs,
        })
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        stats: &mut LayerStats,
    ) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let raw_path = entry.path_bytes().into_owned();
        let name = lossy(&raw_path);
        let etype = entry.header().entry_type();
        if matches!(
            etype,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let path = components(&name, &raw_path)?;
        let layer = self.layer;

        // Whiteouts act on the tree and add nothing.
        if let Some((last, parent_path)) = path.split_last() {
            if *last == OPAQUE_MARKER {
                let dir = self
                    .tree
                    .ensure_dir(parent_path, layer)
                    .map_err(|e| tree_err(&name, e))?;
                self.tree.clear_lower(dir, layer);
                return Ok(());
            }
            if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
                if hidden.starts_with(WHITEOUT_PREFIX) || hidden.is_empty() {
                    // Other `.wh..wh.` metadata (aufs) carries nothing we use.
                    return Ok(());
                }
                if hidden == b"." || hidden == b".." {
                    return Err(UnpackError::UnsafePath {
                        entry: name,
                        reason: "whiteout of `.` or `..`".into(),
                    });
                }
                let parent = match self.tree.lookup(parent_path) {
                    Ok(Some(p)) => p,
                    Ok(None) | Err(TreeError::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(tree_err(&name, e)),
                };
                if !matches!(self.tree.inode(parent).kind, Kind::Dir(_)) {
                    return Ok(());
                }
                if self
                    .tree
                    .entry_layer(parent, hidden)
                    .is_some_and(|l| l < layer)
                {
                    self.tree.unlink(parent, hidden);
                }
                return Ok(());
            }
        }

        let meta = Self::meta_of(entry, &name)?;
        let Some((last, parent_path)) = path.split_last() else {
            // The root itself (`./`): only a directory may describe it.
            if etype != T::Directory {
                return Err(UnpackError::UnsafePath {
                    entry: name,
                    reason: "the archive root is not a directory".into(),
                });
            }
            self.tree.inode_mut(FsTree::ROOT).meta = meta;
            return Ok(());
        };
        let parent = self
            .tree
            .ensure_dir(parent_path, layer)
            .map_err(|e| tree_err(&name, e))?;

        let kind = match etype {
            T::Directory => {
                let existing = self.tree.lookup(&path).map_err(|e| tree_err(&name, e))?;
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
            T::Regular | T::Continuous => {
                stats.files += 1;
                let size = entry.size();
                if size == 0 {
                    Kind::File { size, digest: None }
                } else {
                    let ins = self.store.insert(&mut *entry, None)?;
                    if ins.size != size {
                        return Err(UnpackError::BadHeader {
                            entry: name,
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
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err(UnpackError::BadHeader {
                        entry: name,
                        source: io::Error::other("symlink target empty or with a NUL byte"),
                    });
                }
                Kind::Symlink(target)
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.first() == Some(&b'/') {
                    return Err(UnpackError::UnsafePath {
                        entry: name,
                        reason: format!("hardlink to absolute path {:?}", lossy(&target)),
                    });
                }
                let tpath = components(&name, &target)?;
                let found = self.tree.lookup(&tpath).map_err(|e| tree_err(&name, e))?;
                let Some(id) = found.filter(|_| !tpath.is_empty()) else {
                    return Err(UnpackError::UnsafePath {
                        entry: name,
                        reason: format!(
                            "hardlink target {:?} is not in the layer tree",
                            lossy(&target)
                        ),
                    });
                };
                if matches!(self.tree.inode(id).kind, Kind::Dir(_)) {
                    return Err(UnpackError::UnsafePath {
                        entry: name,
                        reason: "hardlink to a directory".into(),
                    });
                }
                self.tree.link(parent, last, id, layer);
                return Ok(());
            }
            T::Char | T::Block => {
                let bad = |source| UnpackError::BadHeader {
                    entry: name.clone(),
                    source,
                };
                let h = entry.header();
                let major = h.device_major().map_err(bad)?.unwrap_or(0);
                let minor = h.device_minor().map_err(bad)?.unwrap_or(0);
                // Linux device numbers: 12-bit major, 20-bit minor.
                if major > 0xfff || minor > 0xf_ffff {
                    return Err(bad(io::Error::other("device number out of range")));
                }
                let dev = encode_dev(major, minor);
                if etype == T::Char {
                    Kind::CharDev(dev)
                } else {
                    Kind::BlockDev(dev)
                }
            }
            T::Fifo => Kind::Fifo,
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    entry: name,
                    kind: format!("{other:?}"),
                })
            }
        };
        let id = self.tree.add_inode(Inode { meta, kind });
        self.tree.link(parent, last, id, layer);
        Ok(())
    }
}
