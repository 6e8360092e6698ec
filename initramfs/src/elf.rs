//! The one ELF question the builder asks of the init: does it name an interpreter?
//! A PID 1 with `PT_INTERP` needs a dynamic loader the initramfs does not have, and
//! the kernel's only answer to that is a panic, so the builder refuses it up front.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("program header table is out of bounds")]
    Truncated,
}

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The `PT_INTERP` path of an ELF64 executable, `None` when it is static.
pub fn interpreter(bytes: &[u8]) -> Result<Option<String>, ElfError> {
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64_at(bytes, 0x20).ok_or(ElfError::Truncated)? as usize;
    let phentsize = u16_at(bytes, 0x36).ok_or(ElfError::Truncated)? as usize;
    let phnum = u16_at(bytes, 0x38).ok_or(ElfError::Truncated)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(bytes, ph).ok_or(ElfError::Truncated)? == PT_INTERP {
            let off = u64_at(bytes, ph + 8).ok_or(ElfError::Truncated)? as usize;
            let size = u64_at(bytes, ph + 32).ok_or(ElfError::Truncated)? as usize;
            let raw = bytes.get(off..off + size).ok_or(ElfError::Truncated)?;
            let path = raw.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_host_binaries_have_an_interpreter() {
        let ls = std::fs::read("/bin/ls").unwrap();
        let interp = interpreter(&ls).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(interpreter(b"#!/bin/sh\n"), Err(ElfError::NotElf64));
        assert_eq!(
            interpreter(b"\x7fELF\x02\x01\0\0"),
            Err(ElfError::Truncated)
        );
    }
}
