//! A minimal, reproducible composefs EROFS image writer.
//!
//! The image holds the module's whole tree (names, modes, owners, mtimes, xattrs,
//! symlinks, devices) but no file data: every non-empty regular file is a sparse
//! chunk-based inode whose `trusted.overlay.metacopy` xattr carries the file's
//! fs-verity digest and whose `trusted.overlay.redirect` names its object
//! (`/XX/REST`) in the object store, which overlayfs mounts as a data-only lower
//! layer. That is exactly how composefs (C and composefs-rs) represents external files.
//!
//! Why our own writer: composefs-rs 0.9 (which has a fine writer) requires OpenSSL and
//! does not build for `x86_64-unknown-linux-musl`, where this library is linked into the
//! static init. The on-disk layout here is a subset of EROFS that Linux >= 5.15 mounts:
//! 4096-byte blocks, extended (64-byte) inodes only, inline xattrs only (no shared
//! xattr table, no name filter), directories and symlinks inline when they fit in the
//! inode's block and in plain blocks otherwise, one `0xffffffff` chunk index for
//! external files, depth-first inode order, zero build time and UUID. It is not
//! byte-compatible with `mkcomposefs` (which packs compact inodes); it only has to be
//! byte-identical between our publisher and our node, which it is: the output is a
//! pure function of the tree.
//!
//! It must never write anything it cannot represent faithfully: oversize names,
//! xattrs or files are errors, never truncated.

use crate::tree::{FsTree, InodeId, Kind};
use crate::verity::{VerityDigest, HASH_ALG_SHA256};

const BLOCK: usize = 4096;
const SUPERBLOCK_OFFSET: usize = 1024;
const SUPERBLOCK_SIZE: usize = 128;
const INODE_SIZE: usize = 64;
const INODE_SLOT: usize = 32;
const DIRENT_SIZE: usize = 12;
const XATTR_IBODY_HEADER: usize = 12;
/// Directory and symlink data up to this size is stored inline after the inode.
const INLINE_MAX: usize = 2048;

const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const COMPOSEFS_MAGIC: u32 = 0xd078_629a;
const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_CHUNK_BASED: u16 = 4;
/// Largest chunk: 2^(12 + 31) bytes; one chunk covers every file up to 8 TiB.
const MAX_FILE_SIZE: u64 = 1 << 43;

const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;
const S_IFCHR: u16 = 0o020000;
const S_IFBLK: u16 = 0o060000;
const S_IFIFO: u16 = 0o010000;
const S_IFSOCK: u16 = 0o140000;

/// EROFS built-in xattr name prefixes we store (index, prefix).
const XATTR_PREFIXES: [(u8, &[u8]); 3] = [(1, b"user."), (4, b"trusted."), (6, b"security.")];

pub const XATTR_METACOPY: &[u8] = b"trusted.overlay.metacopy";
pub const XATTR_REDIRECT: &[u8] = b"trusted.overlay.redirect";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("xattr {name:?}: only user., trusted. and security. names up to 255 bytes after the prefix are supported")]
    XattrName { name: String },
    #[error("xattrs of one inode exceed the EROFS inline limit")]
    XattrsTooLarge,
    #[error("name {name:?} is longer than 255 bytes")]
    NameTooLong { name: String },
    #[error("symlink target longer than 4095 bytes")]
    SymlinkTooLong,
    #[error("file of {0} bytes exceeds the 8 TiB chunk limit")]
    FileTooLarge(u64),
    #[error("image exceeds the 32-bit block count")]
    ImageTooLarge,
}

/// Object path relative to the objects directory, as the redirect xattr names it.
pub fn redirect_for(digest: &VerityDigest) -> Vec<u8> {
    let hex = digest.to_hex();
    format!("/{}/{}", &hex[..2], &hex[2..]).into_bytes()
}

/// `struct ovl_metacopy` with an fs-verity SHA-256 digest.
pub fn metacopy_for(digest: &VerityDigest) -> Vec<u8> {
    let mut v = vec![0u8, 4 + 32, 0, HASH_ALG_SHA256];
    v.extend_from_slice(digest.as_bytes());
    v
}

/// Linux `new_encode_dev`, the form EROFS stores device numbers in.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

