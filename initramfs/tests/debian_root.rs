//! The Debian root (`scripts/debian-root`, mmdebstrap) and the kernel-modules tree
//! (`kernel-modules`) fit: stacked as overlay layers, the root's `/lib -> usr/lib` finds
//! the pinned kernel's modules. And the root is what a node needs and reproducible.
//!
//! Needs root (mmdebstrap keeps the packages' owners; the overlay mount), as the test
//! command runs: it fails, naming that, otherwise. A cold cache builds the root twice
//! (downloading about 115 MB of .debs once), minutes on this machine; with the root
//! cached and its rebuild once proven identical (`reproduced` beside it), seconds.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use powernode_initramfs::kernel::{ensure_kernel, DEFAULT_PIN};
use powernode_initramfs::kmods::write_module_tree;
use powernode_initramfs::KernelPin;
use sha2::{Digest, Sha256};

fn top() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cache() -> PathBuf {
    std::env::var("POWERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| top().join("cache"))
}

fn require_root() {
    assert!(
        euid() == 0,
        "building the Debian root needs root (mmdebstrap keeps owners; overlay mounts): \
         run the tests as root, as scripts/test does"
    );
}

/// The effective uid without a syscall crate: `/proc/self/status`'s `Uid:` line.
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Runs `scripts/debian-root ARGS`; its stdout must be exactly the root's path.
fn debian_root(args: &[&Path]) -> PathBuf {
    let out = Command::new(top().join("scripts/debian-root"))
        .args(args)
        .env("POWERNODE_CACHE", cache())
        .output()
        .expect("running scripts/debian-root");
    assert!(
        out.status.success(),
        "scripts/debian-root {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is only the path: {stdout:?}");
    let path = PathBuf::from(lines[0]);
    assert!(path.ends_with("rootfs") && path.is_dir(), "{path:?}");
    path
}

/// The cached root, built once for this test binary (its tests run in parallel; the
/// script also holds a lock of its own).
fn cached_root() -> PathBuf {
    static ROOT: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut root = ROOT
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    require_root();
    root.get_or_insert_with(|| debian_root(&[])).clone()
}

/// sha256 over the sorted listing of every entry: path, mode, uid, gid, size (a
/// file's), the symlink's target, the content's sha256 (from `sha256sum`: the root is ~500 MB, too
/// much for an unoptimized hasher).
fn tree_digest(root: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | xargs -0r sha256sum --zero")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut content = BTreeMap::new();
    for record in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let text = String::from_utf8_lossy(record);
        let (hash, name) = text.split_once("  ").unwrap();
        content.insert(PathBuf::from(name), hash.to_string());
    }
    let mut listing = Vec::new();
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = std::fs::symlink_metadata(&path).unwrap();
        // A folder's size is the filesystem's bookkeeping, not content: ext4 never
        // shrinks one, so apt's emptied archive folder is larger after a build that
        // synced in the cached .debs than after one that downloaded them.
        let mut size = m.len();
        let detail = if m.is_dir() {
            let children = std::fs::read_dir(&path).unwrap();
            stack.extend(children.map(|e| rel.join(e.unwrap().file_name())));
            size = 0;
            String::new()
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&path).unwrap().display().to_string()
        } else if m.is_file() {
            content[&rel].clone()
        } else {
            format!("rdev {}", m.rdev())
        };
        listing.push(format!(
            "{} {:o} {} {} {} {detail}\n",
            rel.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            size
        ));
    }
    listing.sort();
    hex::encode(Sha256::digest(listing.concat()))
}

/// What a netbooted node relies on: merged /usr, systemd as init, Docker on vfs, the
/// test image, the root's own owners, and nothing left from the build host.
#[test]
fn the_debian_root_boots_systemd_and_runs_docker_on_vfs() {
    let root = cached_root();
    let link = |p: &str| std::fs::read_link(root.join(p)).unwrap();
    assert_eq!(link("lib"), Path::new("usr/lib"));
    assert_eq!(link("bin"), Path::new("usr/bin"));
    assert_eq!(link("usr/sbin/init"), Path::new("/lib/systemd/systemd"));
    assert!(root.join("usr/lib/systemd/systemd").is_file());
    let version = Command::new("chroot")
        .arg(&root)
        .args(["/bin/systemctl", "--version"])
        .output()
        .unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("systemd 252"));

    let daemon: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("etc/docker/daemon.json")).unwrap())
            .unwrap();
    assert_eq!(daemon["storage-driver"], "vfs");
    assert_eq!(daemon["iptables"], true);
    for bin in ["usr/sbin/dockerd", "usr/bin/containerd", "usr/sbin/runc"] {
        assert!(root.join(bin).is_file(), "{bin} missing");
    }

    // Owners by the root's own names (the host's ids mean other things).
    let owner = Command::new("chroot")
        .arg(&root)
        .args([
            "stat",
            "-c",
            "%U:%G %a",
            "/usr/lib/dbus-1.0/dbus-daemon-launch-helper",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&owner.stdout),
        "root:messagebus 4754\n"
    );

    // A boot here is always a first boot (empty machine-id): nothing may prompt or wait.
    assert_eq!(std::fs::read(root.join("etc/machine-id")).unwrap(), b"");
    for unit in [
        "systemd-firstboot.service",
        "systemd-networkd-wait-online.service",
    ] {
        assert_eq!(
            link(&format!("etc/systemd/system/{unit}")),
            Path::new("/dev/null"),
            "{unit} is not masked"
        );
    }
    for host_file in ["etc/resolv.conf", "etc/hostname"] {
        assert!(
            !root.join(host_file).exists(),
            "{host_file} came from the host"
        );
    }
    // No powernode unit: the init installs the agent's at boot, under /run.
    let units = std::fs::read_dir(root.join("etc/systemd/system")).unwrap();
    for unit in units {
        let name = unit.unwrap().file_name();
        assert!(!name.to_string_lossy().contains("powernode"), "{name:?}");
    }

    let tar = Command::new("tar")
        .args(["--list", "--verbose", "--numeric-owner", "--file"])
        .arg(root.join("usr/share/powernode/busybox-image.tar"))
        .output()
        .unwrap();
    assert!(tar.status.success());
    let entries: Vec<String> = String::from_utf8_lossy(&tar.stdout)
        .lines()
        .map(|l| {
            // mode owner size date time name [-> target]
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {}", f[0], f[1], f[5..].join(" "))
        })
        .collect();
    assert_eq!(
        entries,
        [
            "drwxr-xr-x 0/0 bin/",
            "-rwxr-xr-x 0/0 bin/busybox",
            "lrwxrwxrwx 0/0 bin/sh -> busybox",
            "lrwxrwxrwx 0/0 bin/sleep -> busybox",
        ]
    );

    let packages = std::fs::read_to_string(root.with_file_name("packages.txt")).unwrap();
    for name in [
        "systemd",
        "docker.io",
        "containerd",
        "runc",
        "tini",
        "kmod",
        "udev",
    ] {
        assert!(
            packages
                .lines()
                .any(|l| l.starts_with(&format!("{name}\t"))),
            "{name} not in packages.txt"
        );
    }
}

