//! Against the real pinned kernel in the project cache (`cache/kernel/VERSION`),
//! fetched here when missing (`scripts/debs`, Debian's archive: the test command
//! already needs it for the VM tier), so these tests always check something.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use powernode_initramfs::kernel::{ensure_kernel, KernelTree, DEFAULT_PIN};
use powernode_initramfs::kmods::write_module_tree;
use powernode_initramfs::modules::ModuleTree;
use powernode_initramfs::{cpio, KernelPin};

fn cached_tree() -> KernelTree {
    // One fetch for the tests of this binary, which run in parallel.
    static FETCH: OnceLock<Mutex<()>> = OnceLock::new();
    let _one = FETCH.get_or_init(|| Mutex::new(())).lock();
    let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cache = std::env::var("POWERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("cache"));
    ensure_kernel(&pin, &cache, &root.join("scripts/debs")).unwrap_or_else(|e| {
        panic!(
            "fetching the pinned kernel {} (scripts/debs): {e}",
            pin.package
        )
    })
}

fn names(tree: &ModuleTree, wanted: &[String]) -> Vec<String> {
    tree.closure(wanted)
        .unwrap()
        .modules
        .into_iter()
        .map(|m| m.name)
        .collect()
}

/// The closure from `.modinfo` equals the one from a `modules.dep` written by the real
/// `depmod` (kmod) over a hard-linked copy of the tree.
#[test]
fn modinfo_closure_matches_depmod() {
    let kernel = cached_tree();
    assert!(
        Command::new("depmod").arg("--version").output().is_ok(),
        "`depmod` is missing: scripts/setup installs it (Debian package kmod)"
    );
    let release = &kernel.pin.release;
    let wanted = kernel.pin.modules.clone();
    let from_modinfo = ModuleTree::open(&kernel.modules_dir(), release).unwrap();
    let closure = from_modinfo.closure(&wanted).unwrap();
    for m in &closure.modules {
        assert!(m.elf.starts_with(b"\x7fELF"), "{} not decompressed", m.name);
    }
    assert!(closure.builtin.contains(&"ext4".to_string()));

    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    let base = tempfile::tempdir_in(&target).unwrap();
    let copy = base.path().join("lib/modules").join(release);
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-al")
        .arg(kernel.modules_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new("depmod")
        .arg("-b")
        .arg(base.path())
        .arg(release)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(copy.join("modules.dep").is_file());
    let from_dep = ModuleTree::open(&copy, release).unwrap();

    let mut a = names(&from_modinfo, &wanted);
    let mut b = names(&from_dep, &wanted);
    // The orders may differ where depmod lists a module's dependencies in another
    // order; both must be dependency-first, and the sets equal.
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for tree in [&from_modinfo, &from_dep] {
        let order = names(tree, &wanted);
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert!(pos("libcrc32c") < pos("erofs"));
    }
}

/// Same inputs, same bytes, on the real module closure; and the archive reads back.
#[test]
fn real_closure_archive_is_deterministic() {
    let kernel = cached_tree();
    let tree = ModuleTree::open(&kernel.modules_dir(), &kernel.pin.release).unwrap();
    let build = || {
        let closure = tree.closure(&kernel.pin.modules).unwrap();
        let spec = powernode_initramfs::build::initramfs_spec(
            b"\x7fELF-init",
            None,
            &closure,
            &kernel.pin.on_demand,
        )
        .unwrap();
        let archive = cpio::write_newc(&spec).unwrap();
        powernode_initramfs::compress::compress(&archive, powernode_initramfs::Compression::Zstd)
            .unwrap()
    };
    let (a, b) = (build(), build());
    assert_eq!(a, b);
    let archive =
        powernode_initramfs::compress::decompress(&a, powernode_initramfs::Compression::Zstd)
            .unwrap();
    let members = cpio::read_newc(&archive).unwrap();
    let order = members
        .iter()
        .find(|m| m.name == "lib/modules/load-order")
        .unwrap();
    let entries =
        powernode_init::modules::parse_load_order(std::str::from_utf8(&order.data).unwrap())
            .unwrap();
    let when = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.when)
            .unwrap_or_else(|| panic!("{name} not in the load order: {entries:?}"))
    };
    use powernode_init::modules::When;
    // Drivers wait for their device; the composefs filesystems for a mount.
    for name in ["qemu_fw_cfg", "virtio_net", "virtio_blk", "virtio_rng"] {
        assert_eq!(when(name), When::Device, "{name}");
    }
    for name in [
        "erofs",
        "overlay",
        "loop",
        "libcrc32c",
        "failover",
        "isofs",
        "vfat",
        "fat",
        "nls_utf8",
        "nls_cp437",
        "nls_ascii",
    ] {
        assert_eq!(when(name), When::Demand, "{name}");
    }
    let listed: Vec<String> = entries.iter().map(|e| e.file()).collect();
    for file in listed {
        let m = members
            .iter()
            .find(|m| m.name == format!("lib/modules/{file}"))
            .unwrap_or_else(|| panic!("{file} listed but not in the archive"));
        assert!(m.data.starts_with(b"\x7fELF"));
    }
}

