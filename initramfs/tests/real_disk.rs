//! The UEFI disk image from the real pinned systemd-stub and kernel in the project
//! cache (`cache/stub/VERSION`, `cache/kernel/VERSION`), fetched here when missing
//! (`scripts/debs`), so the test always checks something. Booting it is the VM
//! tier's job (`tests/tests/vm_cloud.rs`).

use std::path::PathBuf;
use std::process::Command;

use object::read::pe::PeFile64;
use object::{Object, ObjectSection};
use powernode_initramfs::disk::{disk_image, read_esp_file, BOOT_PATH};
use powernode_initramfs::kernel::{ensure_kernel, DEFAULT_PIN};
use powernode_initramfs::stub::{ensure_stub, StubPin, DEFAULT_STUB_PIN};
use powernode_initramfs::uki::{self, UkiInputs};
use powernode_initramfs::KernelPin;

fn fetched() -> (Vec<u8>, Vec<u8>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cache = std::env::var("POWERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("cache"));
    let debs = root.join("scripts/debs");
    let pin = StubPin::parse(DEFAULT_STUB_PIN).unwrap();
    let stub = ensure_stub(&pin, &cache, &debs)
        .unwrap_or_else(|e| panic!("fetching the pinned EFI stub (scripts/debs): {e}"));
    let kpin = KernelPin::parse(DEFAULT_PIN).unwrap();
    let tree = ensure_kernel(&kpin, &cache, &debs)
        .unwrap_or_else(|e| panic!("fetching the pinned kernel (scripts/debs): {e}"));
    (
        std::fs::read(&stub).unwrap(),
        std::fs::read(tree.vmlinuz()).unwrap(),
    )
}

#[test]
fn real_stub_takes_the_sections_and_the_disk_is_reproducible() {
    let (stub, kernel) = fetched();
    let initrd = b"not really an initramfs".to_vec();
    let osrel = uki::os_release("0.1.0", "6.12-test");
    let inputs = UkiInputs {
        kernel: &kernel,
        initrd: &initrd,
        cmdline: "console=ttyS0 panic=-1",
        os_release: &osrel,
        uname: "6.12-test",
    };
    let uki_bytes = uki::build(&stub, &inputs).unwrap();
    let pe = PeFile64::parse(&*uki_bytes).unwrap();
    let linux = pe.section_by_name(".linux").unwrap();
    assert_eq!(&linux.data().unwrap()[..kernel.len()], &kernel[..]);
    // The stub's own sections are all still there, first.
    let names: Vec<String> = pe
        .sections()
        .map(|s| s.name().unwrap().to_string())
        .collect();
    assert_eq!(names[0], ".text");
    for n in [
        ".sdmagic", ".osrel", ".cmdline", ".uname", ".initrd", ".linux",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    // binutils agrees it is a valid PE with those sections, when installed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("BOOTX64.EFI");
    std::fs::write(&path, &uki_bytes).unwrap();
    match Command::new("objdump").arg("-h").arg(&path).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("pei-x86-64"), "{text}");
            assert!(
                text.contains(".linux") && text.contains(".initrd"),
                "{text}"
            );
        }
        _ => eprintln!("note: objdump not available; PE checked with the object crate only"),
    }

    let a = disk_image(&uki_bytes, 0).unwrap();
    let b = disk_image(&uki::build(&stub, &inputs).unwrap(), 0).unwrap();
    assert!(a == b, "same inputs gave different disk images");
    assert_eq!(read_esp_file(&a, BOOT_PATH).unwrap(), uki_bytes);
}
