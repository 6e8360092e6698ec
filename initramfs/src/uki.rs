//! A unified kernel image (UKI): systemd-stub (`linuxx64.efi.stub`, a PE32+ EFI
//! application) with the kernel, initramfs, command line and os-release appended as
//! PE sections `.osrel`, `.cmdline`, `.uname`, `.initrd` and `.linux` (the layout
//! systemd's `ukify` writes; the stub finds its payload by section name).
//!
//! Written here rather than with `objcopy` so the bytes depend on the inputs only:
//! the stub's own timestamp is kept, new sections are placed at fixed, aligned
//! offsets after the stub's, and the PE checksum is recomputed. Nothing is executed.

use std::ops::Range;

/// PE section characteristics of a payload section: initialized data, readable.
const SCN_DATA_READ: u32 = 0x0000_0040 | 0x4000_0000;
const SECTION_HEADER_LEN: usize = 40;
const PE32_PLUS: u16 = 0x20b;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UkiError {
    #[error("the stub is not a PE32+ image: {0}")]
    NotPe(&'static str),
    #[error("section name {0:?} is longer than 8 bytes")]
    LongName(String),
    #[error("the stub already has a {0} section")]
    Duplicate(String),
    #[error("the stub's headers have room for {room} more section headers, {needed} needed")]
    NoRoom { room: usize, needed: usize },
    #[error("the image would exceed 4 GiB")]
    TooLarge,
}

/// One payload section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub data: Vec<u8>,
}

impl Section {
    pub fn new(name: &str, data: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.to_string(),
            data: data.into(),
        }
    }
}

/// What goes into the UKI besides the stub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UkiInputs<'a> {
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub cmdline: &'a str,
    pub os_release: &'a str,
    /// `uname -r` of the kernel (the stub reports it; optional for the boot).
    pub uname: &'a str,
}

/// The payload sections in `ukify`'s order: the kernel last, since it may grow into
/// the space after its file data when it is decompressed in place.
pub fn sections(inputs: &UkiInputs<'_>) -> Vec<Section> {
    vec![
        Section::new(".osrel", inputs.os_release.as_bytes()),
        Section::new(".cmdline", inputs.cmdline.as_bytes()),
        Section::new(".uname", inputs.uname.as_bytes()),
        Section::new(".initrd", inputs.initrd),
        Section::new(".linux", inputs.kernel),
    ]
}

/// Builds the UKI from the stub's bytes.
pub fn build(stub: &[u8], inputs: &UkiInputs<'_>) -> Result<Vec<u8>, UkiError> {
    append_sections(stub, &sections(inputs))
}

fn align(value: u64, to: u64) -> u64 {
    if to <= 1 {
        value
    } else {
        value.div_ceil(to) * to
    }
}

fn rd16(b: &[u8], at: usize) -> Result<u16, UkiError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(UkiError::NotPe("truncated header"))
}

fn rd32(b: &[u8], at: usize) -> Result<u32, UkiError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(UkiError::NotPe("truncated header"))
}

fn wr16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn wr32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Offsets of the fields this module reads and writes.
#[derive(Debug)]
struct Layout {
    coff: usize,
    opt: usize,
    table: usize,
    nsections: usize,
    section_alignment: u64,
    file_alignment: u64,
    size_of_headers: u64,
}

fn layout(pe: &[u8]) -> Result<Layout, UkiError> {
    if pe.get(..2) != Some(b"MZ") {
        return Err(UkiError::NotPe("no MZ signature"));
    }
    let pe_off = rd32(pe, 0x3c)? as usize;
    if pe.get(pe_off..pe_off + 4) != Some(b"PE\0\0") {
        return Err(UkiError::NotPe("no PE signature"));
    }
    let coff = pe_off + 4;
    let nsections = rd16(pe, coff + 2)? as usize;
    let opt_len = rd16(pe, coff + 16)? as usize;
    let opt = coff + 20;
    if rd16(pe, opt)? != PE32_PLUS {
        return Err(UkiError::NotPe("optional header is not PE32+"));
    }
    let l = Layout {
        coff,
        opt,
        table: opt + opt_len,
        nsections,
        section_alignment: rd32(pe, opt + 32)?.into(),
        file_alignment: rd32(pe, opt + 36)?.into(),
        size_of_headers: rd32(pe, opt + 60)?.into(),
    };
    if l.section_alignment == 0 || l.file_alignment == 0 {
        return Err(UkiError::NotPe("zero alignment"));
    }
    Ok(l)
}

/// An existing section header: name, virtual range, raw file range.
fn section_header(pe: &[u8], at: usize) -> Result<(String, Range<u64>, Range<u64>), UkiError> {
    let name = pe
        .get(at..at + 8)
        .ok_or(UkiError::NotPe("truncated section table"))?;
    let name = String::from_utf8_lossy(name)
        .trim_end_matches('\0')
        .to_string();
    let vsize = u64::from(rd32(pe, at + 8)?);
    let va = u64::from(rd32(pe, at + 12)?);
    let raw_size = u64::from(rd32(pe, at + 16)?);
    let raw_ptr = u64::from(rd32(pe, at + 20)?);
    Ok((name, va..va + vsize, raw_ptr..raw_ptr + raw_size))
}

