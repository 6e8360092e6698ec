//! Per-layer table of contents (TOC): what lets a node fetch only the files it lacks.
//!
//! The publisher writes a gzip layer as concatenated gzip members (estargz /
//! zstd:chunked style): the tar headers between files, then each regular file's content
//! as its own member, so `[offset, offset + length)` of the blob decompresses to exactly
//! that file. Concatenated members are one valid gzip stream, so the blob stays an
//! ordinary `tar+gzip` layer for every tool (`tar -xz`, registries, `oras`, `cosign`),
//! with the same `diff_id`.
//!
//! After the tar's members come the TOC members: empty gzip members (they decompress to
//! nothing, so the tar stream is unchanged) whose FEXTRA subfields (`PN`, RFC 1952)
//! carry the gzip-compressed JSON TOC: every tar entry's path, type, metadata and, for
//! regular files, size, fs-verity digest and compressed range. The layer
//! descriptor's annotations name the TOC's range and the sha256 of those bytes; the
//! manifest is signed, so the TOC is trusted once its bytes match.
//!
//! The node then fetches the TOC, range-reads only the members of objects its store
//! lacks, stores each one under the fs-verity digest the TOC names (refused otherwise),
//! and builds the tree from the TOC records through the same [`Unpacker`] code a tar
//! entry goes through; the composefs image it yields is still checked against the
//! signed digest, so a TOC that lies about metadata is caught there.
//!
//! No per-file sha256: the fs-verity digest is what names and checks an object, and a
//! second 32-byte random string per file would grow the TOC by 70% (53 -> 91 KB for
//! 1,000 files).
//!
//! It must never store a fetched byte under a digest it does not hash to, nor trust a
//! TOC whose bytes do not match the signed annotation.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};

use powernode_proto::ErrorCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{stream_error_code, BlobDigestMismatch, CodedStreamError, ModuleErrorCode};
use crate::store::{ObjectStore, StoreError};
use crate::unpack::{kind_of, raw_meta_of, EntryKind, LayerStats, RawMeta, UnpackError, Unpacker};
use crate::verity::{self, VerityDigest};

/// `sha256:HEX` of the TOC's bytes in the layer blob (layer descriptor annotation).
pub const TOC_DIGEST_ANNOTATION: &str = "org.powernode.toc.digest";
/// Byte offset of the TOC in the layer blob (decimal).
pub const TOC_OFFSET_ANNOTATION: &str = "org.powernode.toc.offset";
/// Length of the TOC in the layer blob (decimal).
pub const TOC_SIZE_ANNOTATION: &str = "org.powernode.toc.size";
pub const TOC_VERSION: u32 = 1;
/// The TOC's bytes in the blob; 1,000 files take about 60 KB.
pub const MAX_TOC_SIZE: u64 = 16 << 20;
/// The decompressed JSON.
const MAX_TOC_JSON: u64 = 256 << 20;
const SUBFIELD_ID: &[u8; 2] = b"PN";
/// XLEN is 16 bits and holds the 4-byte subfield header too.
const MAX_SUBFIELD: usize = 65535 - 4;

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("layer annotation {key}: {reason}")]
    Annotation { key: &'static str, reason: String },
    #[error("TOC bytes hash to sha256:{actual}, the signed annotation says {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("TOC malformed: {0}")]
    Malformed(String),
    #[error("range {start}..{end} of the layer: {got} bytes received")]
    ShortRange { start: u64, end: u64, got: u64 },
    #[error("reading a ranged response")]
    Stream(#[source] io::Error),
    #[error("{path}: fetched content")]
    Object {
        path: String,
        #[source]
        source: StoreError,
    },
}

impl ModuleErrorCode for TocError {
    fn code(&self) -> ErrorCode {
        match self {
            TocError::Annotation { .. } | TocError::Malformed(_) => ErrorCode::UnsupportedMediaType,
            TocError::DigestMismatch { .. } | TocError::ShortRange { .. } => {
                ErrorCode::DigestMismatch
            }
            TocError::Object { source, .. } => source.code(),
            TocError::Stream(e) => stream_error_code(e),
        }
    }
}

fn malformed(msg: impl Into<String>) -> TocError {
    TocError::Malformed(msg.into())
}

/// Where the TOC sits in a layer blob, as the layer descriptor's annotations say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLocation {
    pub offset: u64,
    pub size: u64,
    /// `sha256:HEX` of the TOC's bytes.
    pub digest: String,
}

