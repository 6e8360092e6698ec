//! Compression of the archive. All four choices are deterministic here and the
//! compressed three are built into the Debian cloud kernel (`CONFIG_RD_LZ4`,
//! `CONFIG_RD_ZSTD`, `CONFIG_RD_GZIP`).
//!
//! lz4 (the kernel's legacy LZ4 format, `lz4 -l`) is the default: the kernel unpacks
//! the initramfs before `/init` runs, and under TCG (or on a slow CPU) every byte of
//! decompression counts; LZ4 decompresses several times faster than zstd for a file
//! about 1.7x larger (3.4 vs 2.0 MiB here), which costs little where the image is
//! read from a local disk or a fast network. zstd is the choice for slow links
//! (smallest, and still fast to decompress); gzip for old tooling; `none` leaves the
//! cpio archive as it is.
//! The zstd level and the single-threaded encoder are fixed, so the same input gives
//! the same bytes for a given (Cargo.lock-pinned) libzstd. gzip uses a fixed header
//! (mtime 0, no name, OS byte "unknown").

use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    #[default]
    Lz4,
    None,
}

/// The legacy LZ4 frame the kernel's `unlz4` reads: this magic, then blocks of
/// `u32` LE compressed length + one LZ4 block of at most 8 MiB of input. The lz4
/// crates write the newer frame format only, so the framing is written here (eight
/// bytes per block); the blocks come from `lz4_flex`.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// zstd level 19 keeps its window at 8 MiB, well within what the kernel's
/// decompressor accepts.
const ZSTD_LEVEL: i32 = 19;

pub fn compress(data: &[u8], how: Compression) -> std::io::Result<Vec<u8>> {
    match how {
        Compression::Zstd => {
            let mut enc = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
            enc.include_checksum(true)?;
            enc.set_pledged_src_size(Some(data.len() as u64))?;
            enc.write_all(data)?;
            enc.finish()
        }
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(255)
                .write(Vec::new(), flate2::Compression::best());
            enc.write_all(data)?;
            enc.finish()
        }
        Compression::Lz4 => {
            let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
            for block in data.chunks(LZ4_LEGACY_BLOCK) {
                let packed = lz4_flex::block::compress(block);
                let len = u32::try_from(packed.len()).map_err(std::io::Error::other)?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&packed);
            }
            Ok(out)
        }
        Compression::None => Ok(data.to_vec()),
    }
}

pub fn decompress(data: &[u8], how: Compression) -> std::io::Result<Vec<u8>> {
    match how {
        Compression::Zstd => zstd::stream::decode_all(data),
        Compression::Gzip => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out)?;
            Ok(out)
        }
        Compression::Lz4 => {
            let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
            let magic = data.get(..4).ok_or_else(|| bad("lz4: no magic"))?;
            if magic != LZ4_LEGACY_MAGIC.to_le_bytes() {
                return Err(bad("lz4: not the legacy frame"));
            }
            let mut rest = &data[4..];
            let mut out = Vec::new();
            let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
            while !rest.is_empty() {
                let len = rest
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or_else(|| bad("lz4: truncated block length"))?;
                let packed = rest
                    .get(4..4 + len)
                    .ok_or_else(|| bad("lz4: truncated block"))?;
                let n = lz4_flex::block::decompress_into(packed, &mut block)
                    .map_err(std::io::Error::other)?;
                out.extend_from_slice(&block[..n]);
                rest = &rest[4 + len..];
            }
            Ok(out)
        }
        Compression::None => Ok(data.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference `lz4` reads our legacy frame (as the kernel's `unlz4` does).
    #[test]
    fn the_reference_lz4_tool_reads_the_legacy_frame() {
        let Ok(lz4) = which("lz4") else {
            panic!("`lz4` is missing: scripts/setup installs it (Debian package lz4)");
        };
        let data: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let packed = dir.path().join("x.lz4");
        std::fs::write(&packed, compress(&data, Compression::Lz4).unwrap()).unwrap();
        let out = std::process::Command::new(lz4)
            .args(["-d", "-c"])
            .arg(&packed)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, data);
    }

    fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(tool))
                    .find(|f| f.is_file())
            })
            .ok_or(())
    }

    #[test]
    fn every_format_is_deterministic_and_round_trips() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for how in [
            Compression::Zstd,
            Compression::Gzip,
            Compression::Lz4,
            Compression::None,
        ] {
            let a = compress(&data, how).unwrap();
            let b = compress(&data, how).unwrap();
            assert_eq!(a, b, "{how:?}");
            if how == Compression::None {
                assert_eq!(a, data);
            } else {
                assert!(a.len() < data.len() / 4, "{how:?} {}", a.len());
            }
            assert_eq!(decompress(&a, how).unwrap(), data);
        }
        // More than one legacy LZ4 block.
        let big: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i % 7 + i / 4096 % 13) as u8)
            .collect();
        let lz = compress(&big, Compression::Lz4).unwrap();
        assert_eq!(decompress(&lz, Compression::Lz4).unwrap(), big);
        assert!(decompress(&lz[..lz.len() - 3], Compression::Lz4).is_err());
        assert!(decompress(b"junk", Compression::Lz4).is_err());
        let gz = compress(b"x", Compression::Gzip).unwrap();
        // gzip header: magic, method, flags 0, mtime 0, xfl, OS 255.
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
        let zst = compress(b"x", Compression::Zstd).unwrap();
        assert_eq!(&zst[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    }
}
