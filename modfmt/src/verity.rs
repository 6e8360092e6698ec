//! fs-verity digests computed in userspace, byte-compatible with the kernel and with
//! `fsverity digest` (fsverity-utils): SHA-256, 4096-byte Merkle blocks, no salt.
//!
//! This is the single entry point the agent uses for fs-verity: the object store names
//! objects by [`VerityDigest`], the composefs image carries these digests in its
//! metacopy xattrs, and the module signature covers the image's digest. It also wraps
//! the two ioctls (enable, measure) behind a small `sys` seam with typed errors.
//!
//! It must never trust a digest it did not compute or the kernel did not measure.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

mod blocks;
#[allow(unsafe_code)]
mod sys;

/// Merkle tree block size (and data block size). 4096 is what the kernel, composefs and
/// fsverity-utils default to; the digest depends on it.
pub const BLOCK_SIZE: usize = 4096;
const HASH_SIZE: usize = 32;
const HASHES_PER_BLOCK: usize = BLOCK_SIZE / HASH_SIZE;
/// `FS_VERITY_HASH_ALG_SHA256`.
pub const HASH_ALG_SHA256: u8 = 1;
const LOG_BLOCK_SIZE: u8 = 12;

/// Below this many whole blocks in one `update`, a second thread costs more than it
/// saves: a scoped spawn + join is ~20 us, while SHA-NI hashes 1 MiB in ~0.7 ms.
const PARALLEL_MIN_BLOCKS: usize = 256;
/// Read size of [`digest_reader`]: large enough that the per-chunk thread fan-out is
/// amortised, small enough to stay in cache. Two such buffers are in flight (read-ahead);
/// the `verity_throughput` benchmark shows what that buys over read-then-hash.
const READ_CHUNK: usize = 4 << 20;

/// A SHA-256 fs-verity file digest (the digest of the fs-verity descriptor).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerityDigest(pub [u8; HASH_SIZE]);

impl VerityDigest {
    pub fn as_bytes(&self) -> &[u8; HASH_SIZE] {
        &self.0
    }

    /// Lowercase hex, no prefix (the object store's naming).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// `sha256:HEX`, the form `fsverity digest` prints.
impl fmt::Display for VerityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for VerityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseDigestError {
    #[error("fs-verity digest must be sha256:<64 hex digits>")]
    Malformed,
}

/// Accepts `sha256:HEX` or bare `HEX` (64 lowercase or uppercase hex digits).
impl FromStr for VerityDigest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        if hex_part.len() != 2 * HASH_SIZE {
            return Err(ParseDigestError::Malformed);
        }
        let mut out = [0u8; HASH_SIZE];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| ParseDigestError::Malformed)?;
        Ok(Self(out))
    }
}

/// How many threads hash the data blocks of one large `update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One thread, always.
    One,
    /// Up to `available_parallelism()` threads, for large updates only.
    Auto,
    /// Exactly this many for large updates (benchmarks).
    Fixed(usize),
}

impl Threads {
    fn count(self) -> usize {
        match self {
            Threads::One => 1,
            Threads::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Threads::Fixed(n) => n.max(1),
        }
    }
}

/// Streaming fs-verity hasher: feed bytes with [`update`](Self::update) (or `io::Write`),
/// then [`finalize`](Self::finalize). Memory is bounded by one block per tree level.
pub struct VerityHasher {
    /// Partial data block not yet hashed.
    pending: Box<[u8; BLOCK_SIZE]>,
    pending_len: usize,
    data_size: u64,
    /// Per tree level: the hash block being filled and how many hashes it holds.
    levels: Vec<Level>,
    threads: usize,
}

struct Level {
    block: Box<[u8; BLOCK_SIZE]>,
    filled: usize,
    /// Hashes pushed into this level so far, over the whole file.
    total: u64,
}

impl Level {
    fn new() -> Self {
        Self {
            block: Box::new([0u8; BLOCK_SIZE]),
            filled: 0,
            total: 0,
        }
    }
}

impl Default for VerityHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for VerityHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerityHasher")
            .field("data_size", &self.data_size)
            .field("levels", &self.levels.len())
            .field("threads", &self.threads)
            .finish()
    }
}

fn hash_block(block: &[u8]) -> [u8; HASH_SIZE] {
    blocks::one(block)
}