impl TocLocation {
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TOC_DIGEST_ANNOTATION.to_string(), self.digest.clone()),
            (TOC_OFFSET_ANNOTATION.to_string(), self.offset.to_string()),
            (TOC_SIZE_ANNOTATION.to_string(), self.size.to_string()),
        ])
    }

    /// `Ok(None)` for a layer without a TOC (third-party images); an error when the
    /// annotations are there but wrong for a blob of `blob_size` bytes.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        blob_size: u64,
    ) -> Result<Option<Self>, TocError> {
        let Some(digest) = annotations.get(TOC_DIGEST_ANNOTATION) else {
            return Ok(None);
        };
        if !digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(TocError::Annotation {
                key: TOC_DIGEST_ANNOTATION,
                reason: "not sha256:HEX".into(),
            });
        }
        let num = |key: &'static str| {
            annotations
                .get(key)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(TocError::Annotation {
                    key,
                    reason: "missing or not a number".into(),
                })
        };
        let (offset, size) = (num(TOC_OFFSET_ANNOTATION)?, num(TOC_SIZE_ANNOTATION)?);
        if size == 0 || size > MAX_TOC_SIZE || offset.checked_add(size) != Some(blob_size) {
            return Err(TocError::Annotation {
                key: TOC_SIZE_ANNOTATION,
                reason: format!("TOC {offset}+{size} is not the tail of a {blob_size}-byte blob"),
            });
        }
        Ok(Some(Self {
            offset,
            size,
            digest: digest.to_ascii_lowercase(),
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TocType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// One tar entry, in archive order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    /// The entry name exactly as the tar has it (checked again when applied).
    pub path: String,
    #[serde(rename = "type")]
    pub kind: TocType,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtime: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtime_nsec: u32,
    /// Raw xattr names (as in the tar's PAX records) to hex values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Symlink or hardlink target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub major: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub minor: u32,
    /// fs-verity digest of the content (regular files with content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The content's gzip member in the layer blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

/// A TOC entry made ready to apply.
#[derive(Debug, Clone)]
pub struct Record {
    pub path: Vec<u8>,
    pub meta: RawMeta,
    pub kind: EntryKind,
    pub digest: Option<VerityDigest>,
    /// `(offset, length)` of the content member.
    pub range: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

impl TocEntry {
    fn record(&self, data_end: u64) -> Result<Record, TocError> {
        let bad = |what: &str| malformed(format!("{}: {what}", self.path));
        let link = || {
            self.link
                .as_ref()
                .map(|l| l.as_bytes().to_vec())
                .ok_or_else(|| bad("link without a target"))
        };
        let kind = match self.kind {
            TocType::Dir => EntryKind::Dir,
            TocType::Reg => EntryKind::File { size: self.size },
            TocType::Symlink => EntryKind::Symlink(link()?),
            TocType::Hardlink => EntryKind::Hardlink(link()?),
            TocType::Char => EntryKind::CharDev {
                major: self.major,
                minor: self.minor,
            },
            TocType::Block => EntryKind::BlockDev {
                major: self.major,
                minor: self.minor,
            },
            TocType::Fifo => EntryKind::Fifo,
        };
        let (digest, range) = if self.kind == TocType::Reg && self.size > 0 {
            let digest: VerityDigest = self
                .digest
                .as_deref()
                .ok_or_else(|| bad("file without a digest"))?
                .parse()
                .map_err(|_| bad("digest is not sha256:HEX"))?;
            let (Some(offset), Some(length)) = (self.offset, self.length) else {
                return Err(bad("file without a range"));
            };
            if length == 0 || offset.checked_add(length).is_none_or(|e| e > data_end) {
                return Err(bad("range outside the layer's data"));
            }
            (Some(digest), Some((offset, length)))
        } else {
            (None, None)
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in &self.xattrs {
            let value = hex::decode(v).map_err(|_| bad("xattr value is not hex"))?;
            xattrs.insert(k.as_bytes().to_vec(), value);
        }
        Ok(Record {
            path: self.path.as_bytes().to_vec(),
            meta: RawMeta {
                mode: self.mode,
                uid: self.uid,
                gid: self.gid,
                mtime: self.mtime,
                mtime_nsec: self.mtime_nsec,
                xattrs,
            },
            kind,
            digest,
            range,
        })
    }
}

impl Toc {
    /// The entries as records, checked: ranges inside the first `data_end` bytes.
    pub fn records(&self, data_end: u64) -> Result<Vec<Record>, TocError> {
        if self.version != TOC_VERSION {
            return Err(malformed(format!("unknown version {}", self.version)));
        }
        self.entries.iter().map(|e| e.record(data_end)).collect()
    }
}

/// A layer blob written as per-file gzip members, and its TOC if it has one.
#[derive(Debug, Clone)]
pub struct ChunkedLayer {
    pub blob: Vec<u8>,
    pub toc: Option<TocLocation>,
}

fn gzip_member(data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    // `GzEncoder::new` writes mtime 0, no name, OS 255: deterministic.
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(data)?;
    gz.finish()?;
    Ok(())
}

/// Empty gzip members carrying `payload` in FEXTRA `PN` subfields: a fixed header with
/// FLG.FEXTRA, the subfield, an empty final fixed-Huffman block (`03 00`), CRC32 0 and
/// ISIZE 0. Written by hand so both sides agree on every byte.
fn extra_members(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 64);
    for chunk in payload.chunks(MAX_SUBFIELD) {
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff]);
        out.extend_from_slice(&((chunk.len() + 4) as u16).to_le_bytes());
        out.extend_from_slice(SUBFIELD_ID);
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(&[0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
    out
}

/// The inverse of [`extra_members`]: anything else is malformed.
fn parse_extra_members(mut bytes: &[u8]) -> Result<Vec<u8>, TocError> {
    let mut payload = Vec::new();
    while !bytes.is_empty() {
        let head = bytes
            .get(..16)
            .ok_or_else(|| malformed("truncated TOC member"))?;
        if head[..10] != [0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff] || &head[12..14] != SUBFIELD_ID
        {
            return Err(malformed("unexpected TOC member header"));
        }
        let xlen = u16::from_le_bytes([head[10], head[11]]) as usize;
        let len = u16::from_le_bytes([head[14], head[15]]) as usize;
        if xlen != len + 4 {
            return Err(malformed("TOC member extra length"));
        }
        let chunk = bytes
            .get(16..16 + len)
            .ok_or_else(|| malformed("truncated TOC member"))?;
        let tail = bytes
            .get(16 + len..26 + len)
            .ok_or_else(|| malformed("truncated TOC member"))?;
        if tail != [0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0] {
            return Err(malformed("TOC member is not empty"));
        }
        payload.extend_from_slice(chunk);
        bytes = &bytes[26 + len..];
    }
    Ok(payload)
}

/// Writes `tar` as a chunked gzip layer with its TOC. A tar the TOC cannot describe
/// (a name or link that is not UTF-8, an entry the unpacker refuses) gets an ordinary
/// single-member gzip blob and no TOC: nodes then fetch it whole.
pub fn chunked_gzip_layer(tar: &[u8]) -> io::Result<ChunkedLayer> {
    let Some(mut toc) = describe(tar) else {
        let mut blob = Vec::new();
        gzip_member(tar, &mut blob)?;
        return Ok(ChunkedLayer { blob, toc: None });
    };
    let mut blob = Vec::with_capacity(tar.len() / 2);
    let mut cursor = 0usize;
    for e in toc.entries.iter_mut().filter(|e| e.offset.is_some()) {
        // Before `chunked`, `offset` holds the content's position in the tar.
        let pos = e.offset.unwrap_or_default() as usize;
        let end = pos + e.size as usize;
        if pos > cursor {
            gzip_member(&tar[cursor..pos], &mut blob)?;
        }
        let start = blob.len() as u64;
        gzip_member(&tar[pos..end], &mut blob)?;
        e.offset = Some(start);
        e.length = Some(blob.len() as u64 - start);
        cursor = end;
    }
    gzip_member(&tar[cursor..], &mut blob)?;
    let json = serde_json::to_vec(&toc).map_err(io::Error::other)?;
    let mut compressed = Vec::new();
    gzip_member(&json, &mut compressed)?;
    let members = extra_members(&compressed);
    let location = TocLocation {
        offset: blob.len() as u64,
        size: members.len() as u64,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&members))),
    };
    blob.extend_from_slice(&members);
    Ok(ChunkedLayer {
        blob,
        toc: Some(location),
    })
}

/// The TOC of a tar, `offset` set to each content's position in the tar (not yet the
/// blob); `None` when some entry cannot be described.
fn describe(tar: &[u8]) -> Option<Toc> {
    use tar::EntryType as T;
    let mut archive = tar::Archive::new(tar);
    let mut entries = Vec::new();
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        let etype = entry.header().entry_type();
        if matches!(
            etype,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            continue;
        }
        let path = String::from_utf8(entry.path_bytes().into_owned()).ok()?;
        let raw = raw_meta_of(&mut entry, &path).ok()?;
        let kind = kind_of(&entry, &path).ok()?;
        let mut xattrs = BTreeMap::new();
        for (k, v) in &raw.xattrs {
            xattrs.insert(String::from_utf8(k.clone()).ok()?, hex::encode(v));
        }
        let mut e = TocEntry {
            path,
            kind: TocType::Dir,
            mode: raw.mode,
            uid: raw.uid,
            gid: raw.gid,
            mtime: raw.mtime,
            mtime_nsec: raw.mtime_nsec,
            xattrs,
            link: None,
            size: 0,
            major: 0,
            minor: 0,
            digest: None,
            offset: None,
            length: None,
        };
        match kind {
            EntryKind::Dir => {}
            EntryKind::File { size } => {
                e.kind = TocType::Reg;
                e.size = size;
                if size > 0 {
                    let pos = entry.raw_file_position();
                    let content = tar.get(pos as usize..(pos + size) as usize)?;
                    e.digest = Some(verity::digest_bytes(content).to_string());
                    e.offset = Some(pos);
                }
            }
            EntryKind::Symlink(t) | EntryKind::Hardlink(t) => {
                e.kind = if matches!(etype, T::Symlink) {
                    TocType::Symlink
                } else {
                    TocType::Hardlink
                };
                e.link = Some(String::from_utf8(t).ok()?);
            }
            EntryKind::CharDev { major, minor } | EntryKind::BlockDev { major, minor } => {
                e.kind = if etype == T::Char {
                    TocType::Char
                } else {
                    TocType::Block
                };
                (e.major, e.minor) = (major, minor);
            }
            EntryKind::Fifo => e.kind = TocType::Fifo,
        }
        entries.push(e);
    }
    Some(Toc {
        version: TOC_VERSION,
        entries,
    })
}

/// Checks the TOC's bytes (fetched from `loc`) against the signed digest and parses
/// them; every record is validated (ranges inside the data before the TOC).
pub fn decode_toc(bytes: &[u8], loc: &TocLocation) -> Result<Toc, TocError> {
    if bytes.len() as u64 != loc.size {
        return Err(TocError::ShortRange {
            start: loc.offset,
            end: loc.offset + loc.size,
            got: bytes.len() as u64,
        });
    }
    let actual = hex::encode(Sha256::digest(bytes));
    if loc.digest.strip_prefix("sha256:") != Some(actual.as_str()) {
        return Err(TocError::DigestMismatch {
            expected: loc.digest.clone(),
            actual,
        });
    }
    let compressed = parse_extra_members(bytes)?;
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .take(MAX_TOC_JSON + 1)
        .read_to_end(&mut json)
        .map_err(|e| malformed(format!("TOC does not decompress: {e}")))?;
    if json.len() as u64 > MAX_TOC_JSON {
        return Err(malformed("TOC too large"));
    }
    let toc: Toc = serde_json::from_slice(&json).map_err(|e| malformed(e.to_string()))?;
    toc.records(loc.offset)?;
    Ok(toc)
}

/// One ranged read: the blob's bytes `[start, end)` holding the members of `entries`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRange {
    pub start: u64,
    pub end: u64,
    /// Indexes into the TOC's entries, one per missing object.
    pub entries: Vec<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchPlan {
    pub ranges: Vec<FetchRange>,
    pub missing_objects: u64,
    /// Compressed bytes of the members needed, and of the ranges (with the gaps).
    pub member_bytes: u64,
    pub range_bytes: u64,
}

impl Toc {
    /// The ranged reads that fetch every object `have` says is missing (each digest
    /// once): members closer than `max_gap` share a read (one request beats two when
    /// the gap is small), and no read grows past `max_range` unless one member does.
    pub fn plan(
        &self,
        have: impl Fn(&VerityDigest) -> bool,
        max_gap: u64,
        max_range: u64,
        data_end: u64,
    ) -> Result<FetchPlan, TocError> {
        let records = self.records(data_end)?;
        let mut seen = HashSet::new();
        let mut wanted: Vec<(u64, u64, usize)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let (Some(d), Some((off, len))) = (r.digest, r.range) else {
                continue;
            };
            if seen.insert(d) && !have(&d) {
                wanted.push((off, len, i));
            }
        }
        wanted.sort_unstable();
        let mut plan = FetchPlan {
            missing_objects: wanted.len() as u64,
            ..Default::default()
        };
        for (off, len, i) in wanted {
            plan.member_bytes += len;
            let end = off + len;
            match plan.ranges.last_mut() {
                Some(r) if off >= r.end && off - r.end <= max_gap && end - r.start <= max_range => {
                    r.end = end;
                    r.entries.push(i);
                }
                _ => plan.ranges.push(FetchRange {
                    start: off,
                    end,
                    entries: vec![i],
                }),
            }
        }
        plan.range_bytes = plan.ranges.iter().map(|r| r.end - r.start).sum();
        Ok(plan)
    }

    /// Stores the objects of `range` as its bytes stream in (`body`: the response to
    /// a ranged read): gaps are skipped, each member is decompressed straight into the
    /// store under the digest the TOC names (refused, `verity_mismatch`, if it hashes
    /// otherwise). Memory stays bounded whatever the range's size. Returns the digests
    /// stored.
    pub fn store_range<R: Read>(
        &self,
        store: &ObjectStore,
        range: &FetchRange,
        body: R,
        data_end: u64,
    ) -> Result<Vec<VerityDigest>, TocError> {
        let mut body = body.take(range.end - range.start);
        let mut pos = range.start;
        let short = |got: u64| TocError::ShortRange {
            start: range.start,
            end: range.end,
            got,
        };
        let mut stored = Vec::new();
        for &i in &range.entries {
            let entry = self
                .entries
                .get(i)
                .ok_or_else(|| malformed("range names no entry"))?;
            let r = entry.record(data_end)?;
            let (Some(digest), Some((off, len))) = (r.digest, r.range) else {
                return Err(malformed("range names an entry without content"));
            };
            if off < pos || off + len > range.end {
                return Err(malformed("members out of order or outside their range"));
            }
            let gap = off - pos;
            let skipped =
                io::copy(&mut (&mut body).take(gap), &mut io::sink()).map_err(TocError::Stream)?;
            if skipped != gap {
                return Err(short(pos + skipped - range.start));
            }
            let mut member = (&mut body).take(len);
            let reader = Undecodable(
                flate2::read::GzDecoder::new(&mut member).take(entry.size + 1),
                digest,
            );
            let object = |source| TocError::Object {
                path: entry.path.clone(),
                source,
            };
            let ins = store.insert(reader, Some(&digest)).map_err(object)?;
            if ins.size != entry.size {
                // The digest covers the size, so this only happens with a TOC whose
                // size and digest disagree: the content is not what it says.
                return Err(object(StoreError::VerityMismatch {
                    expected: digest,
                    actual: ins.digest,
                }));
            }
            // The decoder may stop before the member's trailer: consume the rest.
            io::copy(&mut member, &mut io::sink()).map_err(TocError::Stream)?;
            if member.limit() > 0 {
                return Err(short(off + len - member.limit() - range.start));
            }
            pos = off + len;
            stored.push(digest);
        }
        Ok(stored)
    }
}