struct XattrEntry {
    index: u8,
    suffix: Vec<u8>,
    value: Vec<u8>,
}

fn xattr_entries(tree: &FsTree, id: InodeId) -> Result<Vec<XattrEntry>, ImageError> {
    let inode = tree.inode(id);
    let mut all: Vec<(Vec<u8>, Vec<u8>)> = inode
        .meta
        .xattrs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Kind::File {
        digest: Some(d), ..
    } = &inode.kind
    {
        all.push((XATTR_METACOPY.to_vec(), metacopy_for(d)));
        all.push((XATTR_REDIRECT.to_vec(), redirect_for(d)));
    }
    all.sort();
    all.into_iter()
        .map(|(name, value)| {
            let (index, prefix) = XATTR_PREFIXES
                .iter()
                .find(|(_, p)| name.starts_with(p))
                .ok_or_else(|| ImageError::XattrName {
                    name: String::from_utf8_lossy(&name).into_owned(),
                })?;
            let suffix = name[prefix.len()..].to_vec();
            if suffix.len() > 255 || value.len() > usize::from(u16::MAX) {
                return Err(ImageError::XattrName {
                    name: String::from_utf8_lossy(&name).into_owned(),
                });
            }
            Ok(XattrEntry {
                index: *index,
                suffix,
                value,
            })
        })
        .collect()
}

fn xattr_size(entries: &[XattrEntry]) -> usize {
    if entries.is_empty() {
        return 0;
    }
    XATTR_IBODY_HEADER
        + entries
            .iter()
            .map(|e| (4 + e.suffix.len() + e.value.len()).next_multiple_of(4))
            .sum::<usize>()
}

fn file_type(kind: &Kind) -> (u16, u8) {
    match kind {
        Kind::File { .. } => (S_IFREG, 1),
        Kind::Dir(_) => (S_IFDIR, 2),
        Kind::CharDev(_) => (S_IFCHR, 3),
        Kind::BlockDev(_) => (S_IFBLK, 4),
        Kind::Fifo => (S_IFIFO, 5),
        Kind::Socket => (S_IFSOCK, 6),
        Kind::Symlink(_) => (S_IFLNK, 7),
    }
}

/// A directory's entries split into blocks (entries never straddle a block).
fn dir_blocks(entries: &[(Vec<u8>, usize, u8)]) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, (name, _, _)) in entries.iter().enumerate() {
        let sz = DIRENT_SIZE + name.len();
        if used + sz > BLOCK {
            blocks.push(start..i);
            start = i;
            used = 0;
        }
        used += sz;
    }
    blocks.push(start..entries.len());
    blocks
}

fn dir_block_len(entries: &[(Vec<u8>, usize, u8)]) -> usize {
    entries.iter().map(|(n, _, _)| DIRENT_SIZE + n.len()).sum()
}

enum Data {
    None,
    /// Bytes right after the inode and its xattrs.
    Inline,
    /// Plain blocks; the address is assigned after the inode table.
    Blocks(usize),
    /// One chunk index (external file).
    Chunk,
}

struct Plan {
    id: InodeId,
    nlink: u32,
    xattrs: Vec<XattrEntry>,
    /// Directory entries (name, index into `plans`, file type), sorted.
    dirents: Vec<(Vec<u8>, usize, u8)>,
    /// Content bytes (directory or symlink), in logical order.
    size: u64,
    data: Data,
    offset: usize,
    blkaddr: u32,
}

impl Plan {
    fn record_len(&self) -> usize {
        INODE_SIZE
            + xattr_size(&self.xattrs)
            + match self.data {
                Data::Inline => self.size as usize,
                Data::Chunk => 4,
                _ => 0,
            }
    }
}