/// Leaf hashes of whole data blocks, split over `threads` scoped threads.
fn hash_blocks(data: &[u8], threads: usize, out: &mut Vec<[u8; HASH_SIZE]>) {
    let n = data.len() / BLOCK_SIZE;
    let start = out.len();
    out.resize(start + n, [0u8; HASH_SIZE]);
    let dst = &mut out[start..];
    let data = &data[..n * BLOCK_SIZE];
    if threads <= 1 || n < PARALLEL_MIN_BLOCKS {
        blocks::many(data, dst);
        return;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (dst, src) in dst.chunks_mut(per).zip(data.chunks(per * BLOCK_SIZE)) {
            s.spawn(move || blocks::many(src, dst));
        }
    });
}

impl VerityHasher {
    /// Single-threaded hasher.
    pub fn new() -> Self {
        Self::with_threads(Threads::One)
    }

    pub fn with_threads(threads: Threads) -> Self {
        Self {
            pending: Box::new([0u8; BLOCK_SIZE]),
            pending_len: 0,
            data_size: 0,
            levels: Vec::new(),
            threads: threads.count(),
        }
    }

    /// Bytes fed so far.
    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    fn push_hash(&mut self, level: usize, hash: &[u8; HASH_SIZE]) {
        let mut level = level;
        let mut hash = *hash;
        loop {
            if self.levels.len() <= level {
                self.levels.push(Level::new());
            }
            let l = &mut self.levels[level];
            l.block[l.filled * HASH_SIZE..(l.filled + 1) * HASH_SIZE].copy_from_slice(&hash);
            l.filled += 1;
            l.total += 1;
            if l.filled < HASHES_PER_BLOCK {
                return;
            }
            // A full hash block: its hash goes one level up.
            hash = hash_block(&l.block[..]);
            l.filled = 0;
            level += 1;
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.data_size += data.len() as u64;
        if self.pending_len > 0 {
            let take = (BLOCK_SIZE - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < BLOCK_SIZE {
                return;
            }
            let h = hash_block(&self.pending[..]);
            self.push_hash(0, &h);
            self.pending_len = 0;
        }
        let whole = data.len() / BLOCK_SIZE * BLOCK_SIZE;
        if whole > 0 {
            let mut leaves = Vec::with_capacity(whole / BLOCK_SIZE);
            hash_blocks(&data[..whole], self.threads, &mut leaves);
            for h in &leaves {
                self.push_hash(0, h);
            }
        }
        let rest = &data[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The Merkle tree root hash (all zeros for an empty file).
    fn root_hash(&mut self) -> [u8; HASH_SIZE] {
        if self.pending_len > 0 {
            // The last data block is zero-padded.
            self.pending[self.pending_len..].fill(0);
            let h = hash_block(&self.pending[..]);
            self.push_hash(0, &h);
            self.pending_len = 0;
        }
        let mut level = 0;
        loop {
            let Some(l) = self.levels.get_mut(level) else {
                // No data blocks at all.
                return [0u8; HASH_SIZE];
            };
            if l.total == 1 {
                // A level with one hash is the top: that hash is the root (for a
                // one-block file, the hash of the data block itself).
                let mut root = [0u8; HASH_SIZE];
                root.copy_from_slice(&l.block[..HASH_SIZE]);
                return root;
            }
            if l.filled > 0 {
                l.block[l.filled * HASH_SIZE..].fill(0);
                let h = hash_block(&l.block[..]);
                l.filled = 0;
                self.push_hash(level + 1, &h);
            }
            level += 1;
        }
    }

    pub fn finalize(mut self) -> VerityDigest {
        let root = self.root_hash();
        VerityDigest(descriptor_digest(self.data_size, &root))
    }
}

/// SHA-256 of `struct fsverity_descriptor` (256 bytes, little endian).
fn descriptor_digest(data_size: u64, root: &[u8; HASH_SIZE]) -> [u8; HASH_SIZE] {
    let mut d = [0u8; 256];
    d[0] = 1; // version
    d[1] = HASH_ALG_SHA256;
    d[2] = LOG_BLOCK_SIZE;
    d[3] = 0; // salt_size
              // 4..8: sig_size (reserved, 0)
    d[8..16].copy_from_slice(&data_size.to_le_bytes());
    d[16..16 + HASH_SIZE].copy_from_slice(root); // root_hash[64], rest zero
                                                 // 80..112 salt, 112..256 reserved: zero
    Sha256::digest(d).into()
}

impl io::Write for VerityHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Digest of an in-memory byte string.
pub fn digest_bytes(data: &[u8]) -> VerityDigest {
    let mut h = VerityHasher::new();
    h.update(data);
    h.finalize()
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn fill<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Streams `reader` to the end and returns its digest. With more than one thread the
/// next chunk is read while the current one is hashed, and the leaf level of large
/// chunks is split across threads.
pub fn digest_reader<R: Read + Send>(mut reader: R, threads: Threads) -> io::Result<VerityDigest> {
    let mut h = VerityHasher::with_threads(threads);
    if h.threads <= 1 {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = fill(&mut reader, &mut buf)?;
            h.update(&buf[..n]);
            if n < buf.len() {
                return Ok(h.finalize());
            }
        }
    }
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(1);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        // Cannot fail: the receiver is alive and the channel has room for both.
        let _ = free_tx.send(vec![0u8; READ_CHUNK]);
    }
    let result = std::thread::scope(|s| {
        s.spawn(move || {
            while let Ok(mut buf) = free_rx.recv() {
                let r = fill(&mut reader, &mut buf);
                let last = !matches!(r, Ok(n) if n == buf.len());
                if full_tx.send(r.map(|n| (buf, n))).is_err() || last {
                    return;
                }
            }
        });
        // Both channel ends are moved in here and dropped on every exit path, so the
        // reader thread always ends and the scope can join it.
        let (free_tx, full_rx) = (free_tx, full_rx);
        loop {
            match full_rx.recv() {
                Ok(Ok((buf, n))) => {
                    h.update(&buf[..n]);
                    if n < buf.len() {
                        return Ok(());
                    }
                    let _ = free_tx.send(buf);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
        }
    });
    result.map(|()| h.finalize())
}

/// Digest of a file, both cores when it pays.
pub fn digest_file(path: &Path) -> Result<VerityDigest, VerityError> {
    let f = std::fs::File::open(path).map_err(VerityError::Io)?;
    digest_reader(f, Threads::Auto).map_err(VerityError::Io)
}

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("i/o")]
    Io(#[source] io::Error),
    /// EOPNOTSUPP / ENOTTY: the filesystem (or kernel) has no fs-verity.
    #[error("filesystem does not support fs-verity")]
    NotSupported,
    #[error("fs-verity is already enabled")]
    AlreadyEnabled,
    /// ETXTBSY: a writable descriptor is still open on the file.
    #[error("file is open for writing")]
    OpenForWrite,
    /// ENODATA from measure: the file has no fs-verity.
    #[error("fs-verity is not enabled on the file")]
    NotEnabled,
    #[error("kernel measured an unexpected digest algorithm {0}")]
    UnexpectedAlgorithm(u16),
    #[error("fs-verity ioctl failed")]
    Sys(#[source] io::Error),
}

/// Enables fs-verity (SHA-256, 4096-byte blocks, no salt) on an open, read-only file.
/// Afterwards the kernel checks every read against the Merkle tree.
pub fn enable(fd: impl AsFd) -> Result<(), VerityError> {
    sys::enable_verity(fd.as_fd())
}

/// The kernel's digest of a file with fs-verity enabled.
pub fn measure(fd: impl AsFd) -> Result<VerityDigest, VerityError> {
    sys::measure_verity(fd.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use std::process::Command;

    /// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// `fsverity` from fsverity-utils (installed by `scripts/tools` when missing);
    /// missing fails the test naming it.
    fn fsverity_tool() -> PathBuf {
        crate::testutil::test_tool("fsverity").unwrap_or_else(|| {
            panic!("`fsverity` (fsverity-utils) is missing: scripts/setup installs it")
        })
    }

    fn tool_digest(tool: &Path, file: &Path) -> String {
        let out = Command::new(tool).arg("digest").arg(file).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        line.split_whitespace().next().unwrap().to_string()
    }

    #[test]
    fn empty_file_digest_is_the_known_value() {
        assert_eq!(
            digest_bytes(b"").to_string(),
            "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
        );
    }

    #[test]
    fn matches_fsverity_digest_tool() {
        let tool = fsverity_tool();
        let dir = tempfile::tempdir().unwrap();
        let mut sizes = vec![0usize, 1, 4095, 4096, 4097, (1 << 20) + 1];
        // Tree-shape edges: exactly one full level-1 hash block, and one past it.
        sizes.extend([128 * 4096, 128 * 4096 + 1, 128 * 128 * 4096 + 4096]);
        let mut seed = 0x5eed_u64;
        for s in [7usize, 9000, 123_457, 3_000_001] {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            sizes.push(s + (seed as usize % 4096));
        }
        for (i, size) in sizes.into_iter().enumerate() {
            let data = pseudo_random(size, i as u64 + 1);
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, &data).unwrap();
            let expected = tool_digest(&tool, &path);
            assert_eq!(digest_bytes(&data).to_string(), expected, "size {size}");
            let parallel = digest_reader(&data[..], Threads::Fixed(2)).unwrap();
            assert_eq!(parallel.to_string(), expected, "size {size}, 2 threads");
            assert_eq!(digest_file(&path).unwrap().to_string(), expected);
        }
    }

    #[test]
    fn streaming_in_odd_pieces_equals_one_shot() {
        let data = pseudo_random(5 * 4096 * 129 + 77, 42);
        let want = digest_bytes(&data);
        for piece in [1usize, 3, 4095, 4097, 65_537, 2 << 20] {
            let mut h = VerityHasher::with_threads(Threads::Fixed(2));
            for c in data.chunks(piece) {
                h.write_all(c).unwrap();
            }
            assert_eq!(h.data_size(), data.len() as u64);
            assert_eq!(h.finalize(), want, "piece {piece}");
        }
    }

    #[test]
    fn interleaved_block_hashes_equal_sha2() {
        // Odd and even counts (the last block of an odd run goes through sha2 alone),
        // and blocks that differ in their last byte only.
        for n in [1usize, 2, 3, 8, 17] {
            let mut data = pseudo_random(n * BLOCK_SIZE, n as u64 + 7);
            if n >= 2 {
                data[BLOCK_SIZE - 1] ^= 1;
            }
            let mut fast = vec![[0u8; HASH_SIZE]; n];
            let mut portable = vec![[1u8; HASH_SIZE]; n];
            blocks::many(&data, &mut fast);
            blocks::many_portable(&data, &mut portable);
            assert_eq!(fast, portable, "{n} blocks");
            let plain: Vec<[u8; HASH_SIZE]> = data
                .chunks_exact(BLOCK_SIZE)
                .map(|b| Sha256::digest(b).into())
                .collect();
            assert_eq!(fast, plain, "{n} blocks");
        }
        #[cfg(target_arch = "x86_64")]
        if blocks::shani::available() {
            let a = pseudo_random(BLOCK_SIZE, 1);
            let b = vec![0u8; BLOCK_SIZE];
            let (mut oa, mut ob) = ([0u8; HASH_SIZE], [0u8; HASH_SIZE]);
            blocks::shani::two(&a, &b, &mut oa, &mut ob);
            assert_eq!(oa, <[u8; HASH_SIZE]>::from(Sha256::digest(&a)));
            assert_eq!(ob, <[u8; HASH_SIZE]>::from(Sha256::digest(&b)));
        }
    }

    /// Leaf hashing alone, interleaved vs one block at a time (prints, never fails on
    /// time): `cargo test -p powernode-modfmt --release block_hash_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn block_hash_throughput() {
        let data = pseudo_random(64 << 20, 5);
        let mut out = vec![[0u8; HASH_SIZE]; data.len() / BLOCK_SIZE];
        let mut best = |f: &mut dyn FnMut(&mut [[u8; HASH_SIZE]])| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f(&mut out);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        let fast = best(&mut |o| blocks::many(&data, o));
        let portable = best(&mut |o| blocks::many_portable(&data, o));
        println!(
            "bench: 64 MiB of 4 KiB leaves: interleaved {:.0} MiB/s, one at a time {:.0} MiB/s ({:.2}x)",
            64.0 / fast,
            64.0 / portable,
            portable / fast
        );
    }

    #[test]
    fn one_flipped_byte_changes_the_digest() {
        let mut data = pseudo_random(3 * 4096 + 5, 7);
        let a = digest_bytes(&data);
        data[4096 + 17] ^= 1;
        assert_ne!(a, digest_bytes(&data));
        // Trailing zeros are not padding: the size is part of the descriptor.
        let b = digest_bytes(&data);
        data.push(0);
        assert_ne!(b, digest_bytes(&data));
    }

    #[test]
    fn parses_and_formats() {
        let d = digest_bytes(b"x");
        let s = d.to_string();
        assert_eq!(s.parse::<VerityDigest>().unwrap(), d);
        assert_eq!(d.to_hex().parse::<VerityDigest>().unwrap(), d);
        assert!("sha256:abc".parse::<VerityDigest>().is_err());
        assert!(format!("sha256:{}", "g".repeat(64))
            .parse::<VerityDigest>()
            .is_err());
    }

    /// tmpfs has no fs-verity on any kernel; on this host no filesystem has it. Either
    /// way the seam must say "not supported", not a generic error.
    #[test]
    fn enable_and_measure_on_tmpfs_say_not_supported() {
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "no /dev/shm: this test needs a tmpfs there");
        let f = tempfile::tempfile_in(shm).unwrap();
        assert!(matches!(enable(&f), Err(VerityError::NotSupported)));
        assert!(matches!(measure(&f), Err(VerityError::NotSupported)));
    }

    /// On a filesystem with verity support (the VM's ext4) this enables and measures;
    /// elsewhere it must report NotSupported.
    #[test]
    fn enable_then_measure_agrees_with_userspace_where_supported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obj");
        let data = pseudo_random(10_000, 3);
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        match enable(&f) {
            Ok(()) => assert_eq!(measure(&f).unwrap(), digest_bytes(&data)),
            Err(VerityError::NotSupported) => {
                eprintln!("fs-verity not supported here: checked the typed error only");
                assert!(matches!(
                    measure(&f),
                    Err(VerityError::NotSupported | VerityError::NotEnabled)
                ));
            }
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }

    /// Benchmark, not a test: `cargo test -p powernode-agent --release -- --ignored
    /// verity_throughput --nocapture`. Prints our throughput (1 and 2 threads) and that
    /// of `fsverity digest` on the same 1 GiB file (page-cached).
    #[test]
    #[ignore]
    fn verity_throughput() {
        let size: usize = std::env::var("VERITY_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
            << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench");
        {
            let mut f = std::fs::File::create(&path).unwrap();
            let chunk = pseudo_random(8 << 20, 99);
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                f.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
        }
        let mib = size as f64 / (1 << 20) as f64;
        // CPU seconds of this process and of its waited-for children (/proc/self/stat
        // utime+stime, cutime+cstime): a figure the other load on a shared machine
        // does not inflate the way it inflates wall time.
        let cpu = || {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let f: Vec<f64> = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest.split(' ').map(|x| x.parse().unwrap_or(0.0)).collect())
                .unwrap_or_default();
            let tick = 100.0;
            let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
            // Fields after the command: utime is the 12th (index 11), then stime,
            // cutime, cstime.
            get(11) + get(12) + get(13) + get(14)
        };
        let time = |f: &dyn Fn() -> String| {
            let _ = f(); // warm the page cache
            let mut best = f64::MAX;
            let mut out = String::new();
            let c0 = cpu();
            for _ in 0..3 {
                let t = std::time::Instant::now();
                out = f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("    cpu {:.2} s per pass", (cpu() - c0) / 3.0);
            (out, best)
        };
        let (d1, t1) = time(&|| {
            digest_reader(std::fs::File::open(&path).unwrap(), Threads::One)
                .unwrap()
                .to_string()
        });
        let (d2, t2) = time(&|| {
            digest_reader(std::fs::File::open(&path).unwrap(), Threads::Fixed(2))
                .unwrap()
                .to_string()
        });
        // The same two threads without read-ahead, to show what the pipeline buys.
        let (d3, t3) = time(&|| {
            let mut f = std::fs::File::open(&path).unwrap();
            let mut h = VerityHasher::with_threads(Threads::Fixed(2));
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                let n = fill(&mut f, &mut buf).unwrap();
                h.update(&buf[..n]);
                if n < buf.len() {
                    break h.finalize().to_string();
                }
            }
        });
        assert_eq!(d1, d2);
        assert_eq!(d1, d3);
        println!("ours, 1 thread : {:8.1} MiB/s ({t1:.3} s)", mib / t1);
        println!("ours, 2 threads: {:8.1} MiB/s ({t2:.3} s)", mib / t2);
        println!("  (no read-ahead: {:8.1} MiB/s ({t3:.3} s))", mib / t3);
        let tool = fsverity_tool();
        let (dt, tt) = time(&|| tool_digest(&tool, &path));
        assert_eq!(dt, d1);
        println!("fsverity digest: {:8.1} MiB/s ({tt:.3} s)", mib / tt);
        println!("ratio 1 thread : {:.2}x", tt / t1);
        println!("ratio 2 threads: {:.2}x", tt / t2);
    }
}
