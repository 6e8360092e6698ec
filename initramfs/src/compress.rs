//! Compression of the archive. Both formats are deterministic here and both are
//! built into the Debian cloud kernel (`CONFIG_RD_ZSTD`, `CONFIG_RD_GZIP`).
//!
//! zstd is the default: under TCG every instruction of the kernel's decompressor is
//! emulated, and zstd decompresses several times faster than gzip at a smaller size.
//! `none` leaves the cpio archive as it is: no decompression at boot, for a fast
//! local medium (direct kernel boot, a UKI on disk) where bytes cost less than CPU.
//! The zstd level and the single-threaded encoder are fixed, so the same input gives
//! the same bytes for a given (Cargo.lock-pinned) libzstd. gzip uses a fixed header
//! (mtime 0, no name, OS byte "unknown").

use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
    None,
}

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
        Compression::None => Ok(data.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_is_deterministic_and_round_trips() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for how in [Compression::Zstd, Compression::Gzip, Compression::None] {
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
        let gz = compress(b"x", Compression::Gzip).unwrap();
        // gzip header: magic, method, flags 0, mtime 0, xfl, OS 255.
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
        let zst = compress(b"x", Compression::Zstd).unwrap();
        assert_eq!(&zst[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    }
}