/// Builds the composefs EROFS image of `tree`. Pure: equal trees give equal bytes.
pub fn build_image(tree: &FsTree) -> Result<Vec<u8>, ImageError> {
    let walk = tree.walk();
    let mut index_of = vec![usize::MAX; walk.iter().map(|(id, _)| id + 1).max().unwrap_or(1)];
    for (i, (id, _)) in walk.iter().enumerate() {
        index_of[*id] = i;
    }
    // Parent of each directory, for "..".
    let mut parent = vec![0usize; walk.len()];
    for (i, (id, _)) in walk.iter().enumerate() {
        if let Kind::Dir(children) = &tree.inode(*id).kind {
            for e in children.values() {
                if matches!(tree.inode(e.inode).kind, Kind::Dir(_)) {
                    parent[index_of[e.inode]] = i;
                }
            }
        }
    }

    let mut plans = Vec::with_capacity(walk.len());
    for (i, &(id, nlink)) in walk.iter().enumerate() {
        let inode = tree.inode(id);
        let xattrs = xattr_entries(tree, id)?;
        if xattr_size(&xattrs) > XATTR_IBODY_HEADER + 4 * (usize::from(u16::MAX) - 1) {
            return Err(ImageError::XattrsTooLarge);
        }
        let mut dirents = Vec::new();
        let (size, data) = match &inode.kind {
            Kind::Dir(children) => {
                dirents.push((b".".to_vec(), i, 2));
                dirents.push((b"..".to_vec(), parent[i], 2));
                for (name, e) in children {
                    if name.len() > 255 {
                        return Err(ImageError::NameTooLong {
                            name: String::from_utf8_lossy(name).into_owned(),
                        });
                    }
                    let ft = file_type(&tree.inode(e.inode).kind).1;
                    dirents.push((name.clone(), index_of[e.inode], ft));
                }
                dirents.sort_by(|a, b| a.0.cmp(&b.0));
                let blocks = dir_blocks(&dirents);
                let last = dir_block_len(&dirents[blocks[blocks.len() - 1].clone()]);
                let size = (blocks.len() - 1) * BLOCK + last;
                if blocks.len() == 1 && size <= INLINE_MAX {
                    (size as u64, Data::Inline)
                } else {
                    (size as u64, Data::Blocks(blocks.len()))
                }
            }
            Kind::Symlink(target) => {
                if target.len() >= BLOCK {
                    return Err(ImageError::SymlinkTooLong);
                }
                if target.len() <= INLINE_MAX {
                    (target.len() as u64, Data::Inline)
                } else {
                    (target.len() as u64, Data::Blocks(1))
                }
            }
            Kind::File { size, digest } => {
                if *size > MAX_FILE_SIZE {
                    return Err(ImageError::FileTooLarge(*size));
                }
                match digest {
                    Some(_) => (*size, Data::Chunk),
                    None => (0, Data::None),
                }
            }
            _ => (0, Data::None),
        };
        plans.push(Plan {
            id,
            nlink,
            xattrs,
            dirents,
            size,
            data,
            offset: 0,
            blkaddr: 0,
        });
    }

    // Inode table: each record stays inside one block when it can (inline data must).
    let mut pos = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE;
    for p in &mut plans {
        pos = pos.next_multiple_of(INODE_SLOT);
        let mut len = p.record_len();
        if matches!(p.data, Data::Inline) && len > BLOCK {
            p.data = Data::Blocks(1);
            len = p.record_len();
        }
        if len <= BLOCK && pos % BLOCK + len > BLOCK {
            pos = pos.next_multiple_of(BLOCK);
        }
        p.offset = pos;
        pos += len;
    }
    let mut block = pos.div_ceil(BLOCK);
    for p in &mut plans {
        if let Data::Blocks(n) = p.data {
            p.blkaddr = u32::try_from(block).map_err(|_| ImageError::ImageTooLarge)?;
            block += n;
        }
    }
    let total_blocks = u32::try_from(block).map_err(|_| ImageError::ImageTooLarge)?;
    let nids: Vec<u64> = plans
        .iter()
        .map(|p| (p.offset / INODE_SLOT) as u64)
        .collect();
    let root_nid = u16::try_from(nids[0]).map_err(|_| ImageError::ImageTooLarge)?;

    let mut img = vec![0u8; block * BLOCK];
    // composefs header in the 1 KiB EROFS leaves unused (composefs-rs "V2" style).
    put32(&mut img, 0, COMPOSEFS_MAGIC);
    put32(&mut img, 4, 1);
    put32(&mut img, 12, 2);

    let sb = SUPERBLOCK_OFFSET;
    put32(&mut img, sb, EROFS_MAGIC);
    img[sb + 12] = 12; // blkszbits
    put16(&mut img, sb + 14, root_nid);
    put64(&mut img, sb + 16, plans.len() as u64);
    put32(&mut img, sb + 36, total_blocks);
    put32(&mut img, sb + 80, FEATURE_INCOMPAT_CHUNKED_FILE);

    for (i, p) in plans.iter().enumerate() {
        let inode = tree.inode(p.id);
        let (ifmt, _) = file_type(&inode.kind);
        let (layout, i_u) = match (&p.data, &inode.kind) {
            (Data::Inline, _) => (LAYOUT_FLAT_INLINE, 0),
            (Data::Blocks(_), _) => (LAYOUT_FLAT_PLAIN, p.blkaddr),
            (Data::Chunk, _) => {
                // chunkbits - blkbits, with chunkbits = max(12, ceil(log2(size))).
                let bits = 64 - (p.size.max(2) - 1).leading_zeros();
                (LAYOUT_CHUNK_BASED, bits.max(12) - 12)
            }
            (Data::None, Kind::CharDev(rdev) | Kind::BlockDev(rdev)) => (LAYOUT_FLAT_PLAIN, *rdev),
            (Data::None, _) => (LAYOUT_FLAT_PLAIN, 0),
        };
        let o = p.offset;
        let xsize = xattr_size(&p.xattrs);
        put16(&mut img, o, 1 | (layout << 1));
        let icount = if xsize == 0 {
            0
        } else {
            (xsize - XATTR_IBODY_HEADER) / 4 + 1
        };
        put16(&mut img, o + 2, icount as u16);
        put16(&mut img, o + 4, ifmt | (inode.meta.perm & 0o7777) as u16);
        put64(&mut img, o + 8, p.size);
        put32(&mut img, o + 16, i_u);
        put32(&mut img, o + 20, i as u32);
        put32(&mut img, o + 24, inode.meta.uid);
        put32(&mut img, o + 28, inode.meta.gid);
        put64(&mut img, o + 32, inode.meta.mtime);
        put32(&mut img, o + 40, inode.meta.mtime_nsec);
        put32(&mut img, o + 44, p.nlink);
        let mut x = o + INODE_SIZE;
        if xsize > 0 {
            // ibody header: name filter 0 (feature off), no shared xattrs.
            x += XATTR_IBODY_HEADER;
            for e in &p.xattrs {
                img[x] = e.suffix.len() as u8;
                img[x + 1] = e.index;
                put16(&mut img, x + 2, e.value.len() as u16);
                img[x + 4..x + 4 + e.suffix.len()].copy_from_slice(&e.suffix);
                let v = x + 4 + e.suffix.len();
                img[v..v + e.value.len()].copy_from_slice(&e.value);
                x += (4 + e.suffix.len() + e.value.len()).next_multiple_of(4);
            }
        }
        let data_at = match p.data {
            Data::Inline => Some(x),
            Data::Blocks(_) => Some(p.blkaddr as usize * BLOCK),
            Data::Chunk => {
                put32(&mut img, x, u32::MAX); // EROFS_NULL_ADDR: a hole
                None
            }
            Data::None => None,
        };
        if let Some(at) = data_at {
            match &inode.kind {
                Kind::Symlink(t) => img[at..at + t.len()].copy_from_slice(t),
                Kind::Dir(_) => write_dir(&mut img, at, &p.dirents, &nids),
                _ => {}
            }
        }
    }
    Ok(img)
}

fn write_dir(img: &mut [u8], at: usize, dirents: &[(Vec<u8>, usize, u8)], nids: &[u64]) {
    for (b, range) in dir_blocks(dirents).into_iter().enumerate() {
        let base = at + b * BLOCK;
        let entries = &dirents[range];
        let mut nameoff = DIRENT_SIZE * entries.len();
        for (k, (name, idx, ft)) in entries.iter().enumerate() {
            let d = base + k * DIRENT_SIZE;
            put64(img, d, nids[*idx]);
            put16(img, d + 8, nameoff as u16);
            img[d + 10] = *ft;
            img[base + nameoff..base + nameoff + name.len()].copy_from_slice(name);
            nameoff += name.len();
        }
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
