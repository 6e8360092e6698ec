//! The one place this crate issues fs-verity ioctls.

use super::{VerityDigest, VerityError, BLOCK_SIZE, HASH_ALG_SHA256, HASH_SIZE};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Setter, Updater};
use std::os::fd::BorrowedFd;

/// `struct fsverity_enable_arg` (linux/fsverity.h).
#[repr(C)]
#[derive(Debug)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// `struct fsverity_digest` with room for the largest digest (SHA-512).
#[repr(C)]
struct MeasureArg {
    digest_algorithm: u16,
    digest_size: u16,
    digest: [u8; 64],
}

/// `_IOW('f', 133, struct fsverity_enable_arg)`.
const FS_IOC_ENABLE_VERITY: u32 = opcode::write::<EnableArg>(b'f', 133);
/// `_IOWR('f', 134, struct fsverity_digest)`: the header only, the flexible array
/// follows.
const FS_IOC_MEASURE_VERITY: u32 = opcode::read_write::<[u16; 2]>(b'f', 134);

fn map(e: Errno) -> VerityError {
    match e {
        Errno::OPNOTSUPP | Errno::NOTTY => VerityError::NotSupported,
        Errno::EXIST => VerityError::AlreadyEnabled,
        Errno::TXTBSY => VerityError::OpenForWrite,
        Errno::NODATA => VerityError::NotEnabled,
        e => VerityError::Sys(e.into()),
    }
}

pub(super) fn enable_verity(fd: BorrowedFd<'_>) -> Result<(), VerityError> {
    let arg = EnableArg {
        version: 1,
        hash_algorithm: u32::from(HASH_ALG_SHA256),
        block_size: BLOCK_SIZE as u32,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: FS_IOC_ENABLE_VERITY takes a pointer to a `struct fsverity_enable_arg`,
    // which `EnableArg` mirrors field for field (repr(C), 128 bytes); salt and
    // signature pointers are null with zero sizes, so the kernel reads nothing else.
    unsafe { ioctl(fd, Setter::<FS_IOC_ENABLE_VERITY, EnableArg>::new(arg)) }.map_err(map)
}

pub(super) fn measure_verity(fd: BorrowedFd<'_>) -> Result<VerityDigest, VerityError> {
    let mut arg = MeasureArg {
        digest_algorithm: 0,
        digest_size: 64,
        digest: [0; 64],
    };
    // SAFETY: FS_IOC_MEASURE_VERITY reads `digest_size` from the header and writes at
    // most that many bytes after it; `MeasureArg` has exactly 64 bytes there.
    unsafe {
        ioctl(
            fd,
            Updater::<FS_IOC_MEASURE_VERITY, MeasureArg>::new(&mut arg),
        )
    }
    .map_err(map)?;
    if arg.digest_algorithm != u16::from(HASH_ALG_SHA256)
        || usize::from(arg.digest_size) != HASH_SIZE
    {
        return Err(VerityError::UnexpectedAlgorithm(arg.digest_algorithm));
    }
    let mut out = [0u8; HASH_SIZE];
    out.copy_from_slice(&arg.digest[..HASH_SIZE]);
    Ok(VerityDigest(out))
}

#[cfg(test)]
#[test]
fn layouts_match_the_kernel() {
    assert_eq!(std::mem::size_of::<EnableArg>(), 128);
    assert_eq!(FS_IOC_ENABLE_VERITY, 0x4080_6685);
    assert_eq!(FS_IOC_MEASURE_VERITY, 0xc004_6686);
}
