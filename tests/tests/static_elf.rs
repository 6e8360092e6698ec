//! The init must be a truly static ELF: a PID 1 that names an interpreter (`PT_INTERP`)
//! needs a dynamic loader the initramfs does not have, and the kernel's only answer is
//! a panic. Builds the musl release-init binary with the harness's one musl build (a
//! no-op when it is fresh, as it is in `scripts/test`) and reads its program headers.

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;

fn field(bytes: &[u8], at: usize, len: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf[..len].copy_from_slice(&bytes[at..at + len]);
    u64::from_le_bytes(buf)
}

/// Program-header types of an ELF64 little-endian file.
fn program_header_types(bytes: &[u8]) -> Vec<u32> {
    assert_eq!(&bytes[..6], b"\x7fELF\x02\x01", "not ELF64 little-endian");
    let phoff = field(bytes, 0x20, 8) as usize;
    let phentsize = field(bytes, 0x36, 2) as usize;
    let phnum = field(bytes, 0x38, 2) as usize;
    (0..phnum)
        .map(|i| field(bytes, phoff + i * phentsize, 4) as u32)
        .collect()
}

#[test]
fn musl_init_has_no_interpreter() {
    let path = powernode_tests::build_musl_inits()
        .unwrap_or_else(|e| panic!("{e:#}"))
        .join("powernode-init");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let types = program_header_types(&bytes);
    assert!(!types.is_empty());
    assert!(
        !types.contains(&PT_INTERP),
        "{} has PT_INTERP: it is not static",
        path.display()
    );
    // static-pie keeps a PT_DYNAMIC for self-relocation; that is fine, an interpreter
    // is not. Check the parser on a dynamic host binary so this test can fail.
    let host = program_header_types(&std::fs::read("/bin/sh").unwrap());
    assert!(host.contains(&PT_INTERP) && host.contains(&PT_DYNAMIC));
}