/// A member that does not decompress is not the signed content: reported as
/// `digest_mismatch`, not as an undecodable layer.
struct Undecodable<R>(R, VerityDigest);

impl<R: Read> Read for Undecodable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            // The puller's own errors (a broken connection) keep their code.
            if e.get_ref().is_some_and(|i| i.is::<CodedStreamError>()) {
                return e;
            }
            io::Error::other(BlobDigestMismatch {
                expected: self.1.to_string(),
                actual: format!("<member does not decompress: {e}>"),
            })
        })
    }
}

impl Unpacker<'_> {
    /// Applies a layer from its TOC; every object it names must be in the store (the
    /// puller fetched the missing ones with [`Toc::store_range`]; `fetched` lists them
    /// for the counts).
    pub fn apply_toc(
        &mut self,
        toc: &Toc,
        data_end: u64,
        fetched: &HashSet<VerityDigest>,
    ) -> Result<LayerStats, UnpackError> {
        let records = toc.records(data_end).map_err(|e| UnpackError::BadHeader {
            entry: "<toc>".into(),
            source: io::Error::other(e.to_string()),
        })?;
        self.start_layer();
        let mut fresh = fetched.clone();
        let mut stats = LayerStats::default();
        for r in records {
            self.apply_record(&r.path, &r.meta, r.kind, r.digest, &mut fresh, &mut stats)?;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{build_module, BuildOptions, BuiltModule};
    use crate::testutil::pseudo_random;
    use crate::{install_image_with, InstallError, LayerInput};
    use std::fs;
    use std::path::Path;

    #[test]
    fn extra_members_round_trip_and_decompress_to_nothing() {
        let payload = pseudo_random(150_000, 1);
        let m = extra_members(&payload);
        assert_eq!(parse_extra_members(&m).unwrap(), payload);
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&m[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
        let mut bad = m.clone();
        bad[3] = 0;
        assert!(parse_extra_members(&bad).is_err());
        assert!(parse_extra_members(&m[..m.len() - 1]).is_err());
    }

    fn tree_v1(root: &Path) {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(root.join("f")).unwrap();
        for i in 0..200u64 {
            fs::write(
                root.join(format!("f/{i}")),
                pseudo_random(1000 + i as usize, i),
            )
            .unwrap();
        }
        fs::write(root.join("same-a"), b"twice").unwrap();
        fs::write(root.join("same-b"), b"twice").unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::set_permissions(root.join("f/7"), fs::Permissions::from_mode(0o4750)).unwrap();
        fs::hard_link(root.join("f/3"), root.join("hard")).unwrap();
        std::os::unix::fs::symlink("f/1", root.join("sym")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f".repeat(150)), b"long").unwrap();
    }

    fn build(dir: &Path, scratch: &Path) -> BuiltModule {
        let s = ObjectStore::open(scratch).unwrap();
        build_module(dir, &BuildOptions::default(), &s).unwrap()
    }

    /// What the agent's puller does with a TOC, minus HTTP: the TOC range, the plan,
    /// the ranged reads (`fetch` may tamper with them).
    fn toc_input(
        store: &ObjectStore,
        m: &BuiltModule,
        fetch: impl Fn(&FetchRange) -> Vec<u8>,
    ) -> Result<(LayerInput<&'static [u8]>, FetchPlan), TocError> {
        let loc = m.toc.clone().unwrap();
        let toc_bytes = &m.layer[loc.offset as usize..(loc.offset + loc.size) as usize];
        let toc = decode_toc(toc_bytes, &loc)?;
        let plan = toc.plan(|d| store.contains(d), 4096, 1 << 20, loc.offset)?;
        let mut fetched = HashSet::new();
        for r in &plan.ranges {
            fetched.extend(toc.store_range(store, r, &fetch(r)[..], loc.offset)?);
        }
        Ok((
            LayerInput::Toc {
                toc,
                data_end: loc.offset,
                fetched,
            },
            plan,
        ))
    }

    fn slice(m: &BuiltModule) -> impl Fn(&FetchRange) -> Vec<u8> + '_ {
        |r| m.layer[r.start as usize..r.end as usize].to_vec()
    }

    #[test]
    fn chunked_layer_is_plain_gzip_of_the_same_tar() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree_v1(&src);
        let m = build(&src, &tmp.path().join("s1"));
        assert!(m.toc.is_some());
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&m.layer[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&tar))),
            m.diff_id,
            "the members decompress to exactly the layer's tar"
        );
        // Reproducible, TOC included.
        assert_eq!(m.layer, build(&src, &tmp.path().join("s2")).layer);
        let loc = m.toc.clone().unwrap();
        let back = TocLocation::from_annotations(&loc.annotations(), m.layer.len() as u64);
        assert_eq!(back.unwrap(), Some(loc.clone()));
        assert!(
            TocLocation::from_annotations(&loc.annotations(), 1 + m.layer.len() as u64).is_err()
        );
        assert_eq!(
            TocLocation::from_annotations(&BTreeMap::new(), 10).unwrap(),
            None
        );
    }

    #[test]
    fn toc_pull_rebuilds_the_signed_image_and_fetches_only_the_change() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree_v1(&src);
        let v1 = build(&src, &tmp.path().join("s1"));
        fs::write(src.join("f/100"), pseudo_random(3000, 77)).unwrap();
        let v2 = build(&src, &tmp.path().join("s2"));

        // From an empty store, everything comes through the TOC path too.
        let node = ObjectStore::open(&tmp.path().join("node")).unwrap();
        let (input, plan) = toc_input(&node, &v1, slice(&v1)).unwrap();
        assert_eq!(
            plan.missing_objects, 202,
            "200 files, one shared content, one long name"
        );
        let r = install_image_with(&node, &v1.image_digest, 1, |_| Ok(input_once(&input))).unwrap();
        assert_eq!(r.layers.new_objects, 202);
        assert_eq!(
            fs::read(node.image_path(&v1.image_digest)).unwrap(),
            v1.image
        );

        // v2 after v1: one object, one range, a few KB.
        let (input, plan) = toc_input(&node, &v2, slice(&v2)).unwrap();
        assert_eq!(plan.missing_objects, 1);
        assert_eq!(plan.ranges.len(), 1);
        assert!(plan.range_bytes < 3100, "{plan:?}");
        let r = install_image_with(&node, &v2.image_digest, 1, |_| Ok(input_once(&input))).unwrap();
        assert_eq!((r.layers.new_objects, r.layers.new_bytes), (1, 3000));
        assert_eq!(r.layers.deduplicated_objects, 202);
        assert_eq!(
            fs::read(node.image_path(&v2.image_digest)).unwrap(),
            v2.image
        );
    }

    fn input_once(i: &LayerInput<&'static [u8]>) -> LayerInput<&'static [u8]> {
        match i {
            LayerInput::Toc {
                toc,
                data_end,
                fetched,
            } => LayerInput::Toc {
                toc: toc.clone(),
                data_end: *data_end,
                fetched: fetched.clone(),
            },
            LayerInput::Stream { .. } => unreachable!(),
        }
    }

    #[test]
    fn tampered_ranges_tocs_and_metadata_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree_v1(&src);
        let m = build(&src, &tmp.path().join("s"));
        let loc = m.toc.clone().unwrap();

        // A byte flipped in a fetched range: it does not decompress or does not hash.
        let node = ObjectStore::open(&tmp.path().join("n1")).unwrap();
        let e = toc_input(&node, &m, |r| {
            let mut b = m.layer[r.start as usize..r.end as usize].to_vec();
            let at = b.len() / 2;
            b[at] ^= 0x40;
            b
        })
        .err()
        .unwrap();
        assert!(
            matches!(
                e.code(),
                ErrorCode::DigestMismatch | ErrorCode::VerityMismatch
            ),
            "{e}"
        );
        // A short range.
        let e = toc_input(&node, &m, |r| {
            m.layer[r.start as usize..r.end as usize - 1].to_vec()
        })
        .err()
        .unwrap();
        assert_eq!(e.code(), ErrorCode::DigestMismatch, "{e}");

        // A TOC byte flipped: its signed digest refuses it.
        let mut bytes = m.layer[loc.offset as usize..].to_vec();
        bytes[40] ^= 1;
        let e = decode_toc(&bytes, &loc).unwrap_err();
        assert_eq!(e.code(), ErrorCode::DigestMismatch, "{e}");

        // A TOC that was signed but lies: an entry's digest names other content.
        let good = decode_toc(&m.layer[loc.offset as usize..], &loc).unwrap();
        let mut lying = good.clone();
        let victim = lying.entries.iter_mut().find(|e| e.path == "f/5").unwrap();
        victim.digest = Some(verity::digest_bytes(b"something else").to_string());
        let node = ObjectStore::open(&tmp.path().join("n2")).unwrap();
        let plan = lying
            .plan(|d| node.contains(d), 0, 1 << 20, loc.offset)
            .unwrap();
        let r = plan
            .ranges
            .iter()
            .find(|r| r.entries.iter().any(|&i| lying.entries[i].path == "f/5"))
            .unwrap();
        let e = lying
            .store_range(&node, r, &slice(&m)(r)[..], loc.offset)
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::VerityMismatch, "{e}");

        // A TOC that lies about metadata: the rebuilt image is not the signed one.
        let node = ObjectStore::open(&tmp.path().join("n3")).unwrap();
        let mut lying = good.clone();
        lying
            .entries
            .iter_mut()
            .find(|e| e.path == "f/9")
            .unwrap()
            .mode = 0o777;
        let mut fetched = HashSet::new();
        for r in &lying
            .plan(|_| false, 0, 1 << 20, loc.offset)
            .unwrap()
            .ranges
        {
            fetched.extend(
                lying
                    .store_range(&node, r, &slice(&m)(r)[..], loc.offset)
                    .unwrap(),
            );
        }
        let e = install_image_with(&node, &m.image_digest, 1, |_| {
            Ok(LayerInput::<&[u8]>::Toc {
                toc: lying.clone(),
                data_end: loc.offset,
                fetched: fetched.clone(),
            })
        })
        .unwrap_err();
        assert!(matches!(e, InstallError::Store(_)), "{e}");
        assert_eq!(e.code(), ErrorCode::VerityMismatch, "{e}");

        // Records outside the layer's data, or escaping paths, are refused.
        let mut bad = good.clone();
        bad.entries
            .iter_mut()
            .find(|e| e.path == "f/9")
            .unwrap()
            .offset = Some(loc.offset);
        assert_eq!(
            bad.records(loc.offset).unwrap_err().code(),
            ErrorCode::UnsupportedMediaType
        );
        let mut bad = good.clone();
        bad.entries[0].path = "../escape".into();
        let e = install_image_with(&node, &m.image_digest, 1, |_| {
            Ok(LayerInput::<&[u8]>::Toc {
                toc: bad.clone(),
                data_end: loc.offset,
                fetched: HashSet::new(),
            })
        })
        .unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnsafePath, "{e}");
    }

    #[test]
    fn non_utf8_names_get_no_toc() {
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x").unwrap();
        let m = build(&src, &tmp.path().join("s"));
        assert!(m.toc.is_none());
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&m.layer[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&tar))),
            m.diff_id
        );
    }
}