/// Appends `sections` to a PE32+ image: each at the next section-aligned virtual
/// address and file-aligned offset after everything already there.
pub fn append_sections(stub: &[u8], sections: &[Section]) -> Result<Vec<u8>, UkiError> {
    let l = layout(stub)?;
    let mut end_va = 0u64;
    let mut end_raw = l.size_of_headers;
    let mut first_raw = u64::MAX;
    for i in 0..l.nsections {
        let (name, va, raw) = section_header(stub, l.table + i * SECTION_HEADER_LEN)?;
        if sections.iter().any(|s| s.name == name) {
            return Err(UkiError::Duplicate(name));
        }
        end_va = end_va.max(va.end);
        end_raw = end_raw.max(raw.end);
        if raw.start > 0 {
            first_raw = first_raw.min(raw.start);
        }
    }
    // New headers must fit before the first section's data and inside SizeOfHeaders.
    let table_end = (l.table + l.nsections * SECTION_HEADER_LEN) as u64;
    let limit = l.size_of_headers.min(first_raw);
    let room = (limit.saturating_sub(table_end) / SECTION_HEADER_LEN as u64) as usize;
    if room < sections.len() {
        return Err(UkiError::NoRoom {
            room,
            needed: sections.len(),
        });
    }
    let mut out = stub.to_vec();
    // Anything after the last section (a signature, an overlay) is dropped: the UKI
    // is unsigned and its sections start right after the stub's.
    out.truncate(end_raw.min(stub.len() as u64) as usize);
    out.resize(align(end_raw, l.file_alignment) as usize, 0);
    let mut va = align(end_va, l.section_alignment);
    let mut init_data = u64::from(rd32(stub, l.opt + 8)?);
    for (i, s) in sections.iter().enumerate() {
        if s.name.len() > 8 {
            return Err(UkiError::LongName(s.name.clone()));
        }
        let raw_ptr = out.len() as u64;
        let raw_size = align(s.data.len() as u64, l.file_alignment);
        let vsize = s.data.len() as u64;
        let fits = |v: u64| u32::try_from(v).map_err(|_| UkiError::TooLarge);
        let mut header = [0u8; SECTION_HEADER_LEN];
        header[..s.name.len()].copy_from_slice(s.name.as_bytes());
        wr32(&mut header, 8, fits(vsize)?);
        wr32(&mut header, 12, fits(va)?);
        wr32(&mut header, 16, fits(raw_size)?);
        wr32(&mut header, 20, fits(raw_ptr)?);
        wr32(&mut header, 36, SCN_DATA_READ);
        let at = l.table + (l.nsections + i) * SECTION_HEADER_LEN;
        out[at..at + SECTION_HEADER_LEN].copy_from_slice(&header);
        out.extend_from_slice(&s.data);
        out.resize((raw_ptr + raw_size) as usize, 0);
        init_data += raw_size;
        va = align(va + vsize.max(1), l.section_alignment);
    }
    let nsections = u16::try_from(l.nsections + sections.len()).map_err(|_| UkiError::TooLarge)?;
    wr16(&mut out, l.coff + 2, nsections);
    wr32(
        &mut out,
        l.opt + 8,
        u32::try_from(init_data).map_err(|_| UkiError::TooLarge)?,
    );
    wr32(
        &mut out,
        l.opt + 56,
        u32::try_from(va).map_err(|_| UkiError::TooLarge)?,
    );
    let sum = checksum(&out, l.opt + 64);
    wr32(&mut out, l.opt + 64, sum);
    Ok(out)
}

/// The PE image checksum (as `IMAGEHLP`'s `CheckSumMappedFile`): a 16-bit
/// one's-complement-style sum of the file, skipping the checksum field, plus the
/// file length. UEFI does not check it; tools that inspect images do.
pub fn checksum(image: &[u8], field: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, chunk) in image.chunks(2).enumerate() {
        let at = i * 2;
        if at >= field && at < field + 4 {
            continue;
        }
        let word = u64::from(chunk[0]) | (u64::from(*chunk.get(1).unwrap_or(&0)) << 8);
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(image.len() as u32)
}