/// A second build from the same .debs gives the same packages and the same tree (path,
/// mode, owner, size, content). Proven once per root: `reproduced` beside it records
/// the digest both builds had, and later runs check the cached tree still has it.
#[test]
fn two_builds_of_the_debian_root_are_identical() {
    let root = cached_root();
    let digest = tree_digest(&root);
    let stamp = root.with_file_name("reproduced");
    if let Ok(proven) = std::fs::read_to_string(&stamp) {
        assert_eq!(
            proven.trim(),
            digest,
            "the cached root changed since it was proven"
        );
        return;
    }
    let target = top().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let base = tempfile::tempdir_in(&target).unwrap();
    let again = debian_root(&[Path::new("--out"), &base.path().join("again")]);
    assert_eq!(
        std::fs::read_to_string(root.with_file_name("packages.txt")).unwrap(),
        std::fs::read_to_string(again.with_file_name("packages.txt")).unwrap(),
        "the two builds resolved other packages (did the mirror change in between?)"
    );
    assert_eq!(tree_digest(&again), digest);
    std::fs::write(&stamp, format!("{digest}\n")).unwrap();
}

/// Unmounts on drop, also when an assertion fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The kernel-modules tree stacked over the root, as the node composes them: no entry
/// of the module layer shadows a non-folder of the root, and the root's own kmod finds
/// every module through `/lib/modules` (the root's `/lib -> usr/lib` symlink).
#[test]
fn the_kernel_modules_layer_fits_over_the_debian_root() {
    let root = cached_root();
    let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
    let kernel = ensure_kernel(&pin, &cache(), &top().join("scripts/debs"))
        .unwrap_or_else(|e| panic!("fetching the pinned kernel {}: {e}", pin.package));
    let target = top().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let base = tempfile::tempdir_in(&target).unwrap();
    let layer = base.path().join("kernel-modules");
    write_module_tree(&kernel, &layer).unwrap();

    // Every folder of the layer is a folder (or absent) in the root: a file, or the
    // `lib` symlink, hidden by a layer folder would break the root.
    let mut stack = vec![PathBuf::from("usr")];
    while let Some(rel) = stack.pop() {
        let under = std::fs::symlink_metadata(root.join(&rel));
        if std::fs::symlink_metadata(layer.join(&rel))
            .unwrap()
            .is_dir()
        {
            if let Ok(m) = under {
                assert!(
                    m.is_dir(),
                    "{} hides a non-folder of the root",
                    rel.display()
                );
                let children = std::fs::read_dir(layer.join(&rel)).unwrap();
                stack.extend(children.map(|e| rel.join(e.unwrap().file_name())));
            }
        } else {
            assert!(under.is_err(), "{} replaces a root file", rel.display());
        }
    }

    let merged = base.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let lower = format!("ro,lowerdir={}:{}", layer.display(), root.display());
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &lower])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(status.success(), "mounting the overlay");
    let _mounted = Mounted(merged.clone());
    assert_eq!(
        std::fs::read_link(merged.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    let release = &pin.release;
    let modprobe = Command::new("chroot")
        .arg(&merged)
        .args(["/usr/sbin/modprobe", "--show-depends", "-S", release])
        .args(["br_netfilter"])
        .output()
        .unwrap();
    assert!(
        modprobe.status.success(),
        "{}",
        String::from_utf8_lossy(&modprobe.stderr)
    );
    let shown = String::from_utf8_lossy(&modprobe.stdout);
    for ko in ["bridge.ko.xz", "br_netfilter.ko.xz"] {
        assert!(
            shown.contains(&format!("/lib/modules/{release}/kernel/net/bridge/{ko}")),
            "{shown}"
        );
    }
    for module in ["overlay", "veth", "xt_MASQUERADE", "nf_nat"] {
        let info = Command::new("chroot")
            .arg(&merged)
            .args(["/usr/sbin/modinfo", "-k", release, "-F", "filename", module])
            .output()
            .unwrap();
        assert!(
            info.status.success() && info.stdout.starts_with(b"/lib/modules/"),
            "{module}: {}",
            String::from_utf8_lossy(&info.stderr)
        );
    }
}