/// `kernel-modules` on the real kernel: the whole tree under `usr/lib/modules/RELEASE`
/// (never a `lib/` that would hide a Debian root's `/lib` symlink), `modules.dep` from
/// depmod naming what Docker needs, and the same bytes, modes and times twice.
#[test]
fn the_whole_module_tree_is_written_under_usr_lib_with_depmods_index() {
    let kernel = cached_tree();
    assert!(
        Command::new("depmod").arg("--version").output().is_ok(),
        "`depmod` is missing: scripts/setup installs it (Debian package kmod)"
    );
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    let base = tempfile::tempdir_in(&target).unwrap();
    let (a, b) = (base.path().join("a"), base.path().join("b"));
    let written = write_module_tree(&kernel, &a).unwrap();
    let release = &kernel.pin.release;
    assert_eq!(written.modules_dir, a.join("usr/lib/modules").join(release));
    let top: Vec<_> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top, ["usr"]);

    let dir = &written.modules_dir;
    for file in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.dep",
        "modules.dep.bin",
        "modules.alias.bin",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let dep = std::fs::read_to_string(dir.join("modules.dep")).unwrap();
    for module in [
        "kernel/fs/overlayfs/overlay.ko.xz:",
        "kernel/drivers/net/veth.ko.xz:",
        "kernel/net/bridge/bridge.ko.xz:",
        "kernel/net/bridge/br_netfilter.ko.xz:",
    ] {
        assert!(
            dep.lines().any(|l| l.starts_with(module)),
            "{module} not in modules.dep"
        );
    }
    // Every module the package ships, as it ships it.
    let shipped = std::fs::read_to_string(kernel.modules_dir().join("modules.order")).unwrap();
    assert!(shipped.lines().count() > 1000);
    for line in shipped.lines() {
        let ko = format!("{line}.xz");
        assert_eq!(
            std::fs::read(dir.join(&ko)).unwrap(),
            std::fs::read(kernel.modules_dir().join(&ko)).unwrap(),
            "{ko}"
        );
    }
    assert!(written.files > 1000, "{written:?}");

    let again = write_module_tree(&kernel, &b).unwrap();
    assert_eq!((written.files, written.bytes), (again.files, again.bytes));
    assert_eq!(listing(&a), listing(&b));
}

/// Path, mode, mtime, size and content of every entry under `root`, sorted.
fn listing(root: &std::path::Path) -> Vec<(PathBuf, u32, i64, u64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let data = if m.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            Vec::new()
        };
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        out.push((rel, m.mode(), m.mtime(), m.len(), data));
    }
    out.sort();
    out
}