/// The `.osrel` text: who built this image, for `bootctl`, firmware menus and us.
pub fn os_release(version: &str, kernel_release: &str) -> String {
    format!(
        "NAME=\"Powernode\"\nID=powernode\nVERSION_ID=\"{version}\"\n\
         PRETTY_NAME=\"Powernode node {version} (kernel {kernel_release})\"\n\
         HOME_URL=\"https://example.invalid/powernode\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::pe::PeFile64;
    use object::{Object, ObjectSection};

    /// A small PE32+ built with `object::write` stands in for the stub in unit tests
    /// (the real stub is exercised by the disk test and the VM tier).
    pub(crate) fn fake_stub() -> Vec<u8> {
        use object::pe;
        use object::write::pe::{NtHeaders, Writer};
        let mut data = Vec::new();
        // A page-sized file alignment leaves room after the two section headers for
        // more, as systemd's stub has.
        let mut w = Writer::new(true, 0x1000, 0x1000, &mut data);
        w.reserve_dos_header_and_stub();
        w.reserve_nt_headers(16);
        w.reserve_section_headers(2);
        let text = w.reserve_text_section(0x30);
        w.reserve_reloc_section();
        w.write_dos_header_and_stub().unwrap();
        w.write_nt_headers(NtHeaders {
            machine: pe::IMAGE_FILE_MACHINE_AMD64,
            time_date_stamp: 0x1234_5678,
            characteristics: pe::IMAGE_FILE_EXECUTABLE_IMAGE,
            major_linker_version: 0,
            minor_linker_version: 0,
            address_of_entry_point: text.virtual_address,
            image_base: 0x1_4000_0000,
            major_operating_system_version: 0,
            minor_operating_system_version: 0,
            major_image_version: 0,
            minor_image_version: 0,
            major_subsystem_version: 0,
            minor_subsystem_version: 0,
            subsystem: pe::IMAGE_SUBSYSTEM_EFI_APPLICATION,
            dll_characteristics: 0,
            size_of_stack_reserve: 0,
            size_of_stack_commit: 0,
            size_of_heap_reserve: 0,
            size_of_heap_commit: 0,
        });
        w.write_section_headers();
        w.write_section(text.file_offset, &[0xc3; 0x30]);
        w.write_reloc_section();
        data
    }

    #[test]
    fn sections_are_appended_aligned_and_readable() {
        let stub = fake_stub();
        let inputs = UkiInputs {
            kernel: b"KERNEL-BYTES",
            initrd: &[7u8; 1000],
            cmdline: "console=ttyS0 panic=-1",
            os_release: &os_release("0.1.0", "6.12"),
            uname: "6.12",
        };
        let uki = build(&stub, &inputs).unwrap();
        let pe = PeFile64::parse(&*uki).unwrap();
        let by = |n: &str| {
            let s = pe.section_by_name(n).unwrap_or_else(|| panic!("{n}"));
            (s.address(), s.data().unwrap().to_vec())
        };
        assert_eq!(by(".linux").1[..12], *b"KERNEL-BYTES");
        assert_eq!(by(".cmdline").1[..22], *b"console=ttyS0 panic=-1");
        assert_eq!(by(".initrd").1[..1000], [7u8; 1000]);
        assert!(String::from_utf8_lossy(&by(".osrel").1).contains("ID=powernode"));
        // Virtual addresses are section-aligned and increase, the kernel last.
        let names: Vec<String> = pe
            .sections()
            .map(|s| s.name().unwrap().to_string())
            .collect();
        assert_eq!(names.last().unwrap(), ".linux");
        let mut last = 0;
        for s in pe.sections() {
            assert_eq!(s.address() % 0x1000, 0);
            assert!(s.address() >= last);
            last = s.address();
        }
        // The stub's code and timestamp are untouched; the checksum is consistent.
        assert_eq!(
            pe.section_by_name(".text").unwrap().data().unwrap()[..0x30],
            [0xc3; 0x30]
        );
        let l = layout(&uki).unwrap();
        assert_eq!(rd32(&uki, l.coff + 4).unwrap(), 0x1234_5678);
        assert_eq!(rd32(&uki, l.opt + 64).unwrap(), checksum(&uki, l.opt + 64));
        // Same inputs, same bytes.
        assert_eq!(build(&stub, &inputs).unwrap(), uki);
    }

    #[test]
    fn bad_stubs_and_names_are_refused() {
        assert_eq!(
            append_sections(b"not a pe", &[]).unwrap_err(),
            UkiError::NotPe("no MZ signature")
        );
        let stub = fake_stub();
        assert!(matches!(
            append_sections(&stub, &[Section::new(".text", b"x".to_vec())]),
            Err(UkiError::Duplicate(_))
        ));
        assert!(matches!(
            append_sections(&stub, &[Section::new(".waytoolong", b"x".to_vec())]),
            Err(UkiError::LongName(_))
        ));
        let many: Vec<Section> = (0..200)
            .map(|i| Section::new(&format!(".s{i}"), b"x".to_vec()))
            .collect();
        assert!(matches!(
            append_sections(&stub, &many),
            Err(UkiError::NoRoom { .. })
        ));
    }

    #[test]
    fn checksum_skips_its_own_field() {
        let mut img = vec![1u8, 0, 2, 0, 0xff, 0xff, 0xff, 0xff, 3, 0];
        let a = checksum(&img, 4);
        img[4..8].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(checksum(&img, 4), a);
        assert_eq!(a, 1 + 2 + 3 + 10);
    }
}
